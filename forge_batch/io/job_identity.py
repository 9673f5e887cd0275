"""Whether an output directory's committed rows may be resumed by this job: the same output-affecting
options (the fingerprint), the same output format, and, unless forced, the same input and engine."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from forge_batch.io.safe_fs import OutputDirError, utc_now

# Options that change where or how rows are written, never which tokens a row gets.
_NOT_AFFECTING_ROWS = (
    "input.path", "input.batch_size", "input.limit",
    "output.path", "output.rows_per_file", "output.flush_seconds", "output.compression",
)


def diff_jobs(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Name the first few options that differ between two job dicts."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        elif a != b:
            diffs.append(f"{path}: {a!r} -> {b!r}")

    for section in ("model", "input", "output", "sampling"):
        walk(old.get(section), new.get(section), section)
    diffs = [d for d in diffs if not d.startswith(_NOT_AFFECTING_ROWS)]
    return "; ".join(diffs[:5]) or "options changed"


def other_job_error(path: Path, manifest: dict[str, Any], job_json: dict[str, Any]) -> OutputDirError:
    return OutputDirError(
        f"{path} holds parts of a job with different options ({diff_jobs(manifest.get('job', {}), job_json)}); "
        "use a new output.path, or --overwrite to discard them"
    )


def refuse_other_job(path: Path, manifest: dict[str, Any], fingerprint: str, job_json: dict[str, Any], output_format: str) -> None:
    """Refuse a manifest written by a job with other options or another output format."""
    old_fp = manifest.get("fingerprint")
    if old_fp and old_fp != fingerprint:
        raise other_job_error(path, manifest, job_json)
    if manifest.get("output_format", output_format) != output_format:
        raise OutputDirError(
            f"{path} holds {manifest.get('output_format')} parts, this job writes {output_format}; "
            "use a new output.path, or --overwrite to discard them"
        )


def check_identity(
    path: Path,
    manifest: dict[str, Any],
    holds_rows: bool,
    kind: str,
    current: dict[str, Any],
    *,
    compare: Iterable[str],
    force: bool = False,
) -> None:
    """Refuse to resume when what decides a row's tokens changed since the committed rows were written.

    ``kind`` is ``"input"`` (the input files' content) or ``"engine"`` (model digest, dtype, device,
    kernel path, ...); the keys in ``compare`` must be equal, the others only describe. With ``force``
    (``--force-resume``) the change is accepted and recorded in ``manifest``. Either way ``current`` is
    what the manifest records from now on."""
    old = manifest.get(kind)
    if holds_rows and isinstance(old, dict):
        # a key the committed rows' version did not record yet is unknown, not changed
        compare = [k for k in compare if k in old]
        diffs = [f"{k}: {old.get(k)!r} -> {current.get(k)!r}" for k in compare if old.get(k) != current.get(k)]
        if diffs and not force:
            described = [k for k in current if k not in compare and old.get(k) != current.get(k)]
            diffs += [f"{k}: {old.get(k)!r} -> {current.get(k)!r}" for k in described]
            raise OutputDirError(
                f"{path} holds rows generated with a different {kind} ({'; '.join(diffs)}); resuming would "
                "mix the two in one output. Use a new output.path, --overwrite to discard them, or "
                "--force-resume to resume anyway"
            )
        if diffs:
            manifest.setdefault("forced_resumes", []).append({"at": utc_now(), "kind": kind, "changes": diffs})
    manifest[kind] = current
