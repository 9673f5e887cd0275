"""What readers and writers look like (defined in :mod:`forge_batch.contract`, the plugin contract).
Built-in ones live in ``forge_batch.plugins`` and are registered through the ``register_readers`` /
``register_writers`` hooks, exactly like a third party's. Also the error for an output file that cannot be read
back (``inspect``, ``report``), and which names in a folder readers skip."""

from __future__ import annotations

from forge_batch.contract import RawRow, Reader, WriteContext, Writer

__all__ = ["DamagedOutputError", "RawRow", "Reader", "WriteContext", "Writer", "hidden_from_readers"]


def hidden_from_readers(name: str) -> bool:
    """A file or folder name that readers of a folder skip (pyarrow, pandas, polars and DuckDB, and this tool's
    own input listing): it starts with '.' or '_'."""
    return name.startswith((".", "_"))


class DamagedOutputError(Exception):
    """A file of an output directory cannot be read (corrupt, truncated); the message names it."""
