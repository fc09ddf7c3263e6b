"""Freshness of the live index with the default model on this machine: how long from a post event
to the post being retrievable at a steady event rate (p50, p99), retrievals/s served while
ingesting against idle, and a full rebuild + swap of the index under retrieval load, with posts
written while it runs (every one acknowledged must be served after the swap).

    .venv/bin/python -m benchmarks.freshness --rate 4 --seconds 60
    .venv/bin/python -m benchmarks.freshness --rate 4 --seconds 60 --milvus   # reports/freshness-milvus.*

Needs `artifacts/default` (`make demo` or `feedserve build`). It serves them from a scratch
directory (links to the model files, its own index) on free loopback ports, so the demo's index
is left alone. "Retrievable" is the ingester's acknowledgement: `index_write` answers once the
write is in the fsynced log and applied, and every `knn` instance applies the log before its next
batch (tests/integration/test_live_writes.py checks that guarantee under load). With `--milvus` the
posts live in Milvus (Milvus Lite, the embedded engine, on a loopback port): `index_write`
acknowledges once Milvus took the write, searched under Strong consistency, and the rebuild fills
a new generation and swaps it in (feedserve.index.milvus).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks import write_report
from feedserve.artifacts import ArtifactLayout, default_artifacts_dir
from feedserve.clients.batch import index_corpus
from feedserve.clients.ingest import Ingester, JsonlSource
from feedserve.clients.online import FeedClient
from feedserve.clients.perf import machine
from feedserve.index.milvus import MilvusStore, shared_lite
from feedserve.ops.builder import SAMPLE_CORPUS
from feedserve.ops.launcher import TritonServer, on_free_ports
from feedserve.prompt.movielens import load_movielens
from feedserve.prompt.records import Post
from feedserve.schema import IDS, LSN, OP, OP_UPSERT, POST_ID, QUERY, WRITE_EMBEDDING, K, ModelName
from feedserve.triton.repository import RepositorySettings, write_repository

logger = logging.getLogger("benchmarks.freshness")


def scratch_artifacts(source: ArtifactLayout, dest: Path) -> ArtifactLayout:
    """The model files linked, the small files copied, an empty index directory."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in source.root.iterdir():
        if path.name == "index":
            continue
        target = dest / path.name
        if path.is_dir() or path.stat().st_size > 1 << 20:
            target.symlink_to(path.resolve())
        else:
            shutil.copy(path, target)
    return ArtifactLayout(dest)


