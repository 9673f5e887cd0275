"""Tool version and the metadata embedded in every output file (job spec, version), so a part file found
on its own still says what produced it."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from forge_batch.job import JobSpec

META_JOB = "forge_batch.job"
META_VERSION = "forge_batch.version"
META_FINGERPRINT = "forge_batch.fingerprint"
META_ENGINE = "forge_batch.engine"


def tool_version() -> str:
    """The installed forge-batch version (the package's, falling back to the distribution's)."""
    try:
        from forge_batch import __version__

        return str(__version__)
    except Exception:
        pass
    try:
        from importlib.metadata import version

        return version("forge-batch")
    except Exception:
        return "0+unknown"


def file_metadata(job: JobSpec, engine_info: dict[str, Any] | None = None) -> dict[str, str]:
    """Key/value metadata for output files: the full job spec as JSON, the tool version, the fingerprint and
    the resolved engine (model digest, device, dtype, kernel path: what ``auto`` became)."""
    meta = {
        META_JOB: json.dumps(job.model_dump(mode="json"), sort_keys=True),
        META_VERSION: tool_version(),
        META_FINGERPRINT: job.fingerprint(),
    }
    if engine_info is not None:
        meta[META_ENGINE] = json.dumps(engine_info, sort_keys=True)
    return meta
