"""Shared I/O for jobs: reader/writer base classes, the fixed output schema, the atomic and resumable
output directory (parts, ledger, manifest, summary), the OpenAI batch format and progress reporting.

The built-in readers and writers themselves are plugins (``forge_batch.plugins.readers`` / ``.writers``).
"""

from forge_batch.io.base import RawRow, Reader, WriteContext, Writer

__all__ = ["RawRow", "Reader", "WriteContext", "Writer"]
