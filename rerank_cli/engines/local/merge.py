"""Exactly-once merge of scored parts into the output, in input order, streaming.

Parts finish in any order; `OrderedMerge` writes each one as soon as every part before it is written,
so the output grows while workers still score (the merge hides behind scoring) and memory holds one
record batch at a time, whatever the size of the file. Each part is written once, and only if it
holds exactly the rows its shard had.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rerank_cli.errors import WorkerError


class OrderedMerge:
    """Writes parts 0, 1, 2, ... to `writer` as they become available."""

    def __init__(self, writer, part_path: Callable[[int], Path]):
        self.writer = writer
        self.part_path = part_path
        self.next = 0  # the first shard not yet written
        self.rows = 0
        self._ready: dict[int, int] = {}  # shard -> expected rows

    def add(self, shard: int, rows: int) -> None:
        """Shard `shard` is scored and its part holds `rows` rows."""
        if shard >= self.next:
            self._ready[shard] = rows

    def flush(self) -> int:
        """Write every part that is next in line; returns how many were written."""
        written = 0
        while self.next in self._ready:
            self.rows += copy_part(self.part_path(self.next), self.writer, self._ready.pop(self.next))
            self.next += 1
            written += 1
        return written

    def complete(self, shards: int | None) -> bool:
        return shards is not None and self.next >= shards


def copy_part(path: Path, writer, expect_rows: int | None = None) -> int:
    """Stream one part file (Arrow IPC, memory-mapped) into `writer`, batch by batch."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    rows = 0
    with pa.memory_map(str(path)) as source:
        reader = ipc.open_file(source)
        if expect_rows is not None and reader.count_rows() != expect_rows:
            raise WorkerError(f"{path}: holds {reader.count_rows()} rows, expected {expect_rows}; "
                              "remove the work dir and run again")
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            writer.write(batch)
            rows += batch.num_rows
    return rows


def merge_parts(paths: list[Path], writer) -> int:
    """Write whole parts in the order given (what a finished run's merge amounts to)."""
    return sum(copy_part(p, writer) for p in paths)
