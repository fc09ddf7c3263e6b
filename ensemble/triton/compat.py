"""`triton_python_backend_utils` exists only inside the python backend stub; import it behind a
guard so that everything else in the package imports (and is tested) without a server."""

from __future__ import annotations

from typing import Any

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # not running inside tritonserver
    pb_utils: Any = None  # type: ignore[no-redef]


def in_triton() -> bool:
    return pb_utils is not None
