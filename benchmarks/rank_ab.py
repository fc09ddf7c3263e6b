"""`rank` in-process, this checkout against another commit: does a change make a request faster, and
does it leave the answers as they were?

    .venv/bin/python -m benchmarks.rank_ab --base b1fecb9 [--pairs 7] [--rounds 6]

The other commit is checked out in a git worktree (a temporary directory; its import paths laid
out as folders, as scripts/check.sh does for mypy). Each pair runs two fresh processes, one per
code, in alternating order: each sets up the `rank` backend (`RankModel`, ONNX Runtime on one
thread) on this checkout's `artifacts/default` (the same files for both: the index as `feedserve
demo` builds it, vectors without features, so every post's features come from the build's table;
the ranker; the tables), freezes what
setup made out of the garbage collector's passes as `BatchModel.initialize` does, and times
`rounds` passes over `--members` MovieLens members (their 200 newest ratings as history, each item
with its post record, as a client sends it) with 2,000 candidates each (every indexed post, then
catalog posts the index does not hold), one request at a time, parse and compute. On these shared
2-core VMs one process's mean moves by 10 ms from the next's, so the pairs are the measure, and the
spread of their differences is reported with them. The answers (ids and scores of each member's
top 10) are compared between the two codes.

Needs `artifacts/default` (`make demo`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import write_report

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("export", "clients", "training")  # pyproject.toml: feedserve.<name> = <name>/


def worker(rounds: int, members: int, candidates: int) -> dict[str, Any]:
    """Runs in the process of one code (its `feedserve` first on the path)."""
    import gc

    import numpy as np

    import feedserve
    from feedserve.artifacts import ArtifactLayout, default_artifacts_dir
    from feedserve.ops.builder import SAMPLE_CORPUS
    from feedserve.prompt.movielens import load_movielens
    from feedserve.triton.rank import RankModel

    layout = ArtifactLayout(default_artifacts_dir())
    model = RankModel()
    model.setup(layout, {"max_candidates": str(candidates), "intra_op_threads": "1"})
    movielens = load_movielens(SAMPLE_CORPUS)
    by_user = movielens.ratings_by_user()
    users = [u for u in sorted(by_user) if len(by_user[u]) >= 200][:members]
    raws = [movielens.member(u, by_user[u][-200:]).model_dump_json().encode() for u in users]
    indexed = np.load(layout.index, allow_pickle=False)["ids"][:candidates]
    catalog = np.array([p.id for p in movielens.posts()], np.int64)
    rng = np.random.default_rng(0)
    requests = []
    for raw in raws:
        ids = np.concatenate([indexed, rng.choice(np.setdiff1d(catalog, indexed), candidates - len(indexed), False)])
        rng.shuffle(ids)
        query = rng.normal(size=(1, model.config.content_dim)).astype(np.float32)
        requests.append(
            {
                "RECORDS": np.array([[raw]], object),
                "QUERY": query / np.linalg.norm(query),
                "CANDIDATE_IDS": ids[None, :],
                "CANDIDATE_SCORES": np.sort(rng.random(candidates).astype(np.float32))[::-1][None, :].copy(),
                "K": np.array([[10]], np.int64),
            }
        )
    del movielens, by_user
    gc.collect()
    gc.freeze()
    answers = [model.run([r])[0] for r in requests]  # the first pass warms up, and is the answer
    times = []
    for _ in range(rounds):
        for request in requests:
            start = time.perf_counter()
            model.run([request])
            times.append((time.perf_counter() - start) * 1e3)
    return {
        "code": str(Path(feedserve.__file__).resolve().parent),
        "p50_ms": float(np.median(times)),
        "mean_ms": float(np.mean(times)),
        "ids": [a["IDS"][0].tolist() for a in answers],  # type: ignore[index]
        "scores": [a["SCORES"][0].tolist() for a in answers],  # type: ignore[index]
    }


def import_tree(checkout: Path, into: Path) -> Path:
    """A folder where `feedserve` of `checkout` imports from (its subpackages laid out as folders)."""
    package = into / "feedserve"
    package.mkdir(parents=True)
    for entry in (checkout / "ensemble").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name in SUBPACKAGES:
        (package / name).symlink_to(checkout / name)
    return into


def run_worker(path: str | None, args: argparse.Namespace) -> dict[str, Any]:
    from feedserve.artifacts import ARTIFACTS_ENV, default_artifacts_dir

    # Both codes read this checkout's artifacts (the other's default would be in its worktree).
    env = {**os.environ, "PYTHONPATH": path or str(REPO), ARTIFACTS_ENV: str(default_artifacts_dir())}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--rounds", str(args.rounds)]
    command += ["--members", str(args.members), "--candidates", str(args.candidates)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"the worker of {path or 'this checkout'} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# `rank` in-process: this checkout against another commit",
        "",
        f"Command: `{report['command']}`. Machine: {report['machine']}.",
        f"Base {report['base']}, head {report['head']}; {report['members']} members x {report['rounds']} rounds "
        f"a process, {report['candidates']} candidates a request.",
        "",
        __doc__.split("\n\n")[2].strip(),
        "",
        "| pair | base p50 / mean ms | head p50 / mean ms | base - head mean ms |",
        "|---|---|---|---|",
    ]
    for i, (b, h) in enumerate(report["pairs"], 1):
        lines.append(
            f"| {i} | {b['p50_ms']:.1f} / {b['mean_ms']:.1f} | {h['p50_ms']:.1f} / {h['mean_ms']:.1f} | "
            f"{b['mean_ms'] - h['mean_ms']:+.1f} |"
        )
    s = report["summary"]
    lines += [
        "",
        f"Mean of the processes' means: base {s['base_mean_ms']:.1f} ms, head {s['head_mean_ms']:.1f} ms; "
        f"the pairs' differences {s['diff_min_ms']:+.1f} .. {s['diff_max_ms']:+.1f} ms (median "
        f"{s['diff_median_ms']:+.1f}). Same top 10 ids for every member: {s['same_ids']}; largest score "
        f"difference {s['max_score_diff']:.2g}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="the commit to compare this checkout against")
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--candidates", type=int, default=2000)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "reports" / "rank_ab")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.rounds, args.members, args.candidates)))
        return 0
    if not args.base:
        parser.error("--base is required")
    from feedserve.clients.perf import machine

    def rev(name: str) -> str:
        return subprocess.run(
            ["git", "rev-parse", "--short", name], cwd=REPO, check=True, capture_output=True, text=True
        ).stdout.strip()

    with tempfile.TemporaryDirectory() as tmp:
        checkout = Path(tmp) / "checkout"
        subprocess.run(["git", "worktree", "add", "--detach", str(checkout), args.base], cwd=REPO, check=True)
        try:
            base_path = str(import_tree(checkout, Path(tmp) / "imports"))
            pairs = []
            for i in range(args.pairs):  # alternating which code runs first
                order = (base_path, None) if i % 2 == 0 else (None, base_path)
                result = {path: run_worker(path, args) for path in order}
                pairs.append((result[base_path], result[None]))
                print(f"pair {i + 1}: base {pairs[-1][0]['mean_ms']:.1f} ms, head {pairs[-1][1]['mean_ms']:.1f} ms")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(checkout)], cwd=REPO, check=False)
    diffs = [b["mean_ms"] - h["mean_ms"] for b, h in pairs]
    b0, h0 = pairs[0]
    report = {
        "command": "python -m benchmarks.rank_ab " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "base": rev(args.base),
        "head": rev("HEAD"),
        "rounds": args.rounds,
        "members": args.members,
        "candidates": args.candidates,
        "pairs": [
            (
                {k: v for k, v in b.items() if k in ("p50_ms", "mean_ms")},
                {k: v for k, v in h.items() if k in ("p50_ms", "mean_ms")},
            )
            for b, h in pairs
        ],
        "summary": {
            "base_mean_ms": statistics.mean(b["mean_ms"] for b, _ in pairs),
            "head_mean_ms": statistics.mean(h["mean_ms"] for _, h in pairs),
            "diff_min_ms": min(diffs),
            "diff_max_ms": max(diffs),
            "diff_median_ms": statistics.median(diffs),
            "same_ids": all(b["ids"] == h["ids"] for b, h in pairs) and b0["ids"] == h0["ids"],
            "max_score_diff": max(
                abs(x - y)
                for b, h in pairs
                for bs, hs in zip(b["scores"], h["scores"], strict=True)
                for x, y in zip(bs, hs, strict=True)
            ),
        },
    }
    write_report(args.out, "rank_ab", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
