"""The artifact manifest: every file the server loads, with its size and SHA-256, checked at load.

`feedserve build` writes `manifest.json` at the root of the artifact directory once every artifact
is in place (the checkpoint, the ONNX graphs, buckets, serving settings). The server checks the whole
manifest before it starts tritonserver, and each backend checks the files it is about to load, so a
truncated, corrupted or swapped file is refused with its name instead of being served. Two artifacts
carry their checksum themselves because they are written elsewhere: the index, rewritten while the
server runs (`feedserve.index.snapshot`), and a TensorRT plan, built on the GPU node (its metadata,
`feedserve.export.tensorrt`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from feedserve.errors import ServerError
from feedserve.files import atomic_write, sha256_file

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "feedserve-manifest-1"


class ManifestError(ServerError):
    """An artifact is missing from the manifest, or differs from what the manifest recorded."""


def _entry(path: Path) -> dict[str, object]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _files(paths: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        out.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    return out


def read_manifest(root: Path) -> dict[str, dict[str, object]]:
    path = root / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ManifestError(f"{path} is missing: build the artifacts with `feedserve build`, which writes it") from err
    except (OSError, ValueError) as err:
        raise ManifestError(f"cannot read {path}: {err}") from err
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT
        or not isinstance(data.get("files"), dict)
        or not all(isinstance(entry, dict) for entry in data["files"].values())
    ):
        raise ManifestError(f"{path} is not a feedserve manifest ({FORMAT})")
    return data["files"]


def write_manifest(root: Path, paths: Iterable[Path]) -> Path:
    """Record `paths` (files, or directories taken whole) relative to `root`."""
    files: dict[str, dict[str, object]] = {}
    for path in _files(paths):
        files[path.relative_to(root).as_posix()] = _entry(path)
    target = root / MANIFEST
    atomic_write(target, json.dumps({"format": FORMAT, "files": dict(sorted(files.items()))}, indent=1) + "\n")
    logger.info("manifest: %d files in %s", len(files), target)
    return target


def verify(root: Path, paths: Iterable[Path] | None = None, also: Iterable[Path] = ()) -> int:
    """Check `paths` (files or directories; default: everything listed), and `also` (files that must
    be listed if they exist: what the server loads), against the manifest. Returns the number of
    files checked; ManifestError names the first file that fails."""
    files = read_manifest(root)
    todo = [root / rel for rel in files] if paths is None else _files(paths)
    todo = list(dict.fromkeys([*todo, *(p for p in _files(also) if p.exists())]))
    for path in todo:
        want = files.get(path.relative_to(root).as_posix())
        if not path.is_file():
            raise ManifestError(f"{path} is missing")
        if want is None:
            raise ManifestError(f"{path} is not listed in {root / MANIFEST}: rebuild with `feedserve build`")
        try:
            got = _entry(path)
        except OSError as err:  # unreadable (permissions, I/O error): as refused as a damaged file
            raise ManifestError(f"{path}: cannot be read ({err})") from err
        if got["size"] != want.get("size"):
            raise ManifestError(
                f"{path}: {got['size']} bytes, the manifest says {want.get('size')} "
                "(truncated or replaced); rebuild with `feedserve build --force`"
            )
        if got["sha256"] != want.get("sha256"):
            raise ManifestError(
                f"{path}: checksum differs from {root / MANIFEST} (corrupted or replaced); "
                "rebuild with `feedserve build --force`"
            )
    return len(todo)


def main(argv: list[str] | None = None) -> int:
    """`python -m feedserve.ops.manifest verify DIR` (the container's entrypoint runs it before Triton
    starts) or `write DIR` (after adding files by hand: vouch for them)."""
    import argparse
    import sys

    from feedserve.artifacts import ArtifactLayout

    p = argparse.ArgumentParser(prog="python -m feedserve.ops.manifest", description=main.__doc__)
    p.add_argument("command", choices=("verify", "write"))
    p.add_argument("artifacts", type=Path)
    args = p.parse_args(argv)
    layout = ArtifactLayout(args.artifacts)
    if args.command == "write":
        print(layout.write_manifest())
        return 0
    try:
        print(f"{layout.verify()} files match {args.artifacts / MANIFEST}")
    except ManifestError as err:
        print(f"feedserve.ops.manifest: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # Run as a script this module is `__main__`, and the layout raises `feedserve.ops.manifest`'s
    # ManifestError, not this copy's: the importable module's main catches the one raised.
    from feedserve.ops.manifest import main as _main

    raise SystemExit(_main())
