"""Ray Data source of a rank's training-step numbers, one single-row block per step.

The stream's actor pool hands whole blocks to its actors, so the steps must arrive as separate blocks for
every actor to get work: one block holding all steps keeps the pool at one busy actor (issue 14). A
materialised dataset of one block per step would put every block in the object store up front, one object
per step of a 125,000-step run; here a few read tasks (``steps_per_task`` steps each, zero CPUs, one at a
time) yield the blocks lazily, paced by the consumer. The read op merges small blocks up to the dataset
context's ``target_max_block_size``; ``build_stream`` sets that to one byte so each step stays its own block.
This module imports neither torch nor the augmentation code: the read tasks run in light Ray workers.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

SCHEMA = pa.schema([("step", pa.int64())])


def step_blocks(start: int, stop: int) -> Iterator[pa.Table]:
    """One single-row table ``{"step": [s]}`` per step ``s`` in ``[start, stop)``."""
    for step in range(start, stop):
        yield pa.table({"step": np.array([step], dtype=np.int64)}, schema=SCHEMA)


class StepSource(Datasource):
    """Steps ``[start_step, end_step)`` in order, read by tasks of at most ``steps_per_task`` steps."""

    def __init__(self, start_step: int, end_step: int, steps_per_task: int = 1024):
        self.start_step, self.end_step, self.steps_per_task = start_step, max(start_step, end_step), steps_per_task

    def estimate_inmemory_data_size(self) -> int:
        return 8 * (self.end_step - self.start_step)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        # The split into tasks is fixed (not ``parallelism``): the blocks, one per step, are what spreads the work.
        tasks = []
        for start in range(self.start_step, self.end_step, self.steps_per_task):
            stop = min(start + self.steps_per_task, self.end_step)
            meta = BlockMetadata(num_rows=stop - start, size_bytes=8 * (stop - start), input_files=None,
                                 exec_stats=None)
            tasks.append(ReadTask(functools.partial(step_blocks, start, stop), meta, schema=SCHEMA,
                                  per_task_row_limit=per_task_row_limit))
        return tasks
