"""Append one benchmark run to a Markdown results file: when, the exact command, the machine, the numbers."""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path

from scalelab.runtime import machine_description


def append_results(path: str | Path, lines: list[str], title: str = "") -> None:
    """One section: a header with the time (and ``title``, e.g. which model), the command, the machine, ``lines``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        f.write(f"\n## {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC{': ' + title if title else ''}\n\n")
        f.write(f"- command: `python {' '.join(sys.argv)}`\n")
        f.write(f"- machine: {machine_description()}\n")
        f.writelines(f"- {line}\n" for line in lines)
