"""A single-file output (``output.path: results.jsonl``, OpenAI batch format): the committed parts, kept in
the state folder while the run goes, merged into one file in input order once every row is done.

Each part holds one line per request, sorted by input position (the writer sorts them); a part's ledger
says which positions those are. So the file is a k-way merge of sorted runs, in bounded memory (one line per
open part, plus the positions), whatever order rows finished in or however many resumes it took.
"""

from __future__ import annotations

import contextlib
import heapq
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc

# Parts merged at once; more are merged in rounds through temp files (an open file each).
FAN_IN = 128


def request_positions(ledger: pa.Table) -> list[int]:
    """The input positions of a part's lines: one line per request with a sample that was not dropped,
    in input order."""
    kept = ledger.filter(pc.not_equal(ledger.column("status"), "dropped"))
    return sorted(set(kept.column("row_index").to_pylist()))


def _lines(path: Path, positions: Sequence[int]) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        count = 0
        for line in f:
            if count >= len(positions):
                raise ValueError(f"{path} has more lines than its ledger has requests ({len(positions)})")
            yield positions[count], line if line.endswith(b"\n") else line + b"\n"
            count += 1
    if count != len(positions):
        raise ValueError(f"{path} has {count} lines, its ledger {len(positions)} requests")


def _merge_group(runs: Sequence[tuple[Path, Sequence[int]]], out: BinaryIO) -> list[int]:
    merged: list[int] = []
    with contextlib.ExitStack() as stack:
        streams = [stack.enter_context(contextlib.closing(_lines(path, keys))) for path, keys in runs]
        for position, line in heapq.merge(*streams, key=lambda item: item[0]):
            out.write(line)
            merged.append(position)
    return merged


def merge_in_input_order(
    runs: Sequence[tuple[Path, Sequence[int]]], out: BinaryIO, tmp_dir: Path, create: Callable[[Path], int]
) -> int:
    """Write the lines of every run (a part and its lines' input positions) to ``out`` in input order;
    returns the number of lines. ``create(path)`` opens a new temp file (for rounds of more than FAN_IN)."""
    temps: list[Path] = []
    try:
        runs = list(runs)
        while len(runs) > FAN_IN:
            next_round: list[tuple[Path, Sequence[int]]] = []
            for i in range(0, len(runs), FAN_IN):
                tmp = tmp_dir / f".merge-{len(temps):05d}.tmp"
                temps.append(tmp)
                with os.fdopen(create(tmp), "wb") as f:
                    next_round.append((tmp, _merge_group(runs[i:i + FAN_IN], f)))
            runs = next_round
        return len(_merge_group(runs, out))
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
