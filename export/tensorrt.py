"""ONNX -> TensorRT engine for the `gpu-trt` repository variant, parity checked against PyTorch.

    python -m feedserve.export.tensorrt build  --artifacts artifacts/default --precision fp16
    python -m feedserve.export.tensorrt ensure --artifacts /artifacts --plan /models/encoder/1/model.plan

The engine is built with the TensorRT Python API from the exported ONNX graph, whose inputs and
output are first renamed to the schema's tensor names (INPUT_IDS, ATTENTION_MASK, EMBEDDING) so
that Triton's `tensorrt_plan` model plugs into the same ensembles as the python encoders. One
optimisation profile covers batch 1..max_batch and tokens 1..max_prompt_tokens, tuned for an
"opt" shape. Under fp16/bf16 the layers of RMSNorm and pooling that square, reduce and take roots
are pinned to fp32 (a sum of squares of 576 activations overflows fp16's 65,504). A timing cache
makes rebuilds fast. Beside the plan, `<plan>.json` records what it was built from and for
(TensorRT version, GPU, compute capability, precision, profile, source checksum); `ensure` rebuilds
when any of them no longer matches, which is what the container's entrypoint runs at start.

Where TensorRT or a GPU is absent, `unavailable_reason()` says which, the commands exit with status
3 and that sentence, and the tests skip with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from feedserve.artifacts import ArtifactLayout, EncoderSettings
from feedserve.encode.trt import EngineBuildError, TensorRTEncoder, TensorRTUnavailable, unavailable_reason
from feedserve.export.onnx import PROTOBUF_LIMIT, ParityError, compare_encoders, parity_batches
from feedserve.files import atomic_write, sha256_file
from feedserve.schema import ATTENTION_MASK, EMBEDDING, INPUT_IDS, ONNX_INPUTS, ONNX_OUTPUT

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "fp8")  # fp8: explicitly quantized (Q/DQ) graphs only
UNAVAILABLE_EXIT = 3
TRITON_NAMES = {ONNX_INPUTS[0]: INPUT_IDS.name, ONNX_INPUTS[1]: ATTENTION_MASK.name, ONNX_OUTPUT: EMBEDDING.name}


@dataclass(frozen=True)
class Profile:
    """min/opt/max of the two dynamic axes (the same for both inputs)."""

    batch: tuple[int, int, int]
    tokens: tuple[int, int, int]

    @classmethod
    def for_settings(cls, settings: EncoderSettings, max_batch: int, opt_batch: int = 32) -> Profile:
        # Optimise for the middle length bucket: MovieLens posts are ~100 tokens, members 256.
        from feedserve.prompt.builder import pad_length

        buckets = sorted(settings.length_buckets)
        # Preprocess pads up to a bucket, which can exceed the token budget when the budget is no bucket.
        longest = pad_length(settings.max_prompt_tokens, buckets)
        opt_tokens = min(buckets[len(buckets) // 2], longest)
        return cls((1, min(opt_batch, max_batch), max_batch), (1, opt_tokens, longest))

    def shapes(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        return tuple((b, t) for b, t in zip(self.batch, self.tokens, strict=True))  # type: ignore[return-value]


@dataclass(frozen=True)
class EngineOptions:
    precision: str = "fp16"
    profile: Profile = Profile((1, 32, 64), (1, 128, 512))
    workspace_gib: float = 4.0
    fp32_norms: bool = True

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


def rename_io(src: Path, dst: Path) -> Path:
    """Copy an exported ONNX graph with its inputs/output named as Triton's schema names them."""
    import onnx

    model = onnx.load(str(src))
    graph = model.graph
    for value in [*graph.input, *graph.output]:
        value.name = TRITON_NAMES.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [TRITON_NAMES.get(n, n) for n in node.input]
        node.output[:] = [TRITON_NAMES.get(n, n) for n in node.output]
    names = {v.name for v in [*graph.input, *graph.output]}
    if not set(TRITON_NAMES.values()) <= names:
        raise EngineBuildError(
            f"{src}: expected inputs {list(ONNX_INPUTS)} and output {ONNX_OUTPUT!r}, found {sorted(names)}"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > PROTOBUF_LIMIT
    onnx.save_model(model, str(dst), save_as_external_data=large, location=dst.name + ".data" if large else None)
    return dst


def _gpu() -> dict[str, object]:
    import torch

    return {"name": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}


def expected_meta(onnx_path: Path, options: EngineOptions) -> dict[str, object]:
    """What a plan built now, here, from `onnx_path` would record (the fields `ensure` compares)."""
    import tensorrt as trt

    return {
        "tensorrt": trt.__version__,
        "gpu": _gpu(),
        "precision": options.precision,
        "profile": asdict(options.profile),
        "fp32_norms": options.fp32_norms,
        "source_sha256": onnx_checksum(onnx_path),
    }


def onnx_checksum(onnx_path: Path) -> str:
    """The graph and, for large models, its external weights: new weights must rebuild the plan."""
    data = onnx_path.with_name(onnx_path.name + ".data")
    digest = sha256_file(onnx_path)
    return digest if not data.exists() else f"{digest}+{sha256_file(data)}"


def stale_fields(meta_path: Path, expected: dict[str, object]) -> list[str]:
    """Fields of a plan's metadata that differ from `expected`; ["plan"] when there is none, and
    ["parity"] for a plan whose check never finished (metadata is written only after it passes)."""
    if not meta_path.exists() or not meta_path.with_suffix("").exists():
        return ["plan"]
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        return ["metadata"]
    if "parity" not in meta:
        return ["parity"]
    if meta.get("plan_sha256") != sha256_file(meta_path.with_suffix("")):
        return ["plan_sha256"]  # truncated, corrupted or replaced since it passed its check
    return [
        key for key, value in expected.items() if json.loads(json.dumps(meta.get(key))) != json.loads(json.dumps(value))
    ]


def _pin_norms_to_fp32(network: Any) -> int:
    """Square, reduce and root layers (RMSNorm, mean pooling, L2 norm) compute in fp32."""
    import tensorrt as trt

    floating = (trt.float32, trt.float16, trt.bfloat16)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.num_inputs == 0 or layer.get_input(0) is None or layer.get_input(0).dtype not in floating:
            continue  # integer layers (the mask's token count) keep their type
        # get_layer returns the base ILayer; the operation lives on the subclass.
        if layer.type == trt.LayerType.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer
            pin = layer.op == trt.ElementWiseOperation.POW
        elif layer.type == trt.LayerType.UNARY:
            layer.__class__ = trt.IUnaryLayer
            pin = layer.op in (trt.UnaryOperation.SQRT, trt.UnaryOperation.RECIP)
        else:
            pin = layer.type == trt.LayerType.REDUCE
        if pin:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_engine(
    onnx_path: Path, plan_path: Path, options: EngineOptions, timing_cache: Path | None = None
) -> dict[str, object]:
    """Build `plan_path` (written atomically); returns its metadata, which the caller writes to
    `<plan>.json` once the plan has passed its parity check."""
    if reason := unavailable_reason(options.precision):
        raise TensorRTUnavailable(reason)
    import tensorrt as trt

    t0 = time.perf_counter()
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, trt_logger)
    renamed = plan_path.with_name(plan_path.stem + ".onnx")
    try:
        rename_io(onnx_path, renamed)
        if options.precision == "fp8" and not _has_qdq(renamed):
            # TensorRT 10 runs fp8 only where the graph says so (explicit quantization).
            raise EngineBuildError(
                "fp8 needs an explicitly quantized ONNX graph (QuantizeLinear/DequantizeLinear nodes); "
                f"{onnx_path} has none: use fp16 or bf16"
            )
        if not parser.parse_from_file(str(renamed)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineBuildError(f"TensorRT could not parse {onnx_path}: {errors}")
    finally:
        renamed.unlink(missing_ok=True)
        renamed.with_name(renamed.name + ".data").unlink(missing_ok=True)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    if options.precision in ("fp16", "fp8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if options.precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if options.precision == "fp8":
        config.set_flag(trt.BuilderFlag.FP8)
    pinned = 0
    if options.precision != "fp32" and options.fp32_norms:
        pinned = _pin_norms_to_fp32(network)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    profile = builder.create_optimization_profile()
    lo, opt, hi = options.profile.shapes()
    for name in (INPUT_IDS.name, ATTENTION_MASK.name):
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.exists() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    atomic_write(plan_path, bytes(serialized))
    if timing_cache:
        atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
    meta = {
        **expected_meta(onnx_path, options),
        "layers_pinned_fp32": pinned,
        "build_s": time.perf_counter() - t0,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    logger.info("built %s (%s, %d layers in fp32) in %.0f s", plan_path, options.precision, pinned, meta["build_s"])
    return meta


def _has_qdq(onnx_path: Path) -> bool:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in graph.node)


def check_plan_parity(
    plan_path: Path, hf_dir: Path, settings: EncoderSettings, profile: Profile, min_cosine: float = 0.999
) -> dict[str, object]:
    """Cosine against the fp32 PyTorch reference on varied batches inside the profile."""
    from feedserve.encode.pytorch import TorchEncoder

    reference = TorchEncoder(hf_dir, settings)
    batches = [
        (i, m)
        for i, m in parity_batches(int(reference.model.backbone.config.vocab_size))
        if i.shape[0] <= profile.batch[2] and i.shape[1] <= profile.tokens[2]
    ]
    report = compare_encoders(reference, TensorRTEncoder(plan_path), batches, min_cosine, str(plan_path))
    return asdict(report)


def ensure_engine(layout: ArtifactLayout, plan_path: Path, options: EngineOptions, min_cosine: float = 0.999) -> bool:
    """Build the plan unless one built from this ONNX, for this GPU and TensorRT, is there; True if built."""
    meta_path = plan_path.with_name(plan_path.name + ".json")
    if not (stale := stale_fields(meta_path, expected_meta(layout.onnx, options))):
        logger.info("%s is up to date", plan_path)
        return False
    logger.info("building %s (stale: %s)", plan_path, ", ".join(stale))
    meta_path.unlink(missing_ok=True)
    meta = build_engine(layout.onnx, plan_path, options, plan_path.parent / "timing.cache")
    try:
        parity = check_plan_parity(
            plan_path, layout.hf_dir, EncoderSettings.load(layout.settings), options.profile, min_cosine
        )
    except ParityError:
        plan_path.unlink(missing_ok=True)  # never leave a plan that failed its check to be served
        raise
    meta = {**meta, "parity": parity, "plan_sha256": sha256_file(plan_path)}
    atomic_write(meta_path, json.dumps(meta, indent=2).encode())
    return True


def main(argv: Sequence[str] | None = None) -> int:
    from feedserve.artifacts import default_artifacts_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("build", "ensure", "check"), help="check: only say whether a build can run here")
    p.add_argument("--artifacts", type=Path, default=default_artifacts_dir())
    p.add_argument("--plan", type=Path, help="default: ARTIFACTS/encoder.plan")
    p.add_argument("--precision", choices=PRECISIONS, default="fp16")
    p.add_argument("--max-batch", type=int, default=64, help="the repository's max_batch_size")
    p.add_argument("--min-cosine", type=float, default=0.999)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if reason := unavailable_reason(args.precision):
        print(f"feedserve.export.tensorrt: {reason}", file=sys.stderr)
        return UNAVAILABLE_EXIT
    if args.command == "check":
        print("TensorRT and a GPU are available")
        return 0
    layout = ArtifactLayout(args.artifacts)
    settings = EncoderSettings.load(layout.settings)
    options = EngineOptions(args.precision, Profile.for_settings(settings, args.max_batch))
    plan = args.plan or layout.root / "encoder.plan"
    if args.command == "build":  # unconditionally: forget the old plan's metadata
        plan.with_name(plan.name + ".json").unlink(missing_ok=True)
    ensure_engine(layout, plan, options, args.min_cosine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
