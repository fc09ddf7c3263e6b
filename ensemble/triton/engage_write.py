"""The `engage_write` model: the engagement log's single writer (one instance; see
feedserve.rank.engagements).

Each request's engagements (MEMBER_ID engaged with POST_ID at ENGAGED_AT, one per row) are checked,
appended to `engagements.wal` in the live index's directory as one record and fsynced; its LSN
output comes back only after that. Every `rank` instance follows the log and merges what it reads
into the build's co-engagement table within about a second, so a post liked since the build is
co-engaged at once, not at the next build. A post or member id need not be known: an engagement with
a post the index does not hold yet is kept for when it is written. A bad request (negative ids, a
time that is not unix seconds, shapes that disagree) fails alone, nothing of it logged. Every
`snapshot_every` writes the log is folded into `engagements.npz` on a background thread (writes go
on meanwhile) and restarted, so that the log stays short and a `rank` that starts reads the
snapshot instead of every record ever logged; with `retention_days`, the snapshot drops engagements
older than that (`EngagementWriter.snapshot`). Writes need the write key, as `index_write`'s do.
With the `milvus` index, servers share no directory: the log is then a Milvus collection beside the
post index's (`MilvusEngagements`), any number of replicas write it, and the LSN output is the
write's time in microseconds since the epoch; with `retention_days` a write stores only the
engagements inside the window and deletes those that fell out of it (every `rank` reads by the same
window).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from feedserve.artifacts import ArtifactLayout
from feedserve.errors import IndexStoreError
from feedserve.index.wal import LogError
from feedserve.rank.engagements import EngagementWriter, MilvusEngagements, check
from feedserve.schema import ENGAGE_COLUMNS, ENGAGED_AT, LSN, MEMBER_ID, POST_ID, ModelName
from feedserve.triton.base import (
    Arrays,
    RequestError,
    Snapshots,
    Unavailable,
    WriteModel,
    check_2d,
    milvus_index_name,
    milvus_uri_of,
    require,
    retention_seconds,
)

logger = logging.getLogger(__name__)


@dataclass
class Engagements:
    members: np.ndarray  # int64 [n]
    posts: np.ndarray
    times: np.ndarray


class EngageWriteModel(WriteModel[Engagements]):
    name = ModelName.ENGAGE_WRITE

    def setup(self, layout: ArtifactLayout, params: dict[str, str]) -> None:
        self.load_write_key()
        self.milvus: MilvusEngagements | None = None
        self.retention_s = retention_seconds(params, "engage_write")
        if params.get("index", "local") != "local":
            self.milvus = MilvusEngagements(
                milvus_uri_of(params, "engage_write"), milvus_index_name(params), self.retention_s
            )
            return
        self.directory = layout.index_dir.root
        self.lock_wait_s = float(params.get("writer_lock_wait_s", "30"))
        self.writer = self._open()
        every = int(params.get("snapshot_every", "1000"))
        self.snapshots = Snapshots(lambda: self.writer.snapshot(), every, "engagement-snapshot")

    def _open(self) -> EngagementWriter:
        return EngagementWriter.open(self.directory, lock_wait_s=self.lock_wait_s, retention_s=self.retention_s)

    def parse(self, inputs: dict[str, np.ndarray | None]) -> Engagements:
        columns = [check_2d(spec.name, require(inputs, spec.name), np.int64) for spec in ENGAGE_COLUMNS]
        shapes = [list(c.shape) for c in columns]
        if columns[0].shape[1] != 1 or any(c.shape != columns[0].shape for c in columns):
            raise RequestError(
                f"{MEMBER_ID.name}, {POST_ID.name} and {ENGAGED_AT.name} must all be [n, 1], got {shapes}"
            )
        members, posts, times = (c[:, 0] for c in columns)
        try:
            check(members, posts, times)
        except ValueError as err:
            raise RequestError(str(err)) from err
        return Engagements(members, posts, times)

    def compute(self, items: Sequence[Engagements]) -> list[Arrays | RequestError]:
        if self.milvus is not None:
            return [self._write_milvus(self.milvus, batch) for batch in items]
        if self.writer.failed:
            logger.warning("engage_write: reopening %s after a failed write", self.writer.path)
            self.snapshots.join()
            self.writer.close()  # its lock too: a flock is per open file, even within one process
            try:
                self.writer = self._open()
            except (IndexStoreError, OSError) as err:  # still failing: retryable; the next batch tries again
                logger.error("engage_write: could not reopen %s: %s", self.writer.path, err)
                return [Unavailable(f"engage_write: the log could not be reopened: {err}") for _ in items]
        outputs: list[Arrays | RequestError] = []
        for batch in items:
            try:
                lsn = self.writer.write(batch.members, batch.posts, batch.times)
            except LogError as err:  # not acknowledged; the next batch reopens the log
                outputs.append(Unavailable(f"engage_write: {err}"))
                continue
            outputs.append({LSN.name: np.full((len(batch.members), 1), lsn, np.int64)})
            self.snapshots.wrote()
        return outputs

    @staticmethod
    def _write_milvus(log: MilvusEngagements, batch: Engagements) -> Arrays | RequestError:
        try:
            written = log.write(batch.members, batch.posts, batch.times)
        except Exception as err:  # Milvus did not take it: not acknowledged, the client retries
            logger.exception("engage_write: Milvus write failed")
            return Unavailable(f"engage_write: Milvus: {type(err).__name__}: {err}")
        return {LSN.name: np.full((len(batch.members), 1), written, np.int64)}

    def finalize(self) -> None:
        if self.milvus is not None:
            self.milvus.close()
            return super().finalize()
        self.snapshots.join()
        self.writer.close()
        super().finalize()


TritonPythonModel = EngageWriteModel
