"""Run under torchrun by tests/test_crash_safety.py: `scalelab` itself, with one rank stopped mid DCP save.

    SCALELAB_TEST_DCP_STOP=STEP:RANK:MARKER torchrun --standalone --nproc_per_node 2 \\
        tests/dcp_crash_worker.py pretrain ...

When the sharded checkpoint of STEP is being written, rank RANK writes its own shard files, then
writes its pid to MARKER and blocks inside torch.distributed.checkpoint's save, before the write
results are gathered and before the ``.metadata`` file exists: the test kills it there. Without
the variable this is plain ``scalelab``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from torch.distributed.checkpoint.filesystem import _FileSystemWriter

from scalelab.cli import main


def stop_after_own_shards(step: int, rank: int, marker: Path) -> None:
    real_write_data = _FileSystemWriter.write_data

    def write_data(self, plan, planner):
        written = real_write_data(self, plan, planner)
        if int(os.environ["RANK"]) == rank and Path(self.path).name == f".step_{step:06d}.dcp.tmp":
            written.wait()  # this rank's shard files are complete on disk
            marker.write_text(str(os.getpid()))
            while True:
                time.sleep(1)
        return written

    _FileSystemWriter.write_data = write_data


if __name__ == "__main__":
    spec = os.environ.get("SCALELAB_TEST_DCP_STOP")
    if spec:
        step, rank, marker = spec.split(":", 2)
        stop_after_own_shards(int(step), int(rank), Path(marker))
    sys.exit(main(sys.argv[1:]))
