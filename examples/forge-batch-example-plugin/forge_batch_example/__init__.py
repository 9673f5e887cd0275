"""A forge-batch plugin in one module: a ``csv`` output format and a ``top2`` sampler.

Installed, it is found through the ``forge_batch`` entry point declared in pyproject.toml; a job then uses
``output.format: csv`` and ``sampling.sampler: top2``. Each hook implementation is a plain function
decorated with ``hookimpl`` and named after the hook (see docs/plugins.md for every hook's signature).
"""

from __future__ import annotations

import csv
from typing import Any

from forge_batch.hookspecs import hookimpl
from forge_batch.io.base import WriteContext, Writer


class CsvWriter(Writer):
    """One CSV file per part: id, sample, text, finish reason and error (spreadsheet-friendly).

    The runner passes an Arrow table with the run's fixed schema and a hidden temporary path, and renames
    the file into place after write_part returns, so the writer needs no atomicity of its own."""

    name = "csv"
    extension = ".csv"
    columns = ("sample_index", "text", "finish_reason", "completion_tokens", "error")

    def write_part(self, table: Any, path: str, context: WriteContext) -> None:
        id_column = context.id_column
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow([id_column, *self.columns])
            for row in table.to_pylist():
                writer.writerow([row[id_column], *(row[c] for c in self.columns)])


def top2_sampler(logits: Any, batch: Any) -> Any:
    """Pick between each row's two most likely tokens, in proportion to their probabilities.

    ``logits`` is [S, V] (after penalties, bias and constraint masks); ``batch.uniforms`` holds one random
    number in (0, 1) per row, derived from the request's seed, so results are reproducible and resumable."""
    import torch

    top = torch.topk(logits, 2, dim=-1)
    probs = torch.softmax(top.values, dim=-1)
    pick_second = batch.uniforms.to(probs.device) > probs[:, 0].double()
    return torch.where(pick_second, top.indices[:, 1], top.indices[:, 0])


@hookimpl
def register_writers() -> dict[str, Writer]:
    return {"csv": CsvWriter()}


@hookimpl
def register_samplers() -> dict[str, Any]:
    return {"top2": top2_sampler}
