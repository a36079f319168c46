"""Metrics as JSON lines, and optionally TensorBoard events, written by the main process."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from scalelab.errors import ScalelabError


class MetricsLogger:
    def __init__(self, path: str | Path, enabled: bool = True, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard_dir:
                try:
                    # deferred: tensorboard is an optional extra (pip install scalelab[tensorboard])
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    raise ScalelabError("run.tensorboard = true needs TensorBoard: pip install 'scalelab[tensorboard]'") from None
                self._tb = SummaryWriter(str(tensorboard_dir))

    def log(self, **record) -> None:
        if not self.enabled:
            return
        record.setdefault("time", time.time())
        # Append one complete line per record: an interrupted run keeps every earlier line intact.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            kind = record.get("kind", "metric")
            for k, v in record.items():
                if k not in ("step", "kind", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
    return out


def truncate_after(path: str | Path, step: int) -> None:
    """Drop records past ``step``: a resumed run rewrites them, so the log never holds two histories."""
    p = Path(path)
    if not p.is_file():
        return
    keep = [r for r in read_metrics(p) if r.get("step", 0) <= step]
    p.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
