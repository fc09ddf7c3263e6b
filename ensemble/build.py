"""Build the artifacts the server loads: import the checkpoint, export ONNX, fit the buckets.

Each step is skipped when its output is already there and up to date, so `feedserve build` (and the
demo, which calls it) is cheap the second time.

With an adapter package (the default build uses the bundled MovieLens fine-tune,
`models/smollm2-movielens`) the package's serving settings and buckets are used as they are: the
model must see prompts cut and bucketed exactly as in training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from feedserve.artifacts import DEFAULT_ADAPTER, REPO_ROOT, ArtifactLayout, EncoderSettings
from feedserve.buckets import PercentileBuckets

logger = logging.getLogger(__name__)

SAMPLE_CORPUS = REPO_ROOT / "data" / "movielens-latest-small"


@dataclass
class BuildOptions:
    artifacts: Path
    source: Path | None = None  # a .gguf file or a local HF checkpoint; None = bundled SmolLM2
    settings: EncoderSettings | None = None  # None = keep the saved settings (or defaults)
    corpus: Path = SAMPLE_CORPUS  # MovieLens directory the buckets are fitted on
    force: bool = False
    buckets: Path | None = None  # a saved buckets.json (e.g. a training run's), used unchanged
    adapter: Path | None = None  # a fine-tuning package to merge (see feedserve.artifacts.ADAPTER_META)


def resolve_adapter(source: Path | None, adapter: Path | None, untuned: bool = False) -> Path | None:
    """The adapter a build merges: the one asked for, else the bundled fine-tune when the base is
    the bundled SmolLM2 (the checkpoint it was trained on), else none."""
    if untuned:
        return None
    if adapter is not None:
        return adapter
    if source is None and DEFAULT_ADAPTER.is_dir():
        return DEFAULT_ADAPTER
    return None


def build_artifacts(opts: BuildOptions) -> ArtifactLayout:
    from feedserve.export.import_model import default_gguf_path, import_checkpoint
    from feedserve.export.onnx import export_onnx
    from feedserve.movielens import load_movielens

    layout = ArtifactLayout(opts.artifacts)
    layout.root.mkdir(parents=True, exist_ok=True)
    settings, buckets = opts.settings, opts.buckets
    if opts.adapter is not None:
        settings = settings or EncoderSettings.load(opts.adapter / "serving.json")
        buckets = buckets or opts.adapter / "buckets.json"
    if settings is None:
        settings = EncoderSettings.load(layout.settings) if layout.settings.exists() else EncoderSettings()
    settings_changed = not layout.settings.exists() or EncoderSettings.load(layout.settings) != settings
    settings.save(layout.settings)

    imported = import_checkpoint(opts.source or default_gguf_path(), layout.hf_dir, adapter=opts.adapter)
    if opts.force or imported or settings_changed or not layout.onnx.exists():
        export_onnx(layout.hf_dir, settings, layout.onnx)
        if layout.index.exists():
            # Its vectors came from the previous model and are not comparable with the new one's.
            layout.index.unlink()
            logger.warning("removed %s: it was built with the previous model; re-run `feedserve index`", layout.index)
    else:
        logger.info("ONNX model up to date: %s", layout.onnx)
    if buckets is not None:
        # Validate before copying: serving must use exactly the cut points the model was trained with.
        PercentileBuckets.load(buckets).save(layout.buckets)
    elif opts.force or not layout.buckets.exists():
        load_movielens(opts.corpus).fit_buckets().save(layout.buckets)
        logger.info("fitted percentile buckets on %s", opts.corpus)
    return layout
