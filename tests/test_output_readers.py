"""An output directory is a table for every reader, at any moment: DuckDB, Polars, pandas, pyarrow and HF
datasets read exactly the result rows after a run and during one (parts committed, the lock held, a part
half-written), and an output written by the older layout (state inside the directory) resumes."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runner_helpers import make_job, prompts, read_output, run, write_jsonl

from forge_batch.io.output_dir import OutputDir, OutputDirError, state_dir_for

N_ROWS = 18


def _duckdb(sql: str) -> int:
    import duckdb

    with duckdb.connect() as con:
        return con.execute(sql).fetchone()[0]


def _hf(cache: Path, *args: Any, **kwargs: Any) -> Any:
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset(*args, split="train", cache_dir=str(cache), **kwargs)


def readers(cache: Path) -> dict[str, Callable[[Path], tuple[int, set[str]]]]:
    """Each reader's (row count, ids) for an output directory, the way its users write it."""
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    def ids_of(values: list[Any]) -> tuple[int, set[str]]:
        return len(values), set(values)

    return {
        "duckdb read_parquet(dir)": lambda d: (
            _duckdb(f"select count(*) from read_parquet('{d}')"),
            {r[0] for r in _duckdb_rows(f"select id from read_parquet('{d}')")},
        ),
        "duckdb dir/**/*.parquet": lambda d: (
            _duckdb(f"select count(*) from read_parquet('{d}/**/*.parquet')"),
            {r[0] for r in _duckdb_rows(f"select id from read_parquet('{d}/**/*.parquet')")},
        ),
        "polars read_parquet(dir)": lambda d: ids_of(pl.read_parquet(d)["id"].to_list()),
        "polars scan_parquet(dir)": lambda d: ids_of(pl.scan_parquet(d).collect()["id"].to_list()),
        "pandas read_parquet(dir)": lambda d: ids_of(pd.read_parquet(d)["id"].tolist()),
        "pyarrow read_table(dir)": lambda d: ids_of(pq.read_table(d).column("id").to_pylist()),
        "pyarrow dataset(dir)": lambda d: ids_of(ds.dataset(d, format="parquet").to_table().column("id").to_pylist()),
        "datasets parquet data_dir": lambda d: ids_of(_hf(cache / f"p{_n()}", "parquet", data_dir=str(d))["id"]),
        "datasets load_dataset(dir)": lambda d: ids_of(_hf(cache / f"d{_n()}", str(d))["id"]),
    }


_counter = [0]


def _n() -> int:
    # a fresh cache per read: HF datasets would otherwise answer a mid-run read from the earlier one
    _counter[0] += 1
    return _counter[0]


def _duckdb_rows(sql: str) -> list[tuple[Any, ...]]:
    import duckdb

    with duckdb.connect() as con:
        return con.execute(sql).fetchall()


@pytest.fixture
def offline_hf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _job(tmp_path: Path, limit: int | None = None, **output: Any):
    write_jsonl(tmp_path / "in.jsonl", prompts(N_ROWS))
    return make_job(tmp_path, {"input": {"path": "in.jsonl", "limit": limit},
                               "output": {"path": "out", "rows_per_file": 5, **output}})


def test_every_reader_reads_exactly_the_rows_after_a_run(tmp_path: Path, offline_hf: None) -> None:
    job = _job(tmp_path)
    assert run(job).status == "completed"
    out = tmp_path / "out"
    want = {f"r{i:04d}" for i in range(N_ROWS)}
    results = {name: read(out) for name, read in readers(tmp_path / "hf-cache").items()}
    assert results == {name: (N_ROWS, want) for name in results}
    # nothing but the parts in the directory: the resume state is in its own folder next to it
    assert sorted(p.name for p in out.iterdir()) == [f"part-{i:05d}.parquet" for i in range(4)]
    assert (state_dir_for(out) / "summary.json").is_file() and (state_dir_for(out) / "ledger").is_dir()


