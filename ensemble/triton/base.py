"""The shape every feedserve python backend shares.

Triton hands `execute` a list of requests that the dynamic batcher grouped. One malformed request
must fail alone with INVALID_ARG while the others succeed, so each request is parsed (and
validated) on its own, the valid ones are computed together, and responses keep request order.

A refused request costs nothing once answered: its error is kept without the traceback that raised
it, since that traceback holds the frames of `execute` and so every input of the batch (a refused
50 MB request would otherwise stay in memory until a full garbage collection, which numpy's
allocations never trigger). Each stub also dies with its server (`guard_against_orphaning`): an
orphaned stub would serve nothing while holding files, such as the index's writer lock.
"""

from __future__ import annotations

import gc
import hmac
import json
import logging
import os
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from feedserve.artifacts import ARTIFACTS_ENV, ArtifactLayout, default_artifacts_dir
from feedserve.errors import FORBIDDEN, FeedserveError, RecordError
from feedserve.index.engines import Engine
from feedserve.index.live import FollowedIndex
from feedserve.index.milvus import DEFAULT_COLLECTION, MilvusFollowed, milvus_uri
from feedserve.index.store import NORM_TOLERANCE, off_unit
from feedserve.ops.keys import WRITE_HEADER, WRITE_KEY_ENV
from feedserve.ops.watchdog import parent_of
from feedserve.schema import IO, RECORDS, ModelName
from feedserve.triton.compat import pb_utils

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
P = TypeVar("P")
# What a serving model reads posts from (`followed_index`).
ServingIndex = FollowedIndex | MilvusFollowed


class RequestError(FeedserveError, ValueError):
    """A problem with one request's input; reported to its client as INVALID_ARG."""


class Unavailable(RequestError):
    """The model could not serve this request now, through no fault of its input (a disk error while
    logging a write); reported as UNAVAILABLE, so a client retries instead of dropping the request."""


class InternalError(RequestError):
    """Reading one request hit a bug rather than bad input; reported as INTERNAL, to that request alone."""


def detached(err: RequestError) -> RequestError:
    """The same error without its traceback, cause or context: what a response needs, and nothing
    that keeps the request's inputs alive."""
    return type(err)(str(err))


def guard_against_orphaning(interval_s: float = 0.5) -> int:
    """Fork a guardian that SIGKILLs this stub once its server is gone; returns the guardian's pid.

    A stub whose tritonserver is killed is reparented to init and may stay blocked for good in the
    memory it shared with the server, holding the GIL (so no thread of its own can notice) and its
    files (the index's writer lock). The guardian is a separate process: it only reads /proc, sleeps
    and signals, and it exits when the stub does."""
    server, stub = os.getppid(), os.getpid()
    guardian = os.fork()
    if guardian:
        return guardian
    try:  # the child: no logging, no locks, nothing of the stub's state
        while True:
            time.sleep(interval_s)
            if os.getppid() != stub:
                break  # the stub exited on its own
            if parent_of(stub) != server:
                os.kill(stub, signal.SIGKILL)
                break
    finally:
        os._exit(0)


def settle_loaded_objects() -> None:
    """Take what a model loaded at start-up (feature tables, id maps: hundreds of thousands of
    objects that live as long as the process) out of the garbage collector's full passes. Each full
    pass walks every tracked object; with the ranker's tables that is over 100 ms, and it falls on
    whichever request allocated past the threshold: the tail of `rank`'s latency. Objects made
    afterwards, per request, are collected as before."""
    gc.collect()
    gc.freeze()


