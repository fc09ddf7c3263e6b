"""The GR ranker (PyTorch) -> ONNX, parity checked against PyTorch.

    python -m feedserve.export.rank --checkpoint RUN --out artifacts/default/ranker.onnx

The graph takes the ranker's inputs by name (`feedserve.rank.model.INPUTS`: history and candidates,
each with its own dynamic length, and the member's embedding) and returns `logits` [batch,
candidates, tasks]. The shared-context attention mask is built inside the graph from the history
and candidate masks, so one graph serves any history length and any number of candidates. Every
export is run by ONNX Runtime on varied shapes (an empty history, one candidate, padding) and
refused with ParityError when a logit differs from PyTorch by more than `max_abs_diff`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from feedserve.export.onnx import ParityError
from feedserve.files import EXPORT_TMP_PREFIX, publish
from feedserve.rank.model import INPUTS, OUTPUT, GenerativeRanker, RankerConfig

logger = logging.getLogger(__name__)

# (batch, history slots, candidate slots, real history lengths): what the parity check runs.
PARITY_SHAPES = ((1, 7, 5, (7,)), (2, 12, 30, (12, 4)), (3, 9, 1, (0, 9, 2)), (1, 0, 3, (0,)))


def sample_inputs(
    config: RankerConfig, batch: int, history: int, candidates: int, lengths: tuple[int, ...], seed: int = 0
) -> dict[str, np.ndarray]:
    """Random inputs of one shape, history right-padded to `lengths`, as a server would pass them."""
    rng = np.random.default_rng(seed)
    e = config.content_dim
    history_mask = np.arange(history)[None, :] < np.array(lengths)[:, None]
    return {
        "history_ids": rng.integers(0, 10**6, (batch, history)),
        "history_actions": rng.integers(0, len(config.actions), (batch, history)),
        "history_content": rng.normal(size=(batch, history, e)).astype(np.float32),
        "history_mask": history_mask,
        "candidate_ids": rng.integers(0, 10**6, (batch, candidates)),
        "candidate_content": rng.normal(size=(batch, candidates, e)).astype(np.float32),
        "candidate_features": rng.random((batch, candidates, len(config.features))).astype(np.float32),
        "member": rng.normal(size=(batch, e)).astype(np.float32),
    }


@torch.no_grad()
def check_parity(model: GenerativeRanker, onnx_path: Path, max_abs_diff: float = 1e-4) -> float:
    """The largest |logit difference| over PARITY_SHAPES; ParityError above `max_abs_diff`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for i, (b, h, c, lengths) in enumerate(PARITY_SHAPES):
        inputs = sample_inputs(model.config, b, h, c, lengths, seed=i)
        want = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
        (got,) = session.run([OUTPUT], inputs)
        diff = float(np.abs(want - got).max()) if want.size else 0.0
        worst = max(worst, diff)
        if want.shape != got.shape or diff > max_abs_diff:
            raise ParityError(
                f"{onnx_path}: logits differ from PyTorch by {diff:.3g} (shape {got.shape} vs {want.shape}) "
                f"for batch {b}, history {h}, candidates {c}",
                float("nan"),
                diff,
            )
    return worst


def export_ranker(model: GenerativeRanker, out_path: Path, max_abs_diff: float = 1e-4) -> float:
    """Write `out_path` (durably, and only once the graph passed its parity check); returns the worst difference."""
    model = model.eval()
    example = sample_inputs(model.config, 2, 6, 4, (6, 3))
    dynamic = {name: {0: "batch", 1: "history" if name.startswith("history") else "candidates"} for name in INPUTS}
    dynamic["member"] = {0: "batch"}
    dynamic[OUTPUT] = {0: "batch", 1: "candidates"}
    with tempfile.TemporaryDirectory(dir=Path(out_path).parent, prefix=EXPORT_TMP_PREFIX) as tmp:
        staged = Path(tmp) / "ranker.onnx"
        torch.onnx.export(
            model,
            tuple(torch.from_numpy(example[name]) for name in INPUTS),
            str(staged),
            input_names=list(INPUTS),
            output_names=[OUTPUT],
            dynamic_axes=dynamic,
            opset_version=18,
            dynamo=False,
        )
        worst = check_parity(model, staged, max_abs_diff)
        publish(staged, out_path)
    logger.info("exported %s (worst logit difference %.2g)", out_path, worst)
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a directory with ranker.json and ranker.pt")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model = GenerativeRanker.load(args.checkpoint)
    try:
        export_ranker(model, args.out)
    except ParityError as err:
        print(f"feedserve.export.rank: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
