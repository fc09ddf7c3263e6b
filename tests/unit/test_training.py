"""A tiny model fine-tuned for a few steps on synthetic feed data learns to retrieve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from feedserve.artifacts import EncoderSettings
from feedserve.encode.pytorch import TorchEncoder
from feedserve.prompt.buckets import PercentileBuckets
from feedserve.prompt.builder import PromptBuilder
from feedserve.training.data import synthetic_feed
from feedserve.training.evaluate import evaluate_embeddings
from feedserve.training.train import TrainConfig, train

SETTINGS = EncoderSettings(
    max_prompt_tokens=128, post_text_tokens=24, history_item_tokens=12, length_buckets=(32, 64, 128)
)


def _recall(model_dir: Path, syn, buckets: PercentileBuckets) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer

    enc = TorchEncoder(model_dir, SETTINGS)
    builder = PromptBuilder(Tokenizer.from_file(str(model_dir / "tokenizer.json")), buckets, SETTINGS)

    def posts(ps):  # type: ignore[no-untyped-def]
        b = builder.encode_posts(ps)
        return enc.encode(b.input_ids, b.attention_mask)

    def members(ms):  # type: ignore[no-untyped-def]
        b = builder.encode_members(ms)
        return enc.encode(b.input_ids, b.attention_mask)

    return evaluate_embeddings(posts, members, syn.posts, syn.test, ks=(10,))


@pytest.fixture(scope="module")
def syn():  # type: ignore[no-untyped-def]
    return synthetic_feed(n_members=60, n_posts=120, history=5)


def test_loss_falls_and_recall_beats_random(tiny_checkpoint: Path, tmp_path: Path, syn) -> None:  # type: ignore[no-untyped-def]
    buckets = PercentileBuckets.fit_posts(syn.posts)
    cfg = TrainConfig(
        steps=150,
        batch_size=12,
        lr=1e-2,
        hard_negatives=2,
        easy_negatives=8,
        matryoshka_dims=(16,),
        checkpoint_every=25,
    )
    result = train(tiny_checkpoint, tmp_path / "run", syn.train, syn.posts, buckets, SETTINGS, cfg, progress=False)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.7 * first, (first, last)
    # 2 relevant posts among 115 candidates: random recall@10 is about 0.09.
    before = _recall(tiny_checkpoint, syn, buckets)["recall@10"]
    after = _recall(result.model_dir, syn, buckets)["recall@10"]
    print(f"recall@10 before {before:.3f} after {after:.3f}")
    assert after > 0.3 and after > 2 * before, (before, after)
    assert (tmp_path / "run" / "buckets.json").exists() and (tmp_path / "run" / "serving.json").exists()


def test_resume_continues_where_it_stopped(tiny_checkpoint: Path, tmp_path: Path, syn) -> None:  # type: ignore[no-untyped-def]
    buckets = PercentileBuckets.fit_posts(syn.posts)
    base = dict(batch_size=8, lr=1e-3, easy_negatives=4, checkpoint_every=3, lora_r=4)
    full = train(
        tiny_checkpoint,
        tmp_path / "a",
        syn.train,
        syn.posts,
        buckets,
        SETTINGS,
        TrainConfig(steps=6, **base),
        progress=False,
    )
    # A 4-step run (checkpoints at 3 and 4), extended to 6: it resumes at 4 and ends where `full` did.
    train(
        tiny_checkpoint,
        tmp_path / "b",
        syn.train,
        syn.posts,
        buckets,
        SETTINGS,
        TrainConfig(steps=4, **base),
        progress=False,
    )
    resumed = train(
        tiny_checkpoint,
        tmp_path / "b",
        syn.train,
        syn.posts,
        buckets,
        SETTINGS,
        TrainConfig(steps=6, **base),
        progress=False,
    )
    assert resumed.resumed_from == 4
    np.testing.assert_allclose(resumed.losses, full.losses, rtol=1e-4)
    assert (tmp_path / "b" / "adapter" / "adapter_config.json").exists()
    # Running a finished run again trains nothing and keeps the report of the run that did.
    report = (tmp_path / "b" / "train_report.json").read_text()
    again = train(
        tiny_checkpoint,
        tmp_path / "b",
        syn.train,
        syn.posts,
        buckets,
        SETTINGS,
        TrainConfig(steps=6, **base),
        progress=False,
    )
    assert again.resumed_from == 6 and (tmp_path / "b" / "train_report.json").read_text() == report


def test_an_intermediate_checkpoint_is_the_shorter_run(tiny_checkpoint: Path, tmp_path: Path, syn) -> None:  # type: ignore[no-untyped-def]
    """Constant learning rate and (seed, step) batches: step 3 of a 6-step run is a 3-step run, so
    ablations trained for N steps compare with the main run's step-N checkpoint."""
    from feedserve.training.train import materialize_checkpoint

    buckets = PercentileBuckets.fit_posts(syn.posts)
    base = dict(batch_size=8, lr=1e-3, easy_negatives=4, checkpoint_every=3, lora_r=4)
    train(
        tiny_checkpoint,
        tmp_path / "long",
        syn.train,
        syn.posts,
        buckets,
        SETTINGS,
        TrainConfig(steps=6, **base),
        progress=False,
    )
    short = train(
        tiny_checkpoint,
        tmp_path / "short",
        syn.train,
        syn.posts,
        buckets,
        SETTINGS,
        TrainConfig(steps=3, **base),
        progress=False,
    )
    model = materialize_checkpoint(
        tiny_checkpoint, tmp_path / "long", tmp_path / "long" / "checkpoints" / "step-3", tmp_path / "at3"
    )
    batch = PromptBuilder(Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json")), buckets, SETTINGS).encode_posts(
        syn.posts[:6]
    )
    a = TorchEncoder(model, SETTINGS).encode(batch.input_ids, batch.attention_mask)
    b = TorchEncoder(short.model_dir, SETTINGS).encode(batch.input_ids, batch.attention_mask)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert (tmp_path / "at3" / "serving.json").exists() and (tmp_path / "at3" / "adapter" / "buckets.json").exists()


def test_cli_refuses_a_base_with_an_adapter_merged_in(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The shipped adapter applies to the plain base; one tuned on top of a merged fine-tune would not.
    import json

    from feedserve.training.train import main

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "import.json").write_text(
        json.dumps({"sha256": "0" * 64, "adapter": "models/smollm2-movielens"})
    )
    SETTINGS.save(tmp_path / "serving.json")
    with pytest.raises(SystemExit):
        main(["--base", str(tmp_path), "--out", str(tmp_path / "run"), "--steps", "1"])
    assert "already has an adapter merged in" in capsys.readouterr().err


def test_checkpoints_kept(tiny_checkpoint: Path, tmp_path: Path, syn) -> None:  # type: ignore[no-untyped-def]
    buckets = PercentileBuckets.fit_posts(syn.posts)
    base = dict(steps=4, batch_size=4, easy_negatives=2, checkpoint_every=1)
    for keep, expected in ((2, ["step-3", "step-4"]), (0, ["step-1", "step-2", "step-3", "step-4"])):
        out = tmp_path / f"keep{keep}"
        train(
            tiny_checkpoint,
            out,
            syn.train,
            syn.posts,
            buckets,
            SETTINGS,
            TrainConfig(keep_checkpoints=keep, **base),
            progress=False,
        )
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == expected
