"""One base error for feedserve and one subclass per layer, so a caller can catch a layer's
failures, or all of feedserve's, by one name. Narrower errors subclass their layer's class where
they are raised (a write-ahead log's `LogError` is an `IndexStoreError`, an export's `ParityError`
an `ExportError`). The python backends map errors to Triton's codes (feedserve.triton.base)."""

from __future__ import annotations


class FeedserveError(Exception):
    """Anything feedserve refuses or fails at, with a message naming the file, field or tensor."""


class RecordError(FeedserveError, ValueError):
    """prompt: a post or member record that cannot be used (the message names the field)."""


class ExportError(FeedserveError):
    """export: a model could not be imported, exported or checked against its reference."""


class IndexStoreError(FeedserveError, ValueError):
    """index: an index file, log or write that is invalid, or an index that cannot be opened."""


class ServerError(FeedserveError):
    """ops: the artifacts or the server cannot be used (missing or damaged files, a server that
    does not start)."""


# How Triton's python backend answers for a model whose stub process died (status INTERNAL).
DEAD_STUB = "is not healthy"
# How Triton answers for a model of the repository with no version loaded: loading, reloading after
# its stub died, or unloaded (NOT_FOUND over gRPC, 400 over HTTP, where it reads as refused).
NOT_LOADED = "has no available versions"
# How index_write refuses a request without the write key (status INVALID_ARGUMENT, as Triton's
# python backend has no code for permissions): a client's configuration, not its data, is wrong.
FORBIDDEN = "forbidden"


class ClientError(FeedserveError):
    """clients: the server refused or failed a request; the message carries its reason, `status` the
    protocol's code (e.g. StatusCode.UNAVAILABLE over gRPC, 400 over HTTP) where it gave one."""

    def __init__(self, message: str, status: str | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def refused(self) -> bool:
        """The request itself was refused as invalid (only then may an ingester skip it)."""
        if NOT_LOADED in str(self):
            return False
        return self.status is not None and any(code in self.status for code in ("INVALID_ARGUMENT", "400"))

    @property
    def forbidden(self) -> bool:
        """The server refused a write for want of the write key: no retry and no other record
        will succeed until the client is given the key (an ingester stops rather than skip)."""
        return self.refused and f"{FORBIDDEN}:" in str(self)

    @property
    def retryable(self) -> bool:
        """The server was unreachable, restarting or too slow, one of its python models lost its
        stub process (the launcher's watchdog reloads it within seconds), or the model has no
        version loaded yet: the same request may succeed later. A refused request (bad input) is not."""
        if DEAD_STUB in str(self) or NOT_LOADED in str(self):
            return True
        return self.status is not None and any(
            code in self.status for code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "503")
        )
