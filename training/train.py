"""Fine-tune the LLaMA encoder as a dual encoder with InfoNCE.

    python -m feedserve.training.train --data movielens --out artifacts/finetuned --steps 300 --lora-r 8

Each step embeds a batch of members and, with the same shared encoder, their positive posts, their
hard negatives (shown, not engaged) and posts sampled from the corpus (easy negatives); every
member's positive is scored against all of those posts, so the other members' positives serve as
in-batch negatives too. With Matryoshka dims the same loss is taken on truncated, renormalised
prefixes of the embedding, so a prefix can serve alone.

Checkpoints (trainable weights as safetensors, optimizer, step) are written every
`checkpoint_every` steps and at the end; a rerun with the same `--out` resumes from the newest, and
with a larger `--steps` extends the run. Batches depend only on (seed, step), so a resumed run sees
the batches an uninterrupted one would have.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tqdm import tqdm

from feedserve.artifacts import ADAPTER_META, EncoderSettings
from feedserve.encode.pytorch import EmbeddingModel, keep_first_layers, load_embedding_model
from feedserve.prompt.buckets import PercentileBuckets
from feedserve.prompt.builder import PromptBuilder
from feedserve.prompt.records import Post
from feedserve.training.data import Example

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.01
    temperature: float = 0.05
    hard_negatives: int = 2
    easy_negatives: int = 16
    matryoshka_dims: tuple[int, ...] = ()  # extra prefix sizes; the full size is always trained
    lora_r: int = 0  # 0: train every weight
    lora_alpha: int = 16
    keep_layers: int | None = None  # keep only the first N transformer layers
    seed: int = 0
    checkpoint_every: int = 50
    keep_checkpoints: int = 2  # the newest N are kept; 0 keeps every one (e.g. for learning curves)
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainResult:
    model_dir: Path
    losses: list[float]
    seconds: float
    peak_rss_mb: float
    resumed_from: int


def info_nce(
    members: torch.Tensor, posts: torch.Tensor, targets: torch.Tensor, same: torch.Tensor, temperature: float
) -> torch.Tensor:
    """members [B, D], posts [N, D] (normalised); targets [B] column of each member's positive;
    `same` [B, N] marks other columns holding the very same post, which must not count as negatives."""
    logits = members @ posts.T / temperature
    logits = logits.masked_fill(same, torch.finfo(logits.dtype).min)
    return F.cross_entropy(logits, targets)


def matryoshka_loss(
    m: torch.Tensor, p: torch.Tensor, targets: torch.Tensor, same: torch.Tensor, cfg: TrainConfig
) -> torch.Tensor:
    dims = sorted({m.shape[1], *(d for d in cfg.matryoshka_dims if d < m.shape[1])})
    losses = [
        info_nce(F.normalize(m[:, :d], dim=-1), F.normalize(p[:, :d], dim=-1), targets, same, cfg.temperature)
        for d in dims
    ]
    return torch.stack(losses).mean()


def build_model(hf_dir: Path, settings: EncoderSettings, cfg: TrainConfig) -> EmbeddingModel:
    # Train the full width; Matryoshka truncation happens in the loss and at export time.
    model = load_embedding_model(hf_dir, EncoderSettings(pooling=settings.pooling))
    backbone = model.backbone
    if cfg.keep_layers:
        keep_first_layers(backbone, cfg.keep_layers)
    if cfg.lora_r:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
        model.backbone = get_peft_model(backbone, lora)
    return model.train()


class Batcher:
    """Deterministic batches from (seed, step): a resumed run sees the same data."""

    def __init__(self, examples: Sequence[Example], corpus: Sequence[Post], cfg: TrainConfig) -> None:
        self.examples, self.corpus, self.cfg = examples, corpus, cfg

    def __call__(self, step: int, micro: int) -> tuple[list[Example], list[Post]]:
        rng = random.Random(self.cfg.seed * 1_000_003 + step * 101 + micro)
        batch = rng.sample(list(self.examples), min(self.cfg.batch_size, len(self.examples)))
        easy = rng.sample(list(self.corpus), min(self.cfg.easy_negatives, len(self.corpus)))
        return batch, easy


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    out: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, losses: list[float], keep: int = 2
) -> None:
    final = out / "checkpoints" / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_trainable(model), str(tmp / "trainable.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses}))
    tmp.replace(final)  # a crash mid-write leaves only a .tmp, which resume ignores
    for old in _checkpoints(out)[:-keep] if keep else []:
        shutil.rmtree(old)


def train(
    hf_dir: Path,
    out: Path,
    examples: Sequence[Example],
    corpus: Sequence[Post],
    buckets: PercentileBuckets,
    settings: EncoderSettings,
    cfg: TrainConfig,
    progress: bool = True,
    device: str = "cpu",
) -> TrainResult:
    """On a GPU (`device="cuda"`) the weights stay fp32 and the steps run under bf16 autocast; the
    checkpoints, the saved model and the adapter are the same files as a CPU run's."""
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    builder = PromptBuilder(Tokenizer.from_file(str(hf_dir / "tokenizer.json")), buckets, settings)
    model = build_model(hf_dir, settings, cfg).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, losses = 0, []
    if ckpts := _checkpoints(out):
        latest = ckpts[-1]
        model.load_state_dict(load_file(str(latest / "trainable.safetensors")), strict=False)
        opt.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True, map_location=device))
        state = json.loads((latest / "state.json").read_text())
        start, losses = int(state["step"]), list(state["losses"])
        logger.info("resuming from %s", latest)
    batcher = Batcher(examples, corpus, cfg)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # this run's peak, not an earlier one's in the same process
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="train")
    for step in bar:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch, easy = batcher(step, micro)
            with autocast:
                loss = _step_loss(model, builder, batch, easy, cfg) / cfg.grad_accum
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(total)
        bar.set_postfix(loss=f"{total:.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            # The last step too: a run can be extended later with a larger --steps.
            save_checkpoint(out, step + 1, model, opt, losses, cfg.keep_checkpoints)
    seconds = time.perf_counter() - t0
    model_dir = save_model(model.cpu(), hf_dir, out / "model", cfg)
    for where in (out, out / "adapter") if cfg.lora_r else (out,):
        buckets.save(where / "buckets.json")
        settings.save(where / "serving.json")
    if start >= cfg.steps and (out / "train_report.json").exists():
        # Nothing was trained: the report of the run that did the work stays.
        logger.info("%s already has %d steps; its train_report.json is kept", out, start)
        return TrainResult(model_dir, losses, seconds, 0.0, start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {
        "steps": cfg.steps,
        "seconds": seconds,
        "peak_rss_mb": peak,
        "device": _device_name(device),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }
    if torch.device(device).type == "cuda":
        report["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    return TrainResult(model_dir, losses, seconds, peak, start)


def _step_loss(
    model: EmbeddingModel, builder: PromptBuilder, batch: list[Example], easy: list[Post], cfg: TrainConfig
) -> torch.Tensor:
    posts = [ex.positive for ex in batch]
    for ex in batch:
        posts.extend(ex.hard_negatives[: cfg.hard_negatives])
    posts.extend(easy)
    m = builder.encode_members([ex.member for ex in batch])
    p = builder.encode_posts(posts)
    member_vecs = _raw(model, m.input_ids, m.attention_mask)
    post_vecs = _raw(model, p.input_ids, p.attention_mask)
    device = member_vecs.device
    ids = torch.tensor([x.id for x in posts], device=device)
    targets = torch.arange(len(batch), device=device)
    same = (ids[None, :] == ids[targets][:, None]) & (
        torch.arange(len(posts), device=device)[None, :] != targets[:, None]
    )
    return matryoshka_loss(member_vecs.float(), post_vecs.float(), targets, same, cfg)


def _raw(model: EmbeddingModel, ids: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    # Full-width pooled embedding; the loss normalises each Matryoshka prefix itself.
    device = next(model.parameters()).device
    return model(torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device))


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def save_model(model: EmbeddingModel, hf_dir: Path, dest: Path, cfg: TrainConfig) -> Path:
    """A plain HF LlamaModel checkpoint (LoRA merged), which export/ takes unchanged."""
    backbone = model.backbone
    if cfg.lora_r:
        adapter = dest.parent / "adapter"  # the small artifact worth committing
        backbone.save_pretrained(adapter)
        record = hf_dir / "import.json"
        meta = {
            "keep_layers": cfg.keep_layers,
            "lora_r": cfg.lora_r,
            "base_sha256": json.loads(record.read_text())["sha256"] if record.exists() else None,
            "train_config": asdict(cfg),
        }
        (adapter / ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
        backbone = backbone.merge_and_unload()
    dest.mkdir(parents=True, exist_ok=True)
    backbone.save_pretrained(dest)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf_dir / name).exists():
            shutil.copy(hf_dir / name, dest / name)
    return dest


def materialize_checkpoint(hf_dir: Path, run: Path, checkpoint: Path, dest: Path) -> Path:
    """A run's intermediate checkpoint as a run-shaped directory (model/, adapter/, settings,
    buckets), e.g. to evaluate the model at step 100 against 100-step ablation runs."""
    data = json.loads((run / "train_config.json").read_text())
    cfg = TrainConfig(**{**data, "matryoshka_dims": tuple(data.get("matryoshka_dims", ()))})
    settings = EncoderSettings.load(run / "serving.json")
    model = build_model(hf_dir, settings, cfg)
    missing = set(_trainable(model)) - set(load_file(str(checkpoint / "trainable.safetensors")))
    if missing:
        raise ValueError(f"{checkpoint} lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
    model.load_state_dict(load_file(str(checkpoint / "trainable.safetensors")), strict=False)
    state = json.loads((checkpoint / "state.json").read_text())
    save_model(model.eval(), hf_dir, dest / "model", replace(cfg, steps=int(state["step"])))
    targets = [dest, dest / "adapter"] if (dest / "adapter").is_dir() else [dest]  # the package is complete too
    for name in ("serving.json", "buckets.json"):
        for target in targets:
            shutil.copy(run / name, target / name)
    (dest / "train_config.json").write_text(json.dumps({**data, "steps": state["step"]}, indent=2))
    return dest / "model"


# The TrainConfig fields the command line sets (`--field-name`), with their types.
CLI_FIELDS: dict[str, type] = {
    "steps": int,
    "batch_size": int,
    "grad_accum": int,
    "hard_negatives": int,
    "easy_negatives": int,
    "lora_r": int,
    "keep_layers": int,
    "seed": int,
    "checkpoint_every": int,
    "keep_checkpoints": int,
    "lr": float,
    "temperature": float,
}


def main(argv: list[str] | None = None) -> int:
    from feedserve.artifacts import REPO_ROOT, ArtifactLayout
    from feedserve.ops.builder import SAMPLE_CORPUS
    from feedserve.prompt.movielens import load_movielens
    from feedserve.training.data import movielens_split, synthetic_feed

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=("movielens", "synthetic"), default="movielens")
    p.add_argument(
        "--base",
        type=Path,
        default=REPO_ROOT / "artifacts" / "untuned",
        help="artifact dir of the untuned model (`feedserve --artifacts artifacts/untuned build --untuned`)",
    )
    p.add_argument("--device", default="cpu", help="cpu, or cuda: bf16 autocast on the GPU")
    p.add_argument("--out", type=Path, required=True)
    for f, kind in CLI_FIELDS.items():
        p.add_argument("--" + f.replace("_", "-"), type=kind, default=getattr(TrainConfig, f))
    p.add_argument("--matryoshka", type=int, nargs="*", default=[])
    p.add_argument("--max-prompt-tokens", type=int, help="token budget of a prompt (default: the base's serving.json)")
    # Ablations of the choices the system we reproduce made (benchmarks/quality.py evaluates them).
    p.add_argument("--raw-counts", action="store_true", help="counts as raw numbers, not percentile tokens")
    p.add_argument("--history-negatives", action="store_true", help="member history includes disliked movies")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = TrainConfig(
        **{f: getattr(args, f) for f in CLI_FIELDS},
        matryoshka_dims=tuple(args.matryoshka),
        extra={"data": args.data, "history": "engaged+disliked" if args.history_negatives else "engaged"},
    )
    base = ArtifactLayout(args.base)
    if (record := base.hf_dir / "import.json").exists() and json.loads(record.read_text()).get("adapter"):
        # An adapter trained on a merged fine-tune would not apply to the plain base it ships with.
        p.error(
            f"{args.base} already has an adapter merged in; "
            "tune the untuned base (feedserve --artifacts DIR build --untuned)"
        )
    settings = EncoderSettings.load(base.settings)
    if args.max_prompt_tokens:
        settings = replace(settings, max_prompt_tokens=args.max_prompt_tokens)
    if args.raw_counts:
        settings = replace(settings, count_format="raw")
    if args.history_negatives:
        settings = replace(settings, prompt_history="all")  # the prompts must show what was added
    if args.data == "movielens":
        ml = load_movielens(SAMPLE_CORPUS)
        split = movielens_split(ml, history_negatives=args.history_negatives)
        examples, corpus, buckets = split.train, split.corpus, PercentileBuckets.fit_posts(split.corpus)
    else:
        syn = synthetic_feed()
        examples, corpus, buckets = syn.train, syn.posts, PercentileBuckets.fit_posts(syn.posts)
    result = train(base.hf_dir, args.out, examples, corpus, buckets, settings, cfg, device=args.device)
    print(
        json.dumps(
            {
                "model": str(result.model_dir),
                "seconds": result.seconds,
                "peak_rss_mb": result.peak_rss_mb,
                "first_loss": result.losses[0],
                "last_loss": result.losses[-1],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
