"""Online client: a member's feed, retrievals and embeddings, over Triton HTTP or gRPC.

    with FeedClient("127.0.0.1:8001", protocol="grpc") as client:
        hits = client.retrieve(member_json, k=10)          # retrieval alone
        feed = client.feed(member_json, n=10)              # retrieved, then ranked by the GR ranker

Records go to the server as JSON text, one per batch row (the `RECORDS` tensor); a dict, a JSON
string or a pydantic record all work.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import numpy as np
from tritonclient.utils import InferenceServerException

from feedserve.errors import ClientError
from feedserve.ops.keys import WRITE_HEADER, WRITE_KEY_ENV
from feedserve.schema import (
    CANDIDATE_IDS,
    CANDIDATE_SCORES,
    CANDIDATES,
    EMBEDDING,
    ENGAGE_COLUMNS,
    IDS,
    LSN,
    MAX_BATCH,
    NO_ID,
    QUERY,
    RECORDS,
    SCORES,
    TASK_SCORES,
    K,
    ModelName,
)

logger = logging.getLogger(__name__)

Protocol = Literal["http", "grpc"]
Record = dict[str, Any] | str | bytes | Any  # Any: a pydantic record (has model_dump_json)


@dataclass(frozen=True)
class Hit:
    post_id: int
    score: float


@dataclass(frozen=True)
class Ranked:
    """One post of a ranked feed: its final score and its probability for each of the ranker's tasks."""

    post_id: int
    score: float
    tasks: dict[str, float]


# How many retrieved posts `feed` ranks when the caller does not say (the ranker's maximum is 2,000).
DEFAULT_CANDIDATES = 500


def encode_record(record: Record) -> bytes:
    if isinstance(record, bytes):
        return record
    if isinstance(record, str):
        return record.encode()
    if hasattr(record, "model_dump_json"):
        return str(record.model_dump_json(exclude_none=True)).encode()
    return json.dumps(record, ensure_ascii=False).encode()


def records_tensor(records: Sequence[Record]) -> np.ndarray:
    return np.array([[encode_record(r)] for r in records], dtype=np.object_)


def protocol_module(protocol: Protocol) -> Any:
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    return module


