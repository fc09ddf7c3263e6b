#!/usr/bin/env bash
# Style and types, checked rather than remembered (run by `make test` before pytest):
# ruff lints and checks the format of every Python file; mypy checks the package `feedserve`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FEEDSERVE_VENV:-$ROOT/.venv}"
cd "$ROOT"
"$VENV/bin/ruff" check --quiet .
"$VENV/bin/ruff" format --check --quiet .
# The package maps folders onto import paths (pyproject.toml: feedserve = ensemble/, feedserve.export
# = export/, ...), which mypy cannot read from the editable install; a tree of links gives it the
# import paths as folders.
TREE="$ROOT/build/typecheck/feedserve"
rm -rf "$TREE" && mkdir -p "$TREE"
for entry in "$ROOT"/ensemble/*; do
  case "$(basename "$entry")" in __pycache__) continue ;; esac
  ln -s "$entry" "$TREE/"
done
for sub in export clients training; do ln -s "$ROOT/$sub" "$TREE/$sub"; done
"$VENV/bin/mypy" --cache-dir "$ROOT/build/mypy-cache" "$TREE"
