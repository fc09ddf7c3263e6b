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
    if create and not path.exists():
        try:  # O_EXCL: two servers starting at once agree on the first key written
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        except OSError as err:  # a read-only artifact directory (a container's mount): no key, no writes
            logger.warning("cannot create %s (%s): set %s to take writes", path, err, WRITE_KEY_ENV)
            return None
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(16) + "\n")
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
