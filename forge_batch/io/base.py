"""What readers and writers look like (defined in :mod:`forge_batch.contract`, the plugin contract).
Built-in ones live in ``forge_batch.plugins`` and are registered through the ``register_readers`` /
``register_writers`` hooks, exactly like a third party's."""

from __future__ import annotations

from forge_batch.contract import RawRow, Reader, WriteContext, Writer

__all__ = ["RawRow", "Reader", "WriteContext", "Writer"]
