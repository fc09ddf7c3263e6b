"""Carry a real checkpoint to the lent GPU machine, whose working tree is limited to 64 MiB.

SmolLM2-135M is 538 MB in fp32; the GPU work needs only its first N layers (training and serving
keep 6) and only the token embeddings that the prompts it will see actually use. `pack` writes
those in bf16 (about 53 MB for 6 layers and the ~9k tokens of MovieLens); `unpack` rebuilds a
plain fp32 HF checkpoint there. Rows that were not carried are NaN, not zero, so a prompt that uses
one poisons its embedding and the run fails loudly instead of training on a wrong input.

    python -m feedserve.training.device_bundle pack --hf artifacts/untuned/hf --layers 6 --out .device/base
    python -m feedserve.training.device_bundle unpack --bundle .device/base --out /tmp/base/hf   # on the GPU machine

bf16 is exact for what runs under bf16 autocast there (every matmul casts its weights to bf16);
the embedding rows and norms lose fp32 digits, which is why the numbers that count are taken back
on the CPU, with the fp32 base.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import shutil
import sys
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

WEIGHTS = "weights.safetensors"
EMBED = "embed_tokens.weight"
TOKENIZER_GZ = "tokenizer.json.gz"
COPIED = ("config.json", "import.json", "tokenizer_config.json", "special_tokens_map.json")


def pack(hf_dir: Path, out: Path, layers: int, token_ids: Iterable[int]) -> int:
    """Write the bundle; returns its size in bytes."""
    config = json.loads((hf_dir / "config.json").read_text())
    state = load_file(str(hf_dir / "model.safetensors"))
    keep = {k: v for k, v in state.items() if not k.startswith("layers.") or int(k.split(".")[1]) < layers}
    ids = torch.tensor(sorted(set(token_ids)), dtype=torch.int64)
    keep[EMBED + ".rows"] = keep.pop(EMBED)[ids]
    keep[EMBED + ".ids"] = ids
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v if v.dtype == torch.int64 else v.to(torch.bfloat16) for k, v in keep.items()}, str(out / WEIGHTS))
    for name in COPIED:
        if (hf_dir / name).exists():
            shutil.copy(hf_dir / name, out / name)
    config["num_hidden_layers"] = layers
    if config.get("layer_types"):
        config["layer_types"] = config["layer_types"][:layers]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / TOKENIZER_GZ).write_bytes(gzip.compress((hf_dir / "tokenizer.json").read_bytes()))
    size = sum(f.stat().st_size for f in out.iterdir())
    logger.info("packed %d layers, %d of %d token rows: %.1f MB", layers, len(ids), config["vocab_size"], size / 1e6)
    return size


def unpack(bundle: Path, hf_out: Path) -> Path:
    """Rebuild an fp32 HF checkpoint from a bundle; uncarried embedding rows are NaN."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(bundle / WEIGHTS)).items()}
    config = json.loads((bundle / "config.json").read_text())
    rows, ids = state.pop(EMBED + ".rows"), state.pop(EMBED + ".ids")
    embed = torch.full((config["vocab_size"], rows.shape[1]), float("nan"))
    embed[ids] = rows
    state[EMBED] = embed
    hf_out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(hf_out / "model.safetensors"), metadata={"format": "pt"})
    for name in COPIED:
        if (bundle / name).exists():
            shutil.copy(bundle / name, hf_out / name)
    (hf_out / "tokenizer.json").write_bytes(gzip.decompress((bundle / TOKENIZER_GZ).read_bytes()))
    return hf_out


def movielens_token_ids(hf_dir: Path, serving: Path) -> set[int]:
    """Every token id of every MovieLens post prompt and member prompt (train and test), plus the
    special tokens (padding runs through the layers too)."""
    from tokenizers import Tokenizer

    from feedserve.artifacts import EncoderSettings
    from feedserve.ops.builder import SAMPLE_CORPUS
    from feedserve.prompt.builder import PromptBuilder
    from feedserve.prompt.movielens import load_movielens
    from feedserve.training.data import movielens_split

    ml = load_movielens(SAMPLE_CORPUS)
    tokenizer = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    used = set(tokenizer.get_added_tokens_decoder())
    for raw in (False, True):  # percentile tokens, and the raw-count ablation
        settings = EncoderSettings.load(serving)
        builder = PromptBuilder(tokenizer, ml.fit_buckets(), replace(settings, count_format="raw") if raw else settings)
        split = movielens_split(ml)
        texts = [builder.post_prompt(p) for p in split.corpus]
        texts += [builder.member_prompt(e.member) for e in split.train] + [
            builder.member_prompt(c.member) for c in split.test
        ]
        for enc in tokenizer.encode_batch(texts):
            used.update(enc.ids)
    return used


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--hf", type=Path, required=True)
    a.add_argument(
        "--serving",
        type=Path,
        default=Path("models/smollm2-movielens/serving.json"),
        help="prompt settings whose MovieLens prompts decide the token rows carried",
    )
    a.add_argument("--layers", type=int, default=6)
    a.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("unpack")
    b.add_argument("--bundle", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.command == "pack":
        pack(args.hf, args.out, args.layers, movielens_token_ids(args.hf, args.serving))
    else:
        unpack(args.bundle, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