# tritonclient's defaults, plus: this client's own subchannels (grpc otherwise shares them per
# target across a process, so one client's reconnect backoff after a server restart would make a
# fresh client fail fast too), and reconnect attempts at most 2 s apart instead of up to 120 s.
GRPC_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class FeedClient:
    """Retrievals, embeddings and any model's inference over HTTP or gRPC. Requests to index_write
    and engage_write carry `write_key` (default: $FEEDSERVE_WRITE_KEY) in the header the server checks."""

    def __init__(
        self,
        url: str = "127.0.0.1:8000",
        protocol: Protocol = "http",
        timeout_s: float = 30.0,
        write_key: str | None = None,
    ) -> None:
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.write_key = write_key or os.environ.get(WRITE_KEY_ENV)
        self._tc = protocol_module(protocol)
        self._tasks: list[str] | None = None
        self._max_batch: dict[str, int] = {}
        if protocol == "http":
            self._client = self._tc.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        else:
            self._client = self._tc.InferenceServerClient(url, channel_args=GRPC_CHANNEL_ARGS)

    def ready(self, model: str | None = None) -> bool:
        """Whether the server (or, named, one of its models) is ready."""
        try:
            if model is not None:
                return bool(self._client.is_model_ready(model))
            return bool(self._client.is_server_ready())
        except (InferenceServerException, OSError):
            return False

    def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """One inference with numpy inputs; tensors travel in binary, not JSON."""
        tensors = []
        for name, value in inputs.items():
            t = self._tc.InferInput(name, list(value.shape), _datatype(value))
            if self.protocol == "http":
                t.set_data_from_numpy(value, binary_data=True)
            else:
                t.set_data_from_numpy(value)
            tensors.append(t)
        if self.protocol == "http":
            requested = [self._tc.InferRequestedOutput(o, binary_data=True) for o in outputs]
            kwargs: dict[str, Any] = {}
        else:
            requested = [self._tc.InferRequestedOutput(o) for o in outputs]
            kwargs = {"client_timeout": self.timeout_s}
        if model in (ModelName.INDEX_WRITE, ModelName.ENGAGE_WRITE) and self.write_key:
            kwargs["headers"] = {WRITE_HEADER: self.write_key}
        try:
            result = self._client.infer(model, tensors, outputs=requested, **kwargs)
        except InferenceServerException as err:
            raise _client_error(model, err) from err
        return {o: result.as_numpy(o) for o in outputs}

    def retrieve_many(self, members: Sequence[Record], k: int = 10) -> list[list[Hit]]:
        """Each member's top `k` posts, in requests of at most the rows `retrieve` takes."""
        hits = []
        for part in self._parts(ModelName.RETRIEVE, members):
            out = self.infer(
                ModelName.RETRIEVE,
                {RECORDS.name: records_tensor(part), K.name: np.full((len(part), 1), k, np.int64)},
                (IDS.name, SCORES.name),
            )
            hits += [
                [Hit(int(i), float(s)) for i, s in zip(ids, scores, strict=True) if i != NO_ID]
                for ids, scores in zip(out[IDS.name], out[SCORES.name], strict=True)
            ]
        return hits

    def retrieve(self, member: Record, k: int = 10) -> list[Hit]:
        return self.retrieve_many([member], k)[0]

    def feed_many(
        self, members: Sequence[Record], n: int = 10, candidates: int = DEFAULT_CANDIDATES
    ) -> list[list[Ranked]]:
        """Each member's top `n` posts: `candidates` retrieved, ranked by the GR ranker (`feed`), in
        requests of at most the rows `feed` takes."""
        feeds = []
        for part in self._parts(ModelName.FEED, members):
            rows = len(part)
            out = self.infer(
                ModelName.FEED,
                {
                    RECORDS.name: records_tensor(part),
                    K.name: np.full((rows, 1), n, np.int64),
                    CANDIDATES.name: np.full((rows, 1), candidates, np.int64),
                },
                (IDS.name, SCORES.name, TASK_SCORES.name),
            )
            tasks = self.ranker_tasks()
            feeds += [
                [
                    Ranked(int(i), float(s), dict(zip(tasks, t.tolist(), strict=True)))
                    for i, s, t in zip(ids, scores, per_task, strict=True)
                    if i != NO_ID
                ]
                for ids, scores, per_task in zip(out[IDS.name], out[SCORES.name], out[TASK_SCORES.name], strict=True)
            ]
        return feeds

    def feed(self, member: Record, n: int = 10, candidates: int = DEFAULT_CANDIDATES) -> list[Ranked]:
        return self.feed_many([member], n, candidates)[0]

    def rank(
        self,
        member: Record,
        candidates: Sequence[int],
        retrieval_scores: Sequence[float] | None = None,
        query: np.ndarray | None = None,
    ) -> list[Ranked]:
        """`candidates` (post ids, retrieved elsewhere) ranked for `member` by the GR ranker (`rank`),
        best first. `retrieval_scores`, one of the ranker's features, are the candidates' retrieval
        scores (None: cosines falling from 0.9 to 0.8 in the candidates' order); `query` the member's
        embedding ([1, dim]; None: embedded here, by the encoder)."""
        n = len(candidates)
        given = np.linspace(0.9, 0.8, n) if retrieval_scores is None else np.asarray(retrieval_scores)
        out = self.infer(
            ModelName.RANK,
            {
                RECORDS.name: records_tensor([member]),
                QUERY.name: self.embed_members([member])
                if query is None
                else np.asarray(query, np.float32).reshape(1, -1),
                CANDIDATE_IDS.name: np.asarray([candidates], np.int64),
                CANDIDATE_SCORES.name: given.astype(np.float32)[None],
                K.name: np.array([[n]], np.int64),
            },
            (IDS.name, SCORES.name, TASK_SCORES.name),
        )
        tasks = self.ranker_tasks()
        return [
            Ranked(int(i), float(s), dict(zip(tasks, t.tolist(), strict=True)))
            for i, s, t in zip(out[IDS.name][0], out[SCORES.name][0], out[TASK_SCORES.name][0], strict=True)
            if i != NO_ID
        ]

    def ranker_tasks(self) -> list[str]:
        """The ranker's tasks, in the order of its TASK_SCORES columns (the rank config's `tasks`)."""
        if self._tasks is None:
            config = self._config(ModelName.RANK)
            params = config["parameters"] if self.protocol == "http" else config.config.parameters
            value = params["tasks"]["string_value"] if self.protocol == "http" else params["tasks"].string_value
            self._tasks = str(value).split(",")
        return self._tasks

    def max_batch(self, model: str) -> int:
        """The most rows one request to `model` may carry (its config's max_batch_size)."""
        if model not in self._max_batch:
            config = self._config(model)
            value = config["max_batch_size"] if self.protocol == "http" else config.config.max_batch_size
            self._max_batch[model] = max(int(value), 1)
        return self._max_batch[model]

    def _parts(self, model: str, records: Sequence[Record]) -> list[Sequence[Record]]:
        """`records` in runs of at most `max_batch(model)`: a .jsonl of any length is many requests
        rather than one the server refuses (an empty one stays one request, refused by name)."""
        size = self.max_batch(model)
        return [records[i : i + size] for i in range(0, len(records), size)] or [records]

    def _config(self, model: str) -> Any:
        try:
            return self._client.get_model_config(model)
        except InferenceServerException as err:
            raise _client_error(model, err) from err

    def engage(self, engagements: Sequence[tuple[int, int, int]]) -> int:
        """Log (member id, post id, unix seconds) engagements through `engage_write` (the write key
        needed), in requests of the rows the model takes (MAX_BATCH); the last one's sequence number
        in the log once all are durable (0 for none). `rank` reads them within about a second
        (feedserve.rank.engagements). Sent again after a failure, they change nothing: each
        (member, post) counts once."""
        rows = np.array(engagements, np.int64).reshape(-1, 3)
        lsn = 0
        for start in range(0, len(rows), MAX_BATCH):
            chunk = rows[start : start + MAX_BATCH]
            inputs = {spec.name: np.ascontiguousarray(chunk[:, j : j + 1]) for j, spec in enumerate(ENGAGE_COLUMNS)}
            lsn = int(self.infer(ModelName.ENGAGE_WRITE, inputs, (LSN.name,))[LSN.name][0, 0])
        return lsn

    def embed_posts(self, posts: Sequence[Record]) -> np.ndarray:
        return self._embed(ModelName.EMBED_POST, posts)

    def embed_members(self, members: Sequence[Record]) -> np.ndarray:
        return self._embed(ModelName.EMBED_MEMBER, members)

    def _embed(self, model: str, records: Sequence[Record]) -> np.ndarray:
        """[len(records), dim], in requests of at most the rows `model` takes."""
        parts = [
            self.infer(model, {RECORDS.name: records_tensor(part)}, (EMBEDDING.name,))[EMBEDDING.name]
            for part in self._parts(model, records)
        ]
        return np.concatenate(parts)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> FeedClient:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def _client_error(model: str, err: InferenceServerException) -> ClientError:
    """A server's refusal as the client's error, named by the model and keeping the server's status."""
    return ClientError(f"{model}: {err.message()}", str(err.status()) if err.status() is not None else None)


def _datatype(value: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return str(np_to_triton_dtype(value.dtype))