class BatchModel(ABC, Generic[P]):
    """Subclasses set `name` and implement `setup`, `parse` and `compute`."""

    name: ModelName

    def initialize(self, args: dict[str, str]) -> None:
        guard_against_orphaning()
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        if args.get("model_instance_kind") == "GPU":
            # A KIND_GPU instance runs on the device Triton placed it on.
            params["device"] = f"cuda:{args.get('model_instance_device_id', '0')}"
        artifacts = Path(params.get("artifacts") or os.environ.get(ARTIFACTS_ENV) or default_artifacts_dir())
        logger.info("%s: loading artifacts from %s", self.name, artifacts)
        self.setup(ArtifactLayout(artifacts), params)
        settle_loaded_objects()

    @abstractmethod
    def setup(self, layout: ArtifactLayout, params: dict[str, str]) -> None: ...

    def authorize(self, parameters: dict[str, object]) -> None:
        """Refuse a request by its parameters (forwarded headers among them) before it is read;
        every request is allowed unless a model says otherwise."""

    @abstractmethod
    def parse(self, inputs: dict[str, np.ndarray | None]) -> P:
        """Validate one request's inputs; raise RequestError naming the bad tensor or field."""

    @abstractmethod
    def compute(self, items: Sequence[P]) -> list[Arrays | RequestError]:
        """Outputs for every parsed request, in order (or the RequestError of that one request)."""

    def run(
        self, batch: Sequence[dict[str, np.ndarray | None]], parameters: Sequence[dict[str, object]] | None = None
    ) -> list[Arrays | RequestError]:
        """The per-request error isolation, on plain numpy: what `execute` does minus Triton."""
        results: list[Arrays | RequestError | None] = [None] * len(batch)
        parsed: list[tuple[int, P]] = []
        for i, inputs in enumerate(batch):
            try:
                self.authorize(parameters[i] if parameters is not None else {})
                parsed.append((i, self.parse(inputs)))
            except RequestError as err:
                results[i] = detached(err)
            except Exception as err:  # a parser bug must not fail the requests batched with this one
                logger.exception("%s: reading request %d failed", self.name, i)
                results[i] = InternalError(f"{self.name}: could not read the request ({type(err).__name__}: {err})")
        if parsed:
            for (i, _), out in zip(parsed, self.compute([p for _, p in parsed]), strict=True):
                results[i] = out
        return [r for r in results if r is not None]

    # --- Triton glue -------------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> list[Any]:
        io = IO[self.name]
        batch, parameters = [], []
        for request in requests:
            parameters.append(_parameters(request))
            inputs: dict[str, np.ndarray | None] = {}
            for spec in io.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
                inputs[spec.name] = None if tensor is None else tensor.as_numpy()
            batch.append(inputs)
        responses = []
        for result in self.run(batch, parameters):
            if isinstance(result, RequestError):
                code = pb_utils.TritonError.INVALID_ARG
                if isinstance(result, Unavailable):
                    code = pb_utils.TritonError.UNAVAILABLE
                elif isinstance(result, InternalError):
                    code = pb_utils.TritonError.INTERNAL
                error = pb_utils.TritonError(str(result), code)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
            else:
                tensors = [pb_utils.Tensor(name, value) for name, value in result.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        logger.info("%s: unloaded", self.name)


class WriteModel(BatchModel[P]):
    """A model that writes (the live index, the engagement log): a request whose
    `feedserve-write-key` header (which Triton forwards into its parameters) does not carry the
    server's $FEEDSERVE_WRITE_KEY is refused before it is read; a server started without a key
    refuses every write."""

    write_key: str | None = None

    def load_write_key(self) -> None:
        self.write_key = os.environ.get(WRITE_KEY_ENV)
        if not self.write_key:
            logger.error("%s: %s is not set: every write will be refused", self.name, WRITE_KEY_ENV)

    def authorize(self, parameters: dict[str, object]) -> None:
        if not self.write_key:
            raise RequestError(f"{FORBIDDEN}: the server has no write key ({WRITE_KEY_ENV} is not set)")
        given = next((v for k, v in parameters.items() if k.lower() == WRITE_HEADER), None)
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.write_key.encode()):
            reason = "a wrong" if given else "no"
            raise RequestError(f"{FORBIDDEN}: the request carries {reason} write key (header {WRITE_HEADER})")


class Snapshots:
    """A writer's snapshots, taken on a background thread (writes go on meanwhile) once every
    `every` writes; one at a time. A failed one is logged: the log keeps every write, and the next
    one tries again."""

    def __init__(self, take: Callable[[], object], every: int, name: str) -> None:
        self.take, self.every, self.name = take, every, name
        self._since = 0
        self._thread: threading.Thread | None = None

    def wrote(self, writes: int = 1) -> None:
        self._since += writes
        if self._since >= self.every and self._thread is None:
            self._since = 0
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self.take()
        except Exception:
            logger.exception("%s failed", self.name)
        finally:
            self._thread = None

    def join(self) -> None:
        """Wait for the snapshot being taken, if any (before the writer is closed or reopened)."""
        thread = self._thread
        if thread is not None:
            thread.join()


