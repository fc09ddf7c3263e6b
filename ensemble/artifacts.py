"""Where built artifacts live, and the serving settings saved beside them.

An artifact directory (default `artifacts/default/`, or `$FEEDSERVE_ARTIFACTS`) holds everything
the server loads; export writes it, the Triton backends and the clients read it:

    hf/                 Hugging Face checkpoint (LlamaModel weights + tokenizer files)
    encoder.onnx        ONNX graph: LLaMA + pooling + L2 norm + Matryoshka truncation
    encoder.onnx.data   external weights, only for models over 2 GB
    encoder.int8.onnx   the same graph with int8 projection weights (parity checked), for CPUs
    buckets.json        percentile cut points for engagement counts (feedserve.prompt.buckets)
    serving.json        EncoderSettings below: pooling, dimension, token budgets
    ranker.onnx         the GR ranker (feedserve.rank), ONNX, parity checked (feedserve.export.rank)
    ranker.json         its configuration: content width, history length, features, tasks
    ranker.pt           its weights (PyTorch): what `rank` runs on a GPU
    post_features.json  count percentiles and tags by post id, the ranker's candidate features
    coengagement.npz    who engaged with each post before the training cutoff: the co-engagement feature
    manifest.json       size and SHA-256 of each file above but the index, checked at load (feedserve.ops.manifest)
    index/              the live post index (feedserve.index.layout: snapshot, write-ahead log, locks)
    write.key           the live index's write key, made by the first server start (feedserve.ops.keys)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from feedserve.files import atomic_write
from feedserve.index.layout import IndexLayout

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS_ENV = "FEEDSERVE_ARTIFACTS"

# A fine-tuned model ships as a small package instead of a full checkpoint: a LoRA adapter
# (adapter_config.json, adapter_model.safetensors) plus this file (how the base was cut, which base
# it was trained on) and the run's buckets.json and serving.json. `feedserve build --adapter DIR`
# merges it into the base; `feedserve.training.train` writes it as RUN/adapter/.
ADAPTER_META = "feedserve_adapter.json"
INT8_ONNX = "encoder.int8.onnx"
DEFAULT_ADAPTER = REPO_ROOT / "models" / "smollm2-movielens"
# The trained ranker shipped with the default model (ranker.json + ranker.pt; `feedserve.training.rank`
# wrote it, its command in models/gr-movielens/README.md); `feedserve build` exports it.
DEFAULT_RANKER = REPO_ROOT / "models" / "gr-movielens"

Pooling = Literal["mean", "last"]
CountFormat = Literal["percentile", "raw"]
PromptHistory = Literal["engaged", "all"]


@dataclass
class EncoderSettings:
    """How prompts are built and embedded; one copy shared by export, serving and training."""

    pooling: Pooling = "mean"
    # Matryoshka truncation: keep the first `dim` dimensions and renormalise (None = full size).
    dim: int | None = None
    # Hard cap on a prompt's tokens; longer prompts are cut (members: oldest history first).
    max_prompt_tokens: int = 512
    # Token budget for a post's free text inside its own prompt and inside a member's history.
    post_text_tokens: int = 192
    history_item_tokens: int = 48
    # Engaged posts kept in a member prompt at most (newest kept), before the token budget applies.
    max_history_items: int = 50
    # Rows of a batch are padded to the next of these lengths, so that same-bucket requests batch.
    length_buckets: tuple[int, ...] = (32, 64, 128, 256, 512)
    # Engagement counts as percentile tokens (the default, as in the system we reproduce) or as the
    # raw numbers, kept only for the ablation that shows why percentiles are used.
    count_format: CountFormat = "percentile"
    # Which history items a member prompt shows: "engaged" (the default, as in the system we
    # reproduce; negatives in the record are for the ranker) or "all", kept for the ablation that
    # trains on histories with disliked posts in them.
    prompt_history: PromptHistory = "engaged"
    schema_version: int = 1
    extra: dict[str, str] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> EncoderSettings:
        """ValueError naming the file when it is not settings this version reads."""
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: not serving settings this feedserve reads ({err})") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderSettings:
        """Settings saved by this or an earlier version (a field added since takes its default)."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown settings {unknown} (written by a newer feedserve?)")
        data = dict(data)
        data["length_buckets"] = tuple(data.get("length_buckets", cls.length_buckets))
        return cls(**data)


