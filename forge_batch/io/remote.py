"""Input files behind a URL (``s3://``, ``gs://``, ``hf://``, ``memory://``, ... : any fsspec file system), and
the one rule for output URLs.

Inputs are read through fsspec; the protocol's package must be installed (``s3fs`` for ``s3://``, ``gcsfs``
for ``gs://``; ``hf://`` comes with huggingface_hub). ``file://`` URLs are plain local paths. An output
must be a local path: a part is committed by renaming it into place, which is atomic on a local file
system and does not exist on an object store, so a remote ``output.path`` is refused before any work
rather than written without the exactly-once guarantee (write locally, then copy the directory up).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from forge_batch.io.base import hidden_from_readers

# scheme://: two letters at least, so that a Windows drive (C:\...) is never taken for one
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")


def is_url(path: str) -> bool:
    return bool(_URL.match(path))


def file_url_path(url: str) -> str | None:
    """The local path of a ``file://`` URL; None for any other string."""
    if not url.lower().startswith("file://"):
        return None
    parts = urlsplit(url)
    return unquote(parts.path if parts.netloc in ("", "localhost") else f"//{parts.netloc}{parts.path}")


def output_url_problem(path: str) -> str | None:
    """Why ``path`` cannot be an ``output.path`` (a remote URL), or None."""
    if not is_url(path) or file_url_path(path) is not None:
        return None
    scheme = path.split("://", 1)[0]
    return (
        f"{scheme}:// output is not supported: parts are committed by an atomic rename, which {scheme}:// does not "
        "have, so resume could not guarantee each row exactly once; write to a local folder and copy it up "
        "afterwards (e.g. `aws s3 sync`, `gsutil rsync`, `huggingface-cli upload`)"
    )


def _fs(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError as e:  # a dependency; only a broken install lacks it
        raise OSError(f"{url}: reading URLs needs fsspec ({e})") from e
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # the protocol's package is missing, or an unknown protocol
        raise OSError(f"cannot read {url}: {e}") from e


def list_files(pattern: str, extensions: Iterable[str]) -> list[str]:
    """The files a URL names: one file, a folder's files with one of ``extensions`` (hidden and ``_`` names
    skipped, as for local folders), or a glob; sorted URLs. Raises OSError where it cannot be listed (no
    network, no access: each file system raises its own errors, a network library's included)."""
    fs, root = _fs(pattern)
    try:
        return _list(fs, root, pattern, extensions)
    except OSError:
        raise
    except Exception as e:
        raise OSError(f"cannot list {pattern}: {type(e).__name__}: {e}") from e


def _list(fs: Any, root: str, pattern: str, extensions: Iterable[str]) -> list[str]:
    if any(ch in root for ch in "*?["):
        found = [p for p in fs.glob(root) if fs.isfile(p)]
    elif fs.isdir(root):
        found = []
        for p in fs.find(root):
            rel = p[len(root.rstrip("/")) + 1:] if p.startswith(root.rstrip("/")) else p
            if any(hidden_from_readers(part) for part in rel.split("/")):
                continue
            if p.endswith(tuple(extensions)):
                found.append(p)
    elif fs.isfile(root):
        return [pattern]
    else:
        return []
    return sorted(fs.unstrip_protocol(p) for p in found)


def open_binary(path: str) -> BinaryIO:
    """A file opened for reading: a local path, or a URL through fsspec."""
    if not is_url(path):
        return open(path, "rb")
    local = file_url_path(path)
    if local is not None:
        return open(local, "rb")
    fs, root = _fs(path)
    return fs.open(root, "rb")


def file_size(path: str) -> int:
    if not is_url(path):
        import os

        return os.path.getsize(path)
    fs, root = _fs(path)
    return int(fs.size(root))
