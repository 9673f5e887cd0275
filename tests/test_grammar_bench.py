"""The grammar-engine comparison's machinery, on llguidance and the tiny model's tokenizer (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

from forge_batch.grammar_bench import bench_engine, markdown_table, recommendation
from forge_batch.models.registry import load_model_files

SCHEMAS = json.loads((Path(__file__).parent / "data" / "schemas.json").read_text())


def test_llguidance_follows_examples_and_walks_stay_valid(tiny_model_dir):
    config, _, tokenizer = load_model_files(str(tiny_model_dir))
    cases = [c for c in SCHEMAS if c["name"] in ("person", "calendar_event", "line_segment", "word_counts")]
    report = bench_engine("llguidance", cases, tokenizer, config.vocab_size, walks=3, walk_tokens=128, seed=1)
    assert report.compiled == len(cases) and not report.failed
    assert not report.not_followed, report.not_followed
    assert report.walks > 0 and not report.unsound, report.unsound
    assert len(report.mask_us) >= len(cases)
    table = markdown_table([report])
    assert "| llguidance |" in table and f"{len(cases)}/{len(cases)}" in table
    assert "llguidance" in recommendation([report])


def test_missing_engine_is_reported_not_raised(tiny_model_dir, monkeypatch):
    import forge_batch.grammar_bench as gb

    class Missing(gb.LLGuidanceEngine):
        name = "missing"

        def __init__(self, tokenizer, vocab_size):
            raise gb.EngineUnavailable("missing is not installed")

    monkeypatch.setitem(gb.ENGINES, "missing", Missing)
    config, _, tokenizer = load_model_files(str(tiny_model_dir))
    report = bench_engine("missing", SCHEMAS[:1], tokenizer, config.vocab_size, walks=0, walk_tokens=1, seed=0)
    assert report.unavailable and "not installed" in markdown_table([report])
