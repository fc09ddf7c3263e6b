"""The two keys a feedserve server checks, and where clients find them.

- The admin key guards Triton's admin APIs (model load and unload, repository index, shared memory,
  trace and log settings): Triton itself answers them only when the request carries ADMIN_HEADER
  with the key (`--http-restricted-api` / `--grpc-restricted-protocol`; over gRPC with Triton's
  prefix). Unset, the launcher uses a random key nobody knows, which turns them off.
- The write key guards the live index: `index_write` refuses a request whose WRITE_HEADER does not
  carry it (Triton forwards the header into the request's parameters, `--*-header-forward-pattern`).
  It comes from $FEEDSERVE_WRITE_KEY, else from `write.key` in the artifact directory, created
  (random, readable by its owner only) the first time a server starts on it, so that the ingester
  finds it without configuration (`FeedClient` takes `write_key=` or the variable). A deployment
  sets the variable from a secret instead.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

logger = logging.getLogger(__name__)

ADMIN_APIS = "model-repository,shared-memory,trace,logging"
ADMIN_HEADER = "feedserve-admin-key"
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER
ADMIN_KEY_ENV = "FEEDSERVE_ADMIN_KEY"

WRITE_HEADER = "feedserve-write-key"
WRITE_KEY_ENV = "FEEDSERVE_WRITE_KEY"
WRITE_KEY_FILE = "write.key"


def write_key(artifacts: Path | None = None, create: bool = False) -> str | None:
    """$FEEDSERVE_WRITE_KEY, else the artifact directory's key file (made when `create`), else None."""
    if key := os.environ.get(WRITE_KEY_ENV):
        return key
    if artifacts is None:
        return None
    path = Path(artifacts) / WRITE_KEY_FILE
    if create and _empty(path):
        # An empty key file (a start killed between creating and writing it, before keys were
        # written whole) refused every write, silently, forever: made again.
        logger.warning("%s is empty: making a new write key", path)
        path.unlink(missing_ok=True)
    if create and not path.exists():
        # Written whole under another name, then linked into place: never seen half written, and
        # two servers starting at once agree on the first key linked (a link does not replace).
        tmp = path.with_name(f".{WRITE_KEY_FILE}.{os.getpid()}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(16) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
        except FileExistsError:
            pass
        except OSError as err:  # a read-only artifact directory (a container's mount): no key, no writes
            logger.warning("cannot create %s (%s): set %s to take writes", path, err, WRITE_KEY_ENV)
            return None
        finally:
            tmp.unlink(missing_ok=True)
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except FileNotFoundError:
        return False
