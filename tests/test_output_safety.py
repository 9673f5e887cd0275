"""The output directory under attack and under faults: planted symlinks are never followed, a full disk or
a read-only directory ends the run with a clear message (and a full disk leaves a resumable output), and
`inspect` names a corrupt file instead of printing a traceback. Real symlinks; in-process through cli.main
on the fake engine."""

from __future__ import annotations

import errno
import json
import os
import stat
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runner_helpers import prompts, read_output, write_job_file, write_jsonl

from forge_batch.cli import main
from forge_batch.io.output_dir import OutputDir, state_dir_for

N_ROWS = 12


@pytest.fixture
def fake_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_BATCH_ENGINE_FACTORY", "fakes:make_fake_llm")


def make_job(tmp_path: Path, out: str = "out", **output: object) -> Path:
    write_jsonl(tmp_path / "in.jsonl", prompts(N_ROWS))
    return write_job_file(tmp_path / "job.yaml", {
        "model": "fake", "input": {"path": "in.jsonl"}, "output": {"path": out, "rows_per_file": 4, **output},
    })


def assert_every_id_once(out: Path) -> None:
    counts = Counter(r["id"] for r in read_output(out))
    assert counts == {f"r{i:04d}": 1 for i in range(N_ROWS)}


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ---- symlinks ------------------------------------------------------------------------------------------
def test_symlinked_lock_file_is_refused_and_its_target_untouched(fake_engine, tmp_path: Path, capsys) -> None:
    job = make_job(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    state = state_dir_for(tmp_path / "out")
    state.mkdir(parents=True)
    os.symlink(victim, state / "lock")
    assert main(["run", str(job), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{state / 'lock'} is a symlink; refusing to follow it" in err and "Traceback" not in err
    assert victim.read_text() == "precious\n"
    assert not list((tmp_path / "out").glob("part-*"))


@pytest.mark.parametrize("linked", [".out.forge_batch", ".out.forge_batch/ledger", "out/_forge_batch", "out/_forge_batch/ledger"])
def test_symlinked_state_directories_are_refused(fake_engine, tmp_path: Path, capsys, linked: str) -> None:
    """The state folder next to the output, and the one older versions kept inside it (moved on resume)."""
    job = make_job(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / linked
    link.parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "out").mkdir(exist_ok=True)
    os.symlink(elsewhere, link, target_is_directory=True)
    assert main(["run", str(job), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{link} is a symlink; refusing to follow it" in err
    assert files_under(elsewhere) == []  # nothing written through the link
    assert not list((tmp_path / "out").glob("part-*"))


def test_planted_temp_file_symlinks_are_not_written_through(fake_engine, tmp_path: Path) -> None:
    """Dangling links (where a write would create a file outside the output) and links to an existing file
    (which a write would clobber), at every temp name a run uses."""
    job = make_job(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    state = state_dir_for(out)
    ledger_dir = state / "ledger"
    ledger_dir.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    pid = os.getpid()  # the manifest and summary temps carry the writer's pid; this run is in-process
    os.symlink(outside / "part0.parquet", state / ".part-00000.parquet.tmp")  # dangling
    os.symlink(victim, state / ".part-00001.parquet.tmp")
    # where older versions wrote their temp parts (still cleaned up)
    os.symlink(outside / "part2.parquet", out / ".part-00002.parquet.tmp")
    os.symlink(victim, out / ".part-00003.parquet.tmp")
    os.symlink(outside / "ledger0.parquet", ledger_dir / ".part-00000.parquet.tmp")
    os.symlink(victim, ledger_dir / ".part-00001.parquet.tmp")
    os.symlink(outside / "manifest.json", state / f".manifest.json.{pid}.tmp")
    os.symlink(victim, state / f".summary.json.{pid}.tmp")
    assert main(["run", str(job), "--quiet"]) == 0
    assert files_under(outside) == [] and victim.read_text() == "precious\n"
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 3 and not any(p.is_symlink() for p in parts)
    assert not [p for p in [*out.rglob("*"), *state.rglob("*")] if p.is_symlink()]
    assert_every_id_once(out)


def test_temp_symlink_planted_during_a_run_is_not_written_through(tmp_path: Path) -> None:
    """A link that appears after the run started (cleanup already done) is still not followed at commit."""
    out = OutputDir(tmp_path / "o", ".parquet")
    out.open("fp", {"model": "m"}, "parquet")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, state_dir_for(tmp_path / "o") / ".part-00000.parquet.tmp")
    os.symlink(tmp_path / "dangling.parquet", state_dir_for(tmp_path / "o") / "ledger" / ".part-00000.parquet.tmp")
    table = pa.table({"id": ["a"]})
    entry = {"id": "a", "row_index": 0, "sample_index": 0, "status": "ok", "error_kind": None, "row_status": "ok",
             "prompt_tokens": 1, "completion_tokens": 1}
    out.commit_part(0, lambda path: pq.write_table(table, path), [entry], pa.string())
    out.close()
    assert victim.read_text() == "precious\n" and not (tmp_path / "dangling.parquet").exists()
    part = tmp_path / "o" / "part-00000.parquet"
    assert not part.is_symlink() and pq.read_table(part).column("id").to_pylist() == ["a"]
    ledger = state_dir_for(tmp_path / "o") / "ledger" / "part-00000.parquet"
    assert not ledger.is_symlink() and pq.read_table(ledger).num_rows == 1


def test_symlinked_manifest_is_refused(fake_engine, tmp_path: Path, capsys) -> None:
    job = make_job(tmp_path)
    assert main(["run", str(job), "--quiet", "--limit", "4"]) == 0
    manifest = state_dir_for(tmp_path / "out") / "manifest.json"
    copy = tmp_path / "manifest-copy.json"
    copy.write_text(manifest.read_text())
    manifest.unlink()
    os.symlink(copy, manifest)
    before = copy.read_text()
    assert main(["run", str(job), "--quiet"]) == 2
    assert f"{manifest} is a symlink; refusing to follow it" in capsys.readouterr().err
    assert copy.read_text() == before


def test_output_path_itself_may_be_a_symlink(fake_engine, tmp_path: Path) -> None:
    """Only what is inside the output directory is ours to protect; pointing `out` at a bigger disk is a
    normal set-up."""
    real = tmp_path / "big-disk" / "out"
    real.mkdir(parents=True)
    os.symlink(real, tmp_path / "out", target_is_directory=True)
    assert main(["run", str(make_job(tmp_path)), "--quiet"]) == 0
    assert_every_id_once(real)


# ---- disk full -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("failing_write", [2, 3], ids=["mid-run", "final-commit"])
def test_disk_full_during_a_commit_fails_clearly_and_resumes(
    fake_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, failing_write: int
) -> None:
    """12 rows, 5 per part: parts 1 and 2 are committed as rows finish, part 3 (2 rows) by the run's end
    after generation finished; the disk fills up on the given part."""
    from forge_batch.plugins.writers import ParquetWriter

    original = ParquetWriter.write_part
    calls = {"n": 0}

    def full_disk(self, table, path, context):
        calls["n"] += 1
        if calls["n"] == failing_write:
            with open(path, "wb") as f:  # a half-written temp part, as a real ENOSPC leaves it
                f.write(b"PAR1" + b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, table, path, context)

    monkeypatch.setattr(ParquetWriter, "write_part", full_disk)
    job = make_job(tmp_path, rows_per_file=5)
    out = tmp_path / "out"
    assert main(["run", str(job), "--progress", "none"]) == 1
    err = capsys.readouterr().err
    assert "no space left on device" in err and "rerun the same command to resume" in err
    assert "Traceback" not in err and "Errno" not in err
    summary = json.loads((state_dir_for(out) / "summary.json").read_text())
    assert summary["status"] == "failed" and "no space left on device" in summary["message"]
    assert len(read_output(out)) == 5 * (failing_write - 1)
    assert not list(state_dir_for(out).glob(".*.tmp")), "the half-written temp part is removed (it holds disk space)"
    monkeypatch.setattr(ParquetWriter, "write_part", original)
    assert main(["run", str(job), "--quiet"]) == 0
    assert_every_id_once(out)


def test_disk_full_writing_the_summary_still_reports(fake_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from forge_batch.io import output_dir

    def full_disk(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_write = output_dir.atomic_write_json
    monkeypatch.setattr(output_dir, "atomic_write_json",
                        lambda path, obj: (full_disk if Path(path).name == "summary.json" else real_write)(path, obj))
    assert main(["run", str(make_job(tmp_path)), "--progress", "none"]) == 1
    err = capsys.readouterr().err
    assert "summary.json" in err and "no space left on device" in err and "Traceback" not in err
    assert_every_id_once(tmp_path / "out")  # every part was committed; only the summary is missing


# ---- read-only output ----------------------------------------------------------------------------------
def test_read_only_output_location_exits_2(fake_engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    job = make_job(tmp_path, out="ro/out")
    if os.geteuid() == 0:  # root ignores permission bits: simulate what the kernel would answer
        real_mkdir = os.mkdir

        def denied(path, *args, **kwargs):
            if Path(path).parent == parent:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", denied)
    else:
        parent.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        assert main(["run", str(job), "--quiet"]) == 2
    finally:
        parent.chmod(0o755)
    err = capsys.readouterr().err
    assert f"cannot write to the output directory {parent / 'out'}" in err and "permission denied" in err.lower()
    assert "Traceback" not in err


# ---- inspect on damaged files --------------------------------------------------------------------------
def test_inspect_names_a_corrupt_part(fake_engine, tmp_path: Path, capsys) -> None:
    assert main(["run", str(make_job(tmp_path)), "--quiet"]) == 0
    part = tmp_path / "out" / "part-00001.parquet"
    part.write_bytes(os.urandom(2048))
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert str(part) in err and "corrupt" in err and "Traceback" not in err


def test_inspect_names_a_truncated_summary(fake_engine, tmp_path: Path, capsys) -> None:
    assert main(["run", str(make_job(tmp_path)), "--quiet"]) == 0
    summary = state_dir_for(tmp_path / "out") / "summary.json"
    summary.write_text(summary.read_text()[:40])
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert str(summary) in err and "truncated or corrupt" in err and "Traceback" not in err
