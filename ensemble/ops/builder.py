"""Build the artifacts the server loads: import the checkpoint, export ONNX, fit the buckets.

Each step is skipped when its output is already there and up to date, so `feedserve build` (and the
demo, which calls it) is cheap the second time.

With an adapter package (the default build uses the bundled MovieLens fine-tune,
`models/smollm2-movielens`) the package's serving settings and buckets are used as they are: the
model must see prompts cut and bucketed exactly as in training.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from feedserve.artifacts import DEFAULT_ADAPTER, DEFAULT_RANKER, REPO_ROOT, ArtifactLayout, EncoderSettings, Pooling
from feedserve.prompt.buckets import PercentileBuckets

if TYPE_CHECKING:
    from feedserve.rank.coengagement import CoEngagement
    from feedserve.rank.features import PostFeatures

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
    dim: int | None = None  # Matryoshka dimension to serve, over the settings above
    pooling: Pooling | None = None  # must agree with an adapter's: a model is trained for one pooling
    ranker: Path | None = None  # a trained ranker (ranker.json + ranker.pt) for this encoder's embeddings


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


def resolve_ranker(adapter: Path | None, ranker: Path | None, dim: int | None = None) -> Path | None:
    """The ranker a build exports: the one asked for, else the shipped one when the encoder is the
    bundled fine-tune at full width (the embeddings it was trained on), else none: a ranker reads
    one encoder's vectors and is meaningless over another's."""
    if ranker is not None:
        return ranker
    if adapter is not None and adapter.resolve() == DEFAULT_ADAPTER.resolve() and dim is None:
        return DEFAULT_RANKER if DEFAULT_RANKER.is_dir() else None
    return None


def build_ranker(layout: ArtifactLayout, package: Path | None, corpus: Path, force: bool = False) -> None:
    """Export `package`'s ranker (ranker.onnx, parity checked) with its ranker.json, and the post
    feature and co-engagement tables of `corpus` (a MovieLens directory, or a feed log:
    feedserve.training.feed_log); redone only when what they are made from (the exporting code
    included) changed. Without a package, a ranker left from an earlier build is removed (it read
    the previous encoder's vectors)."""
    from feedserve.export.rank import export_ranker
    from feedserve.files import atomic_write, sha256_file
    from feedserve.rank.model import CONFIG_FILE, COUNT_BUCKETS_FILE, WEIGHTS_FILE, GenerativeRanker

    record = layout.root / "ranker_export.json"
    if package is None:
        for path in (*layout.built_ranker_files(), record):
            if path.exists():
                path.unlink()
                logger.warning("removed %s: no ranker was trained for this encoder (`--ranker DIR`)", path)
        return
    model = GenerativeRanker.load(package)
    served = layout.serving_dim()
    if model.config.content_dim != served:
        raise ValueError(
            f"{package}: the ranker reads {model.config.content_dim}-wide embeddings; this encoder serves {served}"
        )
    from feedserve.export import rank as exporter
    from feedserve.prompt import movielens
    from feedserve.rank import coengagement, data, features
    from feedserve.rank import model as graph
    from feedserve.training import feed_log

    # The counts cut as the ranker was trained with: its own cut points where it shipped them, else
    # the encoder's (MovieLens's ranker reads the prompts' counts).
    count_buckets = package / COUNT_BUCKETS_FILE if (package / COUNT_BUCKETS_FILE).exists() else layout.buckets
    source = {
        # The code that writes the graph and the tables too: a faster or fixed one reaches built artifacts.
        "code": [
            sha256_file(Path(m.__file__ or ""))
            for m in (graph, exporter, features, coengagement, data, movielens, feed_log)
        ],
        "ranker": sha256_file(package / WEIGHTS_FILE),
        "config": sha256_file(package / CONFIG_FILE),
        "corpus": str(corpus.resolve()),
        "buckets": sha256_file(count_buckets),
    }
    done = _state(record)
    if not force and done == source and all(p.exists() for p in layout.built_ranker_files()):
        logger.info("ranker up to date: %s", layout.ranker_onnx)
        return
    buckets, counts = PercentileBuckets.load(count_buckets), data.counts_read(model.config.features)
    uncut = [c for c in counts if c not in buckets.cut_points]
    if uncut:  # they would read 0 for every post
        raise ValueError(f"{package}: the ranker reads the counts {uncut}, which {count_buckets} has no cut points for")
    table, engaged = ranker_tables(corpus, buckets, counts)
    export_ranker(model, layout.ranker_onnx)
    model.save(layout.root)  # ranker.json and ranker.pt: the GPU variants run the PyTorch model
    table.save(layout.post_features)
    engaged.save(layout.coengagement)
    atomic_write(record, json.dumps(source, indent=1) + "\n")
    logger.info("ranker from %s exported to %s", package, layout.ranker_onnx)


def ranker_tables(corpus: Path, buckets: PercentileBuckets, counts: Sequence[str]) -> tuple[PostFeatures, CoEngagement]:
    """The ranker's post features (these counts, as percentiles of `buckets`, and tags) and
    co-engagement, of the training period of `corpus` only: the test period stays unseen."""
    from feedserve.prompt.movielens import load_movielens
    from feedserve.rank.data import movielens_coengagement
    from feedserve.rank.features import COUNT_FEATURES, PostFeatures
    from feedserve.training.feed_log import COUNTS, is_feed_log, load_feed_log

    feed = is_feed_log(corpus)
    held = COUNTS if feed else COUNT_FEATURES
    if not set(counts) <= set(held):  # a ranker trained on another corpus: its counts would all be 0
        raise ValueError(f"the ranker reads the counts {list(counts)}; {corpus} has {list(held)}")
    if feed:
        return load_feed_log(corpus).serving_tables(buckets, counts)
    ml = load_movielens(corpus)
    cutoff = ml.cutoff()
    return PostFeatures.from_posts(ml.posts(cutoff), buckets, counts), movielens_coengagement(ml, cutoff)


def corpus_buckets(corpus: Path) -> PercentileBuckets:
    """The prompts' percentile buckets fitted on `corpus`: MovieLens's movies' counts, or a feed
    log's counts at its cutoff."""
    from feedserve.prompt.movielens import load_movielens
    from feedserve.training.feed_log import is_feed_log, load_feed_log

    if is_feed_log(corpus):
        log = load_feed_log(corpus)
        return log.count_buckets(log.cutoff())
    return load_movielens(corpus).fit_buckets()


def resolve_settings(opts: BuildOptions, layout: ArtifactLayout, force: bool = False) -> EncoderSettings:
    """The serving settings: given ones, else the adapter's (what it was trained with), else the
    saved ones, else defaults; then --dim / --pooling on top. A pooling the adapter was not
    trained with is refused. Saved settings that do not read are refused by name, or with `force`
    replaced by the defaults."""
    settings = opts.settings
    if settings is None and opts.adapter is not None:
        settings = EncoderSettings.load(opts.adapter / "serving.json")
    if settings is None:
        settings = _saved_settings(layout, force) or EncoderSettings()
    if opts.pooling and opts.adapter is not None and opts.pooling != settings.pooling:
        raise ValueError(f"{opts.adapter} was trained with {settings.pooling} pooling; it cannot serve {opts.pooling}")
    return replace(
        settings, dim=opts.dim if opts.dim is not None else settings.dim, pooling=opts.pooling or settings.pooling
    )


def _saved_settings(layout: ArtifactLayout, force: bool) -> EncoderSettings | None:
    """The settings an earlier build saved (None: none). When they do not read (a build killed while
    writing them), those the encoder was last exported with; else, with `force`, none (the
    defaults, said so), without it ValueError naming the file."""
    if not layout.settings.exists():
        return None
    try:
        return EncoderSettings.load(layout.settings)
    except ValueError as err:
        exported = _exported_from(layout)
        if exported is not None and isinstance(exported[1], dict):
            logger.warning("%s; rebuilding with the settings the encoder was last exported with", err)
            return EncoderSettings.from_dict(exported[1])
        if not force:
            raise ValueError(f"{err}; `feedserve build --force` rebuilds it from the defaults") from None
        logger.warning("%s; rebuilding from the default settings", err)
        return None


def _state(path: Path) -> Any:
    """A build record's JSON (an import, export or ranker record), None when there is none or it
    does not read (a build killed while writing it): what it vouched for is then redone."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        logger.warning("%s does not read (%s): redoing what it records", path, err)
        return None


def _import_record(layout: ArtifactLayout) -> dict[str, object] | None:
    record = _state(layout.hf_dir / "import.json")
    return record if isinstance(record, dict) else None


def _exported_from(layout: ArtifactLayout) -> tuple[object, object] | None:
    """(import record of the checkpoint, settings) the current ONNX model was exported with: the
    model's identity, which the index's vectors belong to; None when unknown."""
    data = _state(layout.root / "export_report.json")
    if not isinstance(data, dict):
        return None
    settings = data.get("settings")
    if isinstance(settings, dict):
        # As this version spells them: a settings field added since is not a different model.
        try:
            settings = json.loads(json.dumps(asdict(EncoderSettings.from_dict(settings))))
        except (ValueError, TypeError):
            return None
    extra = data.get("extra")
    return extra.get("hf_import") if isinstance(extra, dict) else None, settings


def _quantize(layout: ArtifactLayout) -> None:
    """The int8 graph beside the fp32 one; optional, so a failed parity check is a warning."""
    from feedserve.export.onnx import ParityError, quantize_int8

    try:
        quantize_int8(layout.onnx, layout.onnx_int8, layout.vocab_size())
    except ParityError as err:
        logger.warning("no int8 encoder: the server runs the fp32 graph (int8 failed its parity check: %s)", err)


def _damaged(layout: ArtifactLayout) -> bool:
    """Whether files differ from the manifest of an earlier build: the up-to-date checks below look
    at what a file was built from, not at its bytes, so they would keep a damaged file and the new
    manifest would vouch for it. Everything is rebuilt instead."""
    from feedserve.ops.manifest import MANIFEST, ManifestError

    if not (layout.root / MANIFEST).exists():
        return False
    try:
        layout.verify()
    except ManifestError as err:
        logger.warning("rebuilding every artifact: %s", err)
        return True
    return False


def build_artifacts(opts: BuildOptions) -> ArtifactLayout:
    layout = ArtifactLayout(opts.artifacts)
    layout.root.mkdir(parents=True, exist_ok=True)
    with _no_index_writer(layout):
        return _build(opts, layout)


@contextmanager
def _no_index_writer(layout: ArtifactLayout) -> Iterator[None]:
    """Hold the index's writer lock for the build: a build may retire the index (built with the
    previous model), and a server writing it would go on serving, and logging, the old model's
    vectors under the new one."""
    from feedserve.index.live import wait_for_lock

    if not layout.index_dir.root.is_dir():
        yield
        return
    lock = wait_for_lock(layout.index_dir.writer_lock, 0.0)
    if lock is None:
        raise ValueError(
            f"a server is writing {layout.index_dir.root} (it holds {layout.index_dir.writer_lock}): "
            "stop it before building these artifacts"
        )
    try:
        yield
    finally:
        os.close(lock)


def _check_widths(opts: BuildOptions, layout: ArtifactLayout, settings: EncoderSettings) -> None:
    """Before anything is written: the Matryoshka width within the model's, and a ranker that reads
    the width served (a build that failed these after the export had already retired the index)."""
    from feedserve.rank.model import CONFIG_FILE, RankerConfig

    hidden = int(layout.model_config()["hidden_size"])  # type: ignore[call-overload]
    if settings.dim is not None and not 1 <= settings.dim <= hidden:
        raise ValueError(f"Matryoshka dim must be in [1, {hidden}] for this model, got {settings.dim}")
    if opts.ranker is not None:
        content = RankerConfig.load(opts.ranker / CONFIG_FILE).content_dim
        if content != (settings.dim or hidden):
            raise ValueError(
                f"{opts.ranker}: the ranker reads {content}-wide embeddings; this encoder would serve "
                f"{settings.dim or hidden}"
            )


def _build(opts: BuildOptions, layout: ArtifactLayout) -> ArtifactLayout:
    from feedserve.export.import_model import default_gguf_path, import_checkpoint
    from feedserve.export.onnx import export_onnx
    from feedserve.files import remove_stale_exports

    remove_stale_exports(layout.root)
    force = opts.force or _damaged(layout)
    settings = resolve_settings(opts, layout, force)
    buckets = opts.buckets or (opts.adapter / "buckets.json" if opts.adapter is not None else None)
    previous = _exported_from(layout)
    imported = import_checkpoint(opts.source or default_gguf_path(), layout.hf_dir, force=force, adapter=opts.adapter)
    _check_widths(opts, layout, settings)
    settings_changed = _saved_settings(layout, force=True) != settings
    settings.save(layout.settings)
    model = (_import_record(layout), json.loads(json.dumps(asdict(settings))))
    if force or imported or settings_changed or not layout.onnx.exists() or previous != model:
        # Comparing with what the ONNX model was exported from, not just `imported` and
        # `settings_changed`, also redoes an export that failed after an import or a settings change.
        export_onnx(layout.hf_dir, settings, layout.onnx, extra={"hf_import": model[0]})
        layout.onnx_int8.unlink(missing_ok=True)  # quantized from the previous export
        # The same model re-exported (a forced or repairing build) keeps the index and its live writes.
        stale = [p for p in (layout.index_dir.snapshot, layout.index_dir.log) if p.exists() and previous != model]
        for path in stale:
            # Its vectors came from the previous model and are not comparable with the new one's
            # (the live index's log too: replayed, it would mix the two models' vectors).
            path.unlink()
            logger.warning("removed %s: it was built with the previous model; re-run `feedserve index`", path)
    else:
        logger.info("ONNX model up to date: %s", layout.onnx)
    if not layout.onnx_int8.exists():
        _quantize(layout)
    if buckets is not None:
        # Validate before copying: serving must use exactly the cut points the model was trained with.
        PercentileBuckets.load(buckets).save(layout.buckets)
    elif force or not layout.buckets.exists():
        corpus_buckets(opts.corpus).save(layout.buckets)
        logger.info("fitted percentile buckets on %s", opts.corpus)
    build_ranker(layout, opts.ranker, opts.corpus, force)
    layout.write_manifest()
    return layout
