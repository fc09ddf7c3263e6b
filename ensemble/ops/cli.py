"""`feedserve`: one command line over the bundle.

feedserve build      import the model (+ fine-tune), export ONNX, buckets   (artifacts/default)
feedserve render     write model_repository/ from code (--check: fail on drift)
feedserve serve      run tritonserver on 127.0.0.1 until interrupted
feedserve index      embed a post corpus through the server and build the knn index
feedserve retrieve   top-k posts for a member record
feedserve feed       a member's ranked feed: retrieved candidates ranked by the GR ranker
feedserve embed      embeddings of post or member records
feedserve demo       all of the above on the MovieLens sample, end to end
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from feedserve.artifacts import ArtifactLayout, default_artifacts_dir
from feedserve.errors import FeedserveError, RecordError
from feedserve.index.milvus import DEFAULT_COLLECTION, MilvusStore, connect
from feedserve.ops.builder import SAMPLE_CORPUS
from feedserve.ops.launcher import DEFAULT_REPOSITORY

logger = logging.getLogger("feedserve")


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="host:port (default 127.0.0.1:8000 http, :8001 grpc)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="grpc")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")


def _url(args: argparse.Namespace) -> str:
    return args.url or ("127.0.0.1:8001" if args.protocol == "grpc" else "127.0.0.1:8000")


def _read_records(value: str) -> list[str]:
    """A JSON record, a .json file, or a .jsonl file (one record per line)."""
    path = Path(value)
    if path.suffix == ".jsonl" and path.exists():
        return [line for line in path.read_text().splitlines() if line.strip()]
    if path.exists():
        return [path.read_text()]
    return [value]


def int_in(low: int, high: int = 2**31 - 1) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], refused by the option's name otherwise (a count of
    0 hung the embedding client, a negative --limit dropped posts, a port past 65535 overflowed)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in [{low}, {high}], got {number}")
        return number

    return parse


def cmd_build(args: argparse.Namespace) -> int:
    from feedserve.ops.builder import BuildOptions, build_artifacts, resolve_adapter, resolve_ranker

    if args.untuned and args.adapter:
        logger.error("--untuned and --adapter contradict each other")
        return 2
    if not args.corpus.exists():  # found now, not after minutes of export
        raise RecordError(f"--corpus {args.corpus}: no such file or directory")
    adapter = resolve_adapter(args.source, args.adapter, args.untuned)
    # SIGTERM (a container stopped, `kill`) unwinds as an exit does: the export's scratch directory
    # and the index's lock are released, not left beside the artifacts.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # --dim and --pooling change the saved (or the adapter's) settings; they do not replace them.
    build_artifacts(
        BuildOptions(
            args.artifacts,
            args.source,
            None,
            args.corpus,
            args.force,
            args.buckets,
            adapter,
            dim=args.dim,
            pooling=args.pooling,
            ranker=resolve_ranker(adapter, args.ranker, args.dim),
        )
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from feedserve.ops.launcher import ServerOptions, TritonServer

    opts = ServerOptions(
        artifacts=args.artifacts,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_file=args.log_file,
        repository=args.repository,
        milvus_uri=args.milvus_uri,
    )
    if args.host != "127.0.0.1" and not args.expose:
        logger.error("refusing to listen on %s without --expose (default is loopback only)", args.host)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with TritonServer(opts) as server:  # Ctrl-C while it starts: stopped and cleaned up, no traceback
            print(f"tritonserver ready: http {server.http_url}  grpc {server.grpc_url}  (Ctrl-C stops)", flush=True)
            while not stop.wait(1.0):
                if not server.running:
                    # tritonserver kept dying, or a model can only fail: exit, so that a supervisor
                    # restarts everything and the start-time checks name what is wrong.
                    logger.error("stopping: %s", server.gave_up or "the server is down")
                    return 1
    except KeyboardInterrupt:
        pass
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from feedserve.clients.batch import index_corpus
    from feedserve.prompt.movielens import load_movielens
    from feedserve.prompt.records import read_posts_jsonl
    from feedserve.training.feed_log import POSTS_FILE, is_feed_log

    if is_feed_log(args.corpus):
        posts = read_posts_jsonl(args.corpus / POSTS_FILE)
    elif args.corpus.is_dir():
        posts = load_movielens(args.corpus).posts()
    else:
        posts = read_posts_jsonl(args.corpus)
    if args.limit:
        posts = posts[: args.limit]
    if not posts:
        raise RecordError(f"--corpus {args.corpus}: no posts to index")
    if args.embeddings_out is not None and args.embeddings_out.exists() and not args.embeddings_out.is_dir():
        raise RecordError(f"--embeddings-out {args.embeddings_out}: a file, not a directory")  # (before embedding)
    layout = ArtifactLayout(args.artifacts)
    target = (
        layout.index
        if args.milvus_uri is None
        else _milvus(args.milvus_uri, layout, args.milvus_collection, args.milvus_index_type)
    )
    stats = index_corpus(
        posts,
        [p.id for p in posts],
        target,
        embeddings_dir=args.embeddings_out,
        url=args.url or "127.0.0.1:8001",
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        dim=layout.serving_dim(),
    )
    print(f"indexed {stats.posts} posts in {stats.seconds:.1f} s ({stats.posts_per_s:.1f} posts/s)")
    return 0


def _milvus(uri: str, layout: ArtifactLayout, collection: str, index_type: str) -> MilvusStore:
    return MilvusStore(connect(uri), layout.serving_dim(), collection, index_type)


def cmd_retrieve(args: argparse.Namespace) -> int:
    from feedserve.clients.online import FeedClient

    with FeedClient(_url(args), args.protocol, args.timeout) as client:
        for hits in client.retrieve_many(_read_records(args.member), args.k):
            print(json.dumps([{"post_id": h.post_id, "score": round(h.score, 4)} for h in hits]))
    return 0


def cmd_feed(args: argparse.Namespace) -> int:
    from feedserve.clients.online import FeedClient

    with FeedClient(_url(args), args.protocol, args.timeout) as client:
        for feed in client.feed_many(_read_records(args.member), args.n, args.candidates):
            rows = [{"post_id": r.post_id, "score": round(r.score, 4)} for r in feed]
            for row, r in zip(rows, feed, strict=True):
                row.update({task: round(p, 4) for task, p in r.tasks.items()})
            print(json.dumps(rows))
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from feedserve.clients.online import FeedClient

    records = _read_records(args.records)
    with FeedClient(_url(args), args.protocol, args.timeout) as client:
        vectors = client.embed_members(records) if args.kind == "member" else client.embed_posts(records)
    if args.out:
        np.save(args.out, vectors, allow_pickle=False)
        print(f"wrote {vectors.shape} to {args.out}")
    else:
        for v in vectors:
            print(json.dumps([round(float(x), 6) for x in v]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from feedserve.ops.builder import resolve_adapter
    from feedserve.ops.demo import DemoOptions, run_demo

    adapter = resolve_adapter(None, None, args.untuned)
    return run_demo(
        DemoOptions(artifacts=args.artifacts, limit=None if args.full else args.limit, k=args.k, adapter=adapter)
    )


def parser() -> argparse.ArgumentParser:
    from feedserve.triton import repository

    p = argparse.ArgumentParser(
        prog="feedserve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--artifacts", type=Path, default=default_artifacts_dir())
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="import the model, export ONNX, fit buckets")
    b.add_argument("--source", type=Path, help="a .gguf file or a local HF LLaMA-family checkpoint")
    b.add_argument(
        "--corpus",
        type=Path,
        default=SAMPLE_CORPUS,
        help="the ranker's tables (and buckets without an adapter) come from: a MovieLens dir or a feed log dir",
    )
    b.add_argument("--pooling", choices=("mean", "last"))
    b.add_argument("--dim", type=int_in(1), help="Matryoshka dimension (default: full)")
    b.add_argument("--buckets", type=Path, help="use this buckets.json (a training run's) instead of fitting")
    b.add_argument(
        "--adapter",
        type=Path,
        help="fine-tuning package to merge (default: the bundled MovieLens fine-tune when --source is not given)",
    )
    b.add_argument("--untuned", action="store_true", help="build the base model without any adapter")
    b.add_argument(
        "--ranker",
        type=Path,
        help="a trained ranker (ranker.json, ranker.pt) for this encoder (default: the bundled one with the "
        "bundled fine-tune; none otherwise: the server then retrieves only)",
    )
    b.add_argument("--force", action="store_true")
    b.set_defaults(func=cmd_build)

    r = sub.add_parser("render", help="write the model repository from code")
    repository.add_arguments(r)
    r.set_defaults(func=repository.render)

    s = sub.add_parser("serve", help="run tritonserver until interrupted")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--expose", action="store_true", help="allow a non-loopback --host")
    s.add_argument("--http-port", type=int_in(1, 65535), default=8000)
    s.add_argument("--grpc-port", type=int_in(1, 65535), default=8001)
    s.add_argument("--metrics-port", type=int_in(1, 65535), default=8002)
    s.add_argument("--log-file", type=Path)
    s.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="a rendered model repository")
    s.add_argument(
        "--milvus-uri",
        help="the Milvus a repository rendered with `--index milvus` reads (a server URI, or a local file "
        "this command serves with Milvus Lite)",
    )
    s.set_defaults(func=cmd_serve)

    i = sub.add_parser("index", help="embed a corpus via embed_post and build the index")
    i.add_argument("--corpus", type=Path, default=SAMPLE_CORPUS, help="posts .jsonl, a MovieLens dir or a feed log dir")
    i.add_argument("--limit", type=int_in(0), default=0, help="index the first N posts (0: all)")
    i.add_argument("--url", default=None, help="gRPC host:port (default 127.0.0.1:8001)")
    i.add_argument("--batch-size", type=int_in(1), default=8)
    i.add_argument("--concurrency", type=int_in(1), default=4)
    i.add_argument("--embeddings-out", type=Path)
    i.add_argument("--milvus-uri", help="rebuild this Milvus index instead of the local one (a server URI or a file)")
    i.add_argument("--milvus-collection", default=DEFAULT_COLLECTION, help="the Milvus index's name")
    i.add_argument(
        "--milvus-index-type",
        choices=("FLAT", "GPU_BRUTE_FORCE"),
        default="FLAT",
        help="the new generation's index: exact on CPU query nodes (FLAT) or on GPU ones",
    )
    i.set_defaults(func=cmd_index)

    q = sub.add_parser("retrieve", help="top-k posts for member records")
    q.add_argument("member", help="member JSON, a .json file or a .jsonl file")
    q.add_argument("-k", type=int_in(1), default=10)
    _add_server_args(q)
    q.set_defaults(func=cmd_retrieve)

    f = sub.add_parser("feed", help="a member's feed: retrieval, then the GR ranker")
    f.add_argument("member", help="member JSON, a .json file or a .jsonl file")
    f.add_argument("-n", type=int_in(1), default=10, help="posts in the feed")
    f.add_argument("--candidates", type=int_in(1), default=500, help="retrieved posts the ranker orders (<= 2000)")
    _add_server_args(f)
    f.set_defaults(func=cmd_feed)

    e = sub.add_parser("embed", help="embeddings of records")
    e.add_argument("kind", choices=("post", "member"))
    e.add_argument("records", help="JSON, a .json file or a .jsonl file")
    e.add_argument("--out", type=Path, help="write a .npy instead of printing")
    _add_server_args(e)
    e.set_defaults(func=cmd_embed)

    d = sub.add_parser("demo", help="build, serve, index MovieLens, print retrievals")
    d.add_argument("--limit", type=int_in(1), default=1000, help="movies to index (the most rated first)")
    d.add_argument("--full", action="store_true", help="index the whole catalog (9,742 movies)")
    d.add_argument("-k", type=int_in(1), default=10)
    d.add_argument("--untuned", action="store_true", help="serve the base model (use another --artifacts dir)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except (FeedserveError, OSError, ValueError) as err:  # what an operator can mend: one line, not a traceback
        logger.debug("%s failed", args.command, exc_info=True)
        print(f"feedserve {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
