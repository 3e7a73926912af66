"""Shared by the benchmarks: print a Markdown report and write it under docs/."""

from __future__ import annotations

from pathlib import Path


def publish(lines: list[str], path: str) -> None:
    report = "\n".join(lines) + "\n"
    print(report)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(report, encoding="utf-8")
