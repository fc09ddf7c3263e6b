"""The benchmarks: each `python -m benchmarks.NAME` measures and saves its report (benchmarks/README.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(out: Path, name: str, report: Any, markdown: str, markdown_name: str | None = None) -> None:
    """Save a benchmark's report in `out`: its numbers as `name.json`, its text as `name.md` (or
    `markdown_name`, e.g. a report folder's README.md); and print the text."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / (markdown_name or f"{name}.md")).write_text(markdown)
    print(markdown)