def _parameters(request: Any) -> dict[str, object]:
    """A request's parameters: those the client set and the headers Triton forwarded
    (`--http-header-forward-pattern`, `--grpc-header-forward-pattern`)."""
    try:
        value = json.loads(request.parameters() or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def require(inputs: dict[str, np.ndarray | None], name: str) -> np.ndarray:
    value = inputs.get(name)
    if value is None:
        raise RequestError(f"input tensor {name} is missing")
    return value


def check_2d(name: str, value: np.ndarray, dtype: type) -> np.ndarray:
    if value.dtype != np.dtype(dtype):
        raise RequestError(f"{name}: expected dtype {np.dtype(dtype).name}, got {value.dtype.name}")
    if value.ndim != 2:
        raise RequestError(f"{name}: expected shape [batch, n], got {list(value.shape)}")
    return value


def check_unit_rows(name: str, vectors: np.ndarray) -> None:
    """RequestError unless every row is unit length (within the index's NORM_TOLERANCE), as the
    encoder gives an embedding and the index stores one: a finite 3e38 would overflow the scores to inf
    (an fp16 GPU index at 1e5), and a vector 100 times too long reorders a ranker's features."""
    if (bad := off_unit(vectors)) is not None:
        raise RequestError(
            f"{name}: must be unit length (L2 norm 1 +- {NORM_TOLERANCE}), as the encoder gives it: "
            f"row {bad[0]} has norm {bad[1]:.6g}"
        )


R = TypeVar("R")


def read_records(inputs: dict[str, np.ndarray | None], parse: Callable[[bytes | str], R]) -> list[R]:
    """The RECORDS tensor ([batch, 1] JSON strings) parsed row by row; RequestError names the row."""
    raw = require(inputs, RECORDS.name)
    if raw.ndim != 2 or raw.shape[1] != 1 or raw.shape[0] == 0:
        raise RequestError(f"{RECORDS.name}: expected shape [batch, 1], got {list(raw.shape)}")
    records = []
    for i, value in enumerate(raw[:, 0]):
        if not isinstance(value, bytes | str):
            raise RequestError(f"{RECORDS.name}[{i}]: expected a JSON string, got {type(value).__name__}")
        try:
            records.append(parse(value))
        except RecordError as err:
            raise RequestError(f"{RECORDS.name}[{i}]: {err}") from err
    return records


def milvus_uri_of(params: dict[str, str], owner: str) -> str:
    """The Milvus a model with `index` "milvus" reads and writes ($FEEDSERVE_MILVUS_URI or the
    `milvus_uri` parameter)."""
    uri = milvus_uri(params.get("milvus_uri"))
    if uri is None:
        raise ValueError(f"{owner}: index milvus needs a URI ($FEEDSERVE_MILVUS_URI or the milvus_uri parameter)")
    return uri


def milvus_index_name(params: dict[str, str]) -> str:
    return params.get("milvus_collection", DEFAULT_COLLECTION)


def retention_seconds(params: dict[str, str], owner: str) -> int:
    """The engagement log's retention (the `retention_days` parameter; 0: keep every engagement), as
    `engage_write` drops by it and, with the Milvus log, `rank` reads by it."""
    days = float(params.get("retention_days", "0"))
    if not 0 <= days < 1e6:  # NaN too: a negative retention would drop every engagement
        raise ValueError(f"{owner}: retention_days must be a number of days >= 0, got {days}")
    return int(days * 86400)


def followed_index(layout: ArtifactLayout, params: dict[str, str], engine: Engine, owner: str) -> ServingIndex:
    """The post index a serving model reads: the local live index it follows (`index` "local", the
    default), or a Milvus index (`index` "milvus": $FEEDSERVE_MILVUS_URI or the `milvus_uri`
    parameter, the index named `milvus_collection`)."""
    if params.get("index", "local") == "local":
        return FollowedIndex(layout.index_dir, engine, owner)
    return MilvusFollowed(milvus_uri_of(params, owner), layout.verified_serving_dim(), milvus_index_name(params), owner)