def test_every_reader_reads_exactly_the_committed_rows_during_a_run(
    tmp_path: Path, offline_hf: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read while the third part is half-written and the lock is held: the two committed parts, nothing else."""
    from forge_batch.plugins.writers import ParquetWriter

    original = ParquetWriter.write_part
    seen: dict[str, tuple[int, set[str]]] = {}
    calls = {"n": 0}

    def write_and_read(self: ParquetWriter, table: pa.Table, path: str, context: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            with open(path, "wb") as f:  # a part half-written, as readers meet it mid-run
                f.write(b"PAR1" + b"\0" * 200)
            out = tmp_path / "out"
            with pytest.raises(OutputDirError, match="another run"):
                OutputDir(out, ".parquet").open("fp", {}, "parquet")  # the run holds the lock
            seen.update({name: read(out) for name, read in readers(tmp_path / "hf-cache").items()})
        original(self, table, path, context)

    monkeypatch.setattr(ParquetWriter, "write_part", write_and_read)
    assert run(_job(tmp_path)).status == "completed"
    committed = {r["id"] for r in pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist()}
    committed |= {r["id"] for r in pq.read_table(tmp_path / "out" / "part-00001.parquet").to_pylist()}
    assert len(committed) == 10
    assert seen == {name: (10, committed) for name in readers(tmp_path / "hf-cache")}


def _to_old_layout(out: Path) -> None:
    """What an older version left: the state inside the directory, a temp part beside the parts."""
    state = state_dir_for(out)
    (state / "lock").unlink()
    shutil.move(str(state), str(out / "_forge_batch"))
    (out / ".part-00009.parquet.tmp").write_bytes(b"PAR1 half written")


def test_an_output_of_the_older_layout_resumes_and_is_moved_out(tmp_path: Path, offline_hf: None) -> None:
    assert run(_job(tmp_path, limit=10)).status == "completed"
    out = tmp_path / "out"
    _to_old_layout(out)
    result = run(_job(tmp_path))  # all rows: the first 10 are committed, the rest is generated now
    assert result.status == "completed" and result.summary["resumed_rows"] == 10
    assert result.summary["this_run"]["rows"] == N_ROWS - 10
    assert sorted(r["id"] for r in read_output(out)) == [f"r{i:04d}" for i in range(N_ROWS)]
    assert not (out / "_forge_batch").exists() and not (out / ".part-00009.parquet.tmp").exists()
    manifest = json.loads((state_dir_for(out) / "manifest.json").read_text())
    assert [p["file"] for p in manifest["parts"]] == [f"part-{i:05d}.parquet" for i in range(4)]
    counts = {name: read(out)[0] for name, read in readers(tmp_path / "hf-cache").items()}
    assert counts == {name: N_ROWS for name in counts}


def test_an_older_versions_run_still_holding_its_lock_is_not_disturbed(tmp_path: Path) -> None:
    import fcntl

    assert run(_job(tmp_path, limit=10)).status == "completed"
    out = tmp_path / "out"
    _to_old_layout(out)
    lock = out / "_forge_batch" / "lock"
    lock.write_text("4242")
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(OutputDirError, match=r"another run \(pid 4242, an older forge-batch\)"):
            run(_job(tmp_path))
        assert (out / "_forge_batch" / "ledger").is_dir()  # left as it was
    finally:
        os.close(fd)


def test_a_deleted_output_directory_starts_afresh_even_with_other_options(tmp_path: Path) -> None:
    """`rm -r out` leaves the state folder next to it; it describes rows that are gone, so it is not a
    'different job' refusal."""
    assert run(_job(tmp_path, limit=6)).status == "completed"
    shutil.rmtree(tmp_path / "out")
    job = make_job(tmp_path, {"input": {"path": "in.jsonl", "limit": 6}, "output": {"path": "out"},
                              "sampling": {"temperature": 0.3}})
    result = run(job)
    assert result.status == "completed" and result.summary["resumed_rows"] == 0 and len(read_output(tmp_path / "out")) == 6


def test_a_mount_point_output_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts are renamed from the state folder into the directory: across file systems that is no commit."""
    out = tmp_path / "out"
    out.mkdir()
    real_stat = os.stat

    def other_device(path: Any, *args: Any, **kwargs: Any) -> Any:
        st = real_stat(path, *args, **kwargs)
        if Path(path) == out:
            return os.stat_result((st.st_mode, st.st_ino, st.st_dev + 1, *tuple(st)[3:10]))
        return st

    monkeypatch.setattr(os, "stat", other_device)
    with pytest.raises(OutputDirError, match="another file system than its state folder"):
        OutputDir(out, ".parquet").open("fp", {}, "parquet")
    assert list(out.iterdir()) == []
