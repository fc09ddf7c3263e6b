"""Hugging Face checkpoint -> ONNX (LLaMA + pooling + L2 norm + Matryoshka), parity checked.

    python -m feedserve.export.onnx --hf-dir artifacts/default/hf --out artifacts/default/encoder.onnx

The graph takes `input_ids` and `attention_mask` (int64, dynamic batch and sequence) and returns
`embedding` (float32 [batch, dim]). Models whose weights exceed 2 GB (protobuf's limit) are saved
with external data beside the graph. Every export is compared with PyTorch on varied batches and
refused with ParityError below `min_cosine`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from feedserve.artifacts import EncoderSettings
from feedserve.encode.base import Encoder
from feedserve.errors import ExportError
from feedserve.files import EXPORT_TMP_PREFIX, atomic_write, publish, sha256_file
from feedserve.schema import ONNX_INPUTS, ONNX_OUTPUT

logger = logging.getLogger(__name__)

PROTOBUF_LIMIT = 2 * 1024**3


class ParityError(ExportError):
    """An exported model disagrees with the PyTorch reference beyond tolerance."""

    def __init__(self, message: str, worst_cosine: float, max_abs_diff: float) -> None:
        super().__init__(message)
        self.worst_cosine = worst_cosine
        self.max_abs_diff = max_abs_diff


@dataclass
class ParityReport:
    batches: list[list[int]]  # [batch size, sequence length] of each checked batch
    worst_cosine: float
    max_abs_diff: float
    min_cosine: float


@dataclass
class ExportReport:
    onnx_path: str
    sha256: str
    external_data: bool
    parameters: int
    export_s: float
    parity_s: float
    settings: dict[str, object]
    parity: ParityReport | None = None
    extra: dict[str, object] = field(default_factory=dict)


def parity_batches(vocab_size: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Varied shapes, mixed lengths inside a batch, left and right padding."""
    rng = np.random.default_rng(seed)
    out = []
    for batch, seq, left in ((1, 7, False), (2, 33, False), (4, 64, True), (8, 17, False), (3, 128, False)):
        ids = rng.integers(3, vocab_size, size=(batch, seq), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row in range(batch):
            n = seq if row == 0 else int(rng.integers(1, seq + 1))
            if left:
                mask[row, seq - n :] = 1
            else:
                mask[row, :n] = 1
        out.append((ids * mask, mask))
    return out


def check_parity(
    hf_dir: Path,
    settings: EncoderSettings,
    onnx_path: Path,
    min_cosine: float = 0.9999,
    batches: list[tuple[np.ndarray, np.ndarray]] | None = None,
) -> ParityReport:
    from feedserve.encode.ort import OnnxEncoder
    from feedserve.encode.pytorch import TorchEncoder

    reference = TorchEncoder(hf_dir, settings)
    batches = batches or parity_batches(int(reference.model.backbone.config.vocab_size))
    return compare_encoders(reference, OnnxEncoder(onnx_path), batches, min_cosine, str(onnx_path))


def compare_encoders(
    reference: Encoder,
    candidate: Encoder,
    batches: list[tuple[np.ndarray, np.ndarray]],
    min_cosine: float,
    label: str,
) -> ParityReport:
    """Worst per-row cosine of `candidate` against `reference`; ParityError below `min_cosine`."""
    worst_cos, worst_abs = 1.0, 0.0
    worst_at: tuple[int, ...] = (0, 0)
    for ids, mask in batches:
        a, b = reference.encode(ids, mask), candidate.encode(ids, mask)
        if a.shape != b.shape:
            raise ParityError(
                f"{label}: shape {b.shape} != reference {a.shape} for batch {ids.shape}", -1.0, float("inf")
            )
        cos = float((a * b).sum(axis=1).min())
        if cos < worst_cos:
            worst_cos, worst_at = cos, ids.shape
        worst_abs = max(worst_abs, float(np.abs(a - b).max()))
    report = ParityReport([list(i.shape) for i, _ in batches], worst_cos, worst_abs, min_cosine)
    if worst_cos < min_cosine:
        raise ParityError(
            f"{label}: worst cosine {worst_cos:.6f} < {min_cosine} (batch {list(worst_at)}), "
            f"max abs difference {worst_abs:.3g}",
            worst_cos,
            worst_abs,
        )
    logger.info("parity ok: worst cosine %.6f, max abs diff %.3g", worst_cos, worst_abs)
    return report


def export_onnx(
    hf_dir: Path,
    settings: EncoderSettings,
    out_path: Path,
    opset: int = 18,
    external_data_threshold: int = PROTOBUF_LIMIT,
    min_cosine: float = 0.9999,
    extra: dict[str, object] | None = None,
) -> ExportReport:
    import onnx
    import torch

    from feedserve.encode.pytorch import load_embedding_model

    model = load_embedding_model(hf_dir, settings)
    n_params = sum(p.numel() for p in model.parameters())
    big = n_params * 4 >= external_data_threshold
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.ones((2, 16), dtype=torch.int64)
    mask = torch.ones((2, 16), dtype=torch.int64)
    axes = {0: "batch", 1: "sequence"}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=EXPORT_TMP_PREFIX) as tmp:
        # Export into a scratch dir first: a failed export or parity check never replaces a good model.
        raw = Path(tmp) / "raw.onnx"
        # no_grad, not inference_mode: the TorchScript tracer cannot trace inference tensors.
        with torch.no_grad():
            torch.onnx.export(
                model,
                (ids, mask),
                str(raw),
                input_names=list(ONNX_INPUTS),
                output_names=[ONNX_OUTPUT],
                dynamic_axes={ONNX_INPUTS[0]: axes, ONNX_INPUTS[1]: axes, ONNX_OUTPUT: {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
        graph = onnx.load(str(raw), load_external_data=True)
        staged = Path(tmp) / out_path.name
        data_name = out_path.name + ".data"
        if big:
            onnx.save_model(
                graph, str(staged), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name
            )
        else:
            onnx.save_model(graph, str(staged))
        del graph
        export_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        parity = check_parity(hf_dir, settings, staged, min_cosine)
        parity_s = time.perf_counter() - t1
        (out_path.parent / data_name).unlink(missing_ok=True)
        if big:
            publish(Path(tmp) / data_name, out_path.parent / data_name)
        publish(staged, out_path)
    report = ExportReport(
        str(out_path),
        sha256_file(out_path),
        big,
        n_params,
        export_s,
        parity_s,
        asdict(settings),
        parity,
        {"opset": opset, "torch": torch.__version__, "onnx": onnx.__version__, **(extra or {})},
    )
    atomic_write(out_path.with_name("export_report.json"), json.dumps(asdict(report), indent=2) + "\n")
    logger.info("exported %s (%d params, %.0f s, parity %.0f s)", out_path, n_params, export_s, parity_s)
    return report


# The MatMuls of the q/k/v/o, gate and up projections take int8 weights; down_proj stays fp32: its
# input (the MLP's gated activations) carries the outliers that per-tensor dynamic quantization of
# activations clips (its parity with fp32 drops far more than the speed it adds; README "The model
# repository" has the figures). Whether int8 may serve is decided by the quality benchmark.
INT8_SKIP = ("down_proj",)


def quantize_int8(fp32_path: Path, out_path: Path, vocab_size: int, min_cosine: float = 0.98) -> ParityReport:
    """ONNX Runtime dynamic int8 quantization of the encoder's projection weights, parity checked
    against the fp32 graph (ParityError below `min_cosine`; nothing is written then)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from feedserve.encode.ort import OnnxEncoder

    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    nodes = [
        n.name
        for n in graph.node
        if n.op_type == "MatMul" and n.name.endswith("proj/MatMul") and not any(skip in n.name for skip in INT8_SKIP)
    ]
    if not nodes:
        raise ParityError(
            f"{fp32_path}: no projection MatMuls to quantize (not a LLaMA encoder export?)", -1.0, float("inf")
        )
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=EXPORT_TMP_PREFIX) as tmp:
        staged = Path(tmp) / out_path.name
        quantize_dynamic(
            str(fp32_path),
            str(staged),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=nodes,
        )
        parity = compare_encoders(
            OnnxEncoder(fp32_path), OnnxEncoder(staged), parity_batches(vocab_size), min_cosine, str(out_path)
        )
        publish(staged, out_path)
    logger.info("quantized %d projections to int8: %s", len(nodes), out_path)
    return parity


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--settings", type=Path, help="serving.json to take pooling/dim from")
    p.add_argument("--pooling", choices=("mean", "last"))
    p.add_argument("--dim", type=int)
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--int8", type=Path, metavar="PATH", help="also write the int8 graph (see quantize_int8) to PATH")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = EncoderSettings.load(args.settings) if args.settings else EncoderSettings()
    if args.pooling:
        settings.pooling = args.pooling
    if args.dim:
        settings.dim = args.dim
    try:
        report = export_onnx(args.hf_dir, settings, args.out, opset=args.opset)
        if args.int8:
            vocab = int(json.loads((args.hf_dir / "config.json").read_text())["vocab_size"])
            report.extra["int8"] = asdict(quantize_int8(args.out, args.int8, vocab))
    except ParityError as err:
        logger.error("%s", err)
        return 1
    print(json.dumps(asdict(report), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