@dataclass(frozen=True)
class ArtifactLayout:
    root: Path

    @property
    def hf_dir(self) -> Path:
        return self.root / "hf"

    @property
    def tokenizer(self) -> Path:
        return self.hf_dir / "tokenizer.json"

    @property
    def onnx(self) -> Path:
        return self.root / "encoder.onnx"

    @property
    def onnx_int8(self) -> Path:
        return self.root / INT8_ONNX

    @property
    def buckets(self) -> Path:
        return self.root / "buckets.json"

    @property
    def settings(self) -> Path:
        return self.root / "serving.json"

    @property
    def ranker_onnx(self) -> Path:
        return self.root / "ranker.onnx"

    @property
    def ranker_config(self) -> Path:
        return self.root / "ranker.json"

    @property
    def ranker_weights(self) -> Path:
        """The ranker's PyTorch weights (ranker.pt beside ranker.json: a saved GenerativeRanker),
        what the GPU variants' `rank` runs."""
        return self.root / "ranker.pt"

    @property
    def post_features(self) -> Path:
        return self.root / "post_features.json"

    @property
    def coengagement(self) -> Path:
        return self.root / "coengagement.npz"

    @property
    def index_dir(self) -> IndexLayout:
        return IndexLayout(self.root / "index")

    @property
    def index(self) -> Path:
        """The index's snapshot file (the one `feedserve index` writes)."""
        return self.index_dir.snapshot

    def model_config(self) -> dict[str, object]:
        """The checkpoint's config.json."""
        return dict(json.loads((self.hf_dir / "config.json").read_text()))

    def vocab_size(self) -> int:
        return int(self.model_config()["vocab_size"])  # type: ignore[call-overload]

    def serving_dim(self) -> int:
        """The width of the served embeddings: the Matryoshka `dim`, else the model's hidden size."""
        return EncoderSettings.load(self.settings).dim or int(self.model_config()["hidden_size"])  # type: ignore[call-overload]

    def verify_serving_settings(self) -> None:
        """Check the serving settings and the model's config against the manifest (what a backend
        reads beside its graph or index)."""
        self.verify(self.settings, self.hf_dir / "config.json")

    def verified_serving_dim(self) -> int:
        """`serving_dim`, its two files checked against the manifest first."""
        self.verify_serving_settings()
        return self.serving_dim()

    def required_for_serving(self) -> list[Path]:
        return [self.tokenizer, self.onnx, self.buckets, self.settings]

    def ranker_files(self) -> list[Path]:
        """What every `rank` reads (the GPU variants' read `ranker_weights` too, which a build before
        them did not write: the CPU variant ranks without it)."""
        return [self.ranker_onnx, self.ranker_config, self.post_features, self.coengagement]

    def built_ranker_files(self) -> list[Path]:
        """What `feedserve build` writes for a ranker: every rank's files and the PyTorch weights."""
        return [*self.ranker_files(), self.ranker_weights]

    def has_ranker(self) -> bool:
        """Whether a ranker was built here: only an encoder with a ranker trained on its embeddings
        has one (`feedserve build` ships the default's); without one the server retrieves only."""
        return all(p.exists() for p in self.ranker_files())

    def built_files(self) -> list[Path]:
        """What `feedserve build` produces and the manifest lists (the checkpoint directory whole)."""
        optional = [self.onnx.with_name(self.onnx.name + ".data"), self.onnx_int8]
        optional += self.built_ranker_files()
        return [self.hf_dir, self.onnx, self.buckets, self.settings, *(p for p in optional if p.exists())]

    def write_manifest(self) -> Path:
        from feedserve.ops.manifest import write_manifest

        return write_manifest(self.root, self.built_files())

    def verify(self, *paths: Path) -> int:
        """Check these files (default: every one the manifest lists, and every built file there is,
        listed or not: a graph the manifest leaves out is refused here, not by a backend after the
        server started) against the manifest; feedserve.ops.manifest.ManifestError names the first
        that differs."""
        from feedserve.ops.manifest import verify

        if paths:
            return verify(self.root, paths)
        return verify(self.root, None, also=self.built_files())

    def missing(self) -> list[Path]:
        return [p for p in self.required_for_serving() if not p.exists()]


def default_artifacts_dir() -> Path:
    return Path(os.environ.get(ARTIFACTS_ENV, REPO_ROOT / "artifacts" / "default")).resolve()