class Load:
    """`workers` threads retrieving for real members, counting answers and failures, until stopped."""

    def __init__(self, url: str, members: list, workers: int = 2) -> None:
        self.url, self.members, self.workers = url, members, workers
        self.done = self.failed = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _run(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with FeedClient(self.url, "grpc", timeout_s=60) as client:
            for _ in range(100_000):  # bounded; normally stopped long before
                if self._stop.is_set():
                    return
                try:
                    client.retrieve(self.members[int(rng.integers(len(self.members)))], k=10)
                    self.done += 1
                except Exception:
                    self.failed += 1

    def __enter__(self) -> Load:
        self.t0 = time.perf_counter()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(self.workers)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
        self.seconds = time.perf_counter() - self.t0

    @property
    def per_s(self) -> float:
        return self.done / self.seconds


class WritesDuring(threading.Thread):
    """Posts written one at a time through `index_write` while something else runs (a rebuild);
    `acknowledged` lists those the writer answered, and `retrievable` checks they are served."""

    def __init__(self, url: str, posts: list[Post], every_s: float, write_key: str | None) -> None:
        super().__init__(daemon=True)
        self.url, self.posts, self.every_s, self.write_key = url, posts, every_s, write_key
        self.acknowledged: list[Post] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with FeedClient(self.url, "grpc", timeout_s=60, write_key=self.write_key) as client:
            for post in self.posts:
                if self.stop.wait(self.every_s):
                    return
                vector = client.embed_posts([post])
                client.infer(
                    ModelName.INDEX_WRITE,
                    {
                        OP.name: np.array([[OP_UPSERT]], np.int64),
                        POST_ID.name: np.array([[post.id]], np.int64),
                        WRITE_EMBEDDING.name: vector,
                    },
                    (LSN.name,),
                )
                self.acknowledged.append(post)

    def retrievable(self) -> int:
        """How many acknowledged posts are served: each is its own vector's nearest neighbour."""
        if not self.acknowledged:
            return 0
        with FeedClient(self.url, "grpc", timeout_s=60) as client:
            vectors = client.embed_posts(self.acknowledged)
            top = client.infer(
                ModelName.KNN, {QUERY.name: vectors, K.name: np.ones((len(vectors), 1), np.int64)}, (IDS.name,)
            )
        return sum(int(hit) == p.id for hit, p in zip(top[IDS.name][:, 0], self.acknowledged, strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=default_artifacts_dir())
    p.add_argument("--base-posts", type=int, default=1000, help="indexed before the stream starts")
    p.add_argument("--rate", type=float, default=4.0, help="post events per second")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--idle-seconds", type=float, default=20.0)
    p.add_argument(
        "--prompt-cache",
        action="store_true",
        help="keep the encoder's prompt cache on (off by default: the rebuild re-embeds the posts the initial "
        "index embedded, and 64 members cycle, so a cache would measure itself)",
    )
    p.add_argument("--milvus", action="store_true", help="the posts in Milvus Lite instead of the local live index")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "reports")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ml = load_movielens(SAMPLE_CORPUS)
    posts = ml.posts()
    members = [m for m in ml.members() if 5 <= len(m.history) <= 60][:64]
    base, stream = posts[: args.base_posts], posts[args.base_posts :]
    report: dict[str, object] = {"command": "python -m benchmarks.freshness " + " ".join(argv or sys.argv[1:])}
    with tempfile.TemporaryDirectory() as tmp:
        layout = scratch_artifacts(ArtifactLayout(args.artifacts), Path(tmp) / "artifacts")
        report["machine"] = machine()
        report["encoder"] = "int8" if layout.onnx_int8.exists() else "fp32"  # what precision "auto" serves
        repository = Path(tmp) / "repository"
        write_repository(
            repository,
            RepositorySettings(
                encoder_cache_rows=10000 if args.prompt_cache else 0, index="milvus" if args.milvus else "local"
            ),
        )
        report["prompt_cache"] = args.prompt_cache
        report["index"] = "milvus (Milvus Lite 2.5.1, FLAT, Strong)" if args.milvus else "local live index"
        milvus_db = Path(tmp) / "milvus" / "posts.db"
        opts = on_free_ports(
            repository=repository,
            artifacts=layout.root,
            log_file=Path(tmp) / "tritonserver.log",
            milvus_uri=str(milvus_db) if args.milvus else None,
        )
        with TritonServer(opts) as server:
            target = MilvusStore(shared_lite(milvus_db), layout.serving_dim()) if args.milvus else layout.index
            stats = index_corpus(base, [q.id for q in base], target, url=server.grpc_url, progress=False)
            report["initial_index"] = {"posts": stats.posts, "seconds": stats.seconds}
            with Load(server.grpc_url, members) as idle:
                time.sleep(args.idle_seconds)
            report["retrieve_idle"] = {"per_s": idle.per_s, "failed": idle.failed}

            # A steady stream of new posts, appended with their time, ingested as it grows.
            events = Path(tmp) / "events.jsonl"
            events.touch()
            n_events = int(args.rate * args.seconds)

            def produce() -> None:
                with open(events, "a") as f:
                    for i, post in enumerate(stream[:n_events]):
                        time.sleep(max(0.0, i / args.rate - (time.perf_counter() - t0)))
                        f.write(
                            json.dumps(
                                {
                                    "type": "create",
                                    "ts": time.time(),
                                    "post": json.loads(post.model_dump_json(exclude_none=True)),
                                }
                            )
                            + "\n"
                        )
                        f.flush()

            source = JsonlSource(events, Path(tmp) / "ingest", follow=True, idle_exit_s=5.0)
            with (
                FeedClient(server.grpc_url, "grpc", timeout_s=60, write_key=server.write_key) as client,
                Load(server.grpc_url, members) as busy,
            ):
                t0 = time.perf_counter()
                producer = threading.Thread(target=produce)
                producer.start()
                ingested = Ingester(client, Path(tmp) / "ingest").run(source)
                producer.join()
            lags = np.array(ingested.lags_s)
            report["stream"] = {
                "rate_per_s": args.rate,
                "events": ingested.events,
                "upserts": ingested.upserts,
                "batches": ingested.batches,
                "lag_p50_s": float(np.percentile(lags, 50)),
                "lag_p99_s": float(np.percentile(lags, 99)),
                "lag_max_s": float(lags.max()),
            }
            report["retrieve_while_ingesting"] = {"per_s": busy.per_s, "failed": busy.failed}

            # The rebuild replaces the index as of its start; posts written while it runs must survive it.
            writes = WritesDuring(server.grpc_url, stream[n_events : n_events + 200], 1.0, server.write_key)
            with Load(server.grpc_url, members) as during:
                t = time.perf_counter()
                writes.start()
                rebuilt = index_corpus(base, [q.id for q in base], target, url=server.grpc_url, progress=False)
                rebuild_s = time.perf_counter() - t
                writes.stop.set()
                writes.join()
                time.sleep(2.0)  # searches on the swapped-in index
            report["rebuild_under_load"] = {
                "posts": rebuilt.posts,
                "seconds": rebuild_s,
                "retrieves": during.done,
                "failed": during.failed,
                "written_during": len(writes.acknowledged),
                "retrievable_after": writes.retrievable(),
            }
    write_report(args.out, "freshness-milvus" if args.milvus else "freshness", report, markdown(report))
    return 0


def markdown(r: dict) -> str:
    s, idle, busy, rb = r["stream"], r["retrieve_idle"], r["retrieve_while_ingesting"], r["rebuild_under_load"]
    return "\n".join(
        [
            "# Live index freshness (default model, 2-core CPU)",
            "",
            f"Index: {r.get('index', 'local live index')}.",
            "",
            f"Command: `{r['command']}`. Initial index: {r['initial_index']['posts']} MovieLens posts in {r['initial_index']['seconds']:.0f} s. "
            f"Prompt cache {'on' if r.get('prompt_cache') else 'off'}. Encoder: {r.get('encoder', 'fp32')}.",
            "",
            f"Machine: {r.get('machine', 'not recorded')}",
            "",
            "| measure | value |",
            "|---|---|",
            f"| event -> retrievable at {s['rate_per_s']:g} events/s, p50 / p99 / max | {s['lag_p50_s']:.2f} / {s['lag_p99_s']:.2f} / {s['lag_max_s']:.2f} s |",
            f"| events ingested (batches) | {s['events']} ({s['batches']}) |",
            f"| retrievals/s, idle (2 clients) | {idle['per_s']:.2f} (failed {idle['failed']}) |",
            f"| retrievals/s while ingesting | {busy['per_s']:.2f} (failed {busy['failed']}) |",
            f"| full rebuild + swap of {rb['posts']} posts under retrieval load | {rb['seconds']:.0f} s, {rb['retrieves']} retrievals, {rb['failed']} failed |",
            f"| posts written (acknowledged) while the rebuild ran, retrievable after the swap | {rb['written_during']}, {rb['retrievable_after']} |",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
