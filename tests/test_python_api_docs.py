"""docs/python-api.md compares vLLM's LLM / SamplingParams with ours: every option we have is in its table,
and every vLLM option we refuse is listed as absent."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from forge_batch import SamplingParams
from forge_batch.engine.llm import LLM, VLLM_ONLY_OPTIONS
from forge_batch.engine.sampling_params import VLLM_ONLY_SAMPLING

DOC = Path(__file__).resolve().parent.parent / "docs" / "python-api.md"


def table_rows(section: str) -> list[tuple[list[str], str]]:
    """(names in the first column, the row's verdict) for each row of the table under ``## section``."""
    text = DOC.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or set(cells[0]) <= {"-"} or cells[0] == "vLLM":
            continue
        rows.append((re.findall(r"`([A-Za-z_]+)`", cells[0]), cells[1]))
    return rows


def named(rows: list[tuple[list[str], str]]) -> dict[str, str]:
    return {name: verdict for names, verdict in rows for name in names}


def test_every_sampling_params_field_is_in_the_table() -> None:
    table = named(table_rows("`SamplingParams(...)`"))
    fields = {f.name for f in dataclasses.fields(SamplingParams) if not f.name.startswith("_")}
    assert fields - set(table) == set()
    assert all(verdict in ("same", "different", "absent", "") for verdict in table.values())


def test_every_vllm_sampling_option_refused_is_in_the_table_as_absent_or_different() -> None:
    table = named(table_rows("`SamplingParams(...)`"))
    for name in VLLM_ONLY_SAMPLING:
        assert table.get(name) in ("absent", "different"), name


def test_every_llm_option_is_in_the_table_and_refused_ones_are_absent() -> None:
    table = named(table_rows("`LLM(...)`"))
    params = {name for name, p in inspect.signature(LLM.__init__).parameters.items()
              if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}
    assert params - set(table) == set()
    for name in VLLM_ONLY_OPTIONS:
        assert table.get(name) == "absent", name
