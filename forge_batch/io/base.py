"""What readers and writers look like (defined in :mod:`forge_batch.contract`, the plugin contract).
Built-in ones live in ``forge_batch.plugins`` and are registered through the ``register_readers`` /
``register_writers`` hooks, exactly like a third party's. Also the error for an output file that cannot be read
back (``inspect``, ``report``)."""

from __future__ import annotations

from forge_batch.contract import RawRow, Reader, WriteContext, Writer

__all__ = ["DamagedOutputError", "RawRow", "Reader", "WriteContext", "Writer"]


class DamagedOutputError(Exception):
    """A file of an output directory cannot be read (corrupt, truncated); the message names it."""
