"""The plugin manager: built-ins, installed plugins (entry points) and modules named in a job.

Built-in readers, writers, samplers and the prompt preparation are plugins too (``forge_batch.plugins.*``),
registered first so that a third-party plugin can override a built-in by name. Installed plugins come from
the ``forge_batch`` entry-point group; ``FORGE_BATCH_LOAD_PLUGINS`` (comma-separated entry-point,
distribution or module names; empty for none) restricts which of them load, which is how you pin a
production run or debug a misbehaving plugin. Modules listed under ``plugins:`` in a job always load.

This module is named ``plugin_manager`` because ``forge_batch.plugins`` is the built-in plugins package.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from forge_batch import hookspecs
from forge_batch.hookspecs import DropResult, RowError, SkipRow

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "forge_batch"
LOAD_PLUGINS_ENV = "FORGE_BATCH_LOAD_PLUGINS"

BUILTIN_PLUGINS: tuple[str, ...] = (
    "forge_batch.plugins.readers",
    "forge_batch.plugins.writers",
    "forge_batch.plugins.samplers",
    "forge_batch.plugins.constraints",
    "forge_batch.plugins.prepare",
    "forge_batch.plugins.validate",
    "forge_batch.plugins.run_history",
    "forge_batch.plugins.metrics",
)
# The built-ins that implement ``register_constraints``: ``forge_batch.LLM`` loads just these (the others
# import pyarrow, pydantic and yaml, a quarter second that an engine's load need not pay).
CONSTRAINT_PLUGINS: tuple[str, ...] = ("forge_batch.plugins.constraints",)


class PluginLoadError(Exception):
    """Plugins named in a job (or broken hook implementations) that could not be loaded.

    ``failures`` is a list of (plugin name, message), all of them, not just the first."""

    def __init__(self, failures: Sequence[tuple[str, str]]) -> None:
        self.failures = list(failures)
        super().__init__("; ".join(f"plugin {n!r}: {m}" for n, m in self.failures))


class PluginHookError(Exception):
    """A plugin's hook implementation raised; the message names the plugin and the hook."""

    def __init__(self, plugin: str, hook: str, exc: BaseException) -> None:
        self.plugin = plugin
        self.hook = hook
        self.original = exc
        super().__init__(f"plugin {plugin!r} raised in {hook}: {type(exc).__name__}: {exc}")


@dataclass
class PluginInfo:
    """What ``forge-batch plugins`` shows for one plugin."""

    name: str
    source: str  # "builtin", "entry point (dist version)", "job", "module"
    module: str
    hooks: list[str] = field(default_factory=list)
    version: str | None = None
    distribution: str | None = None
    provides: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "module": self.module,
            "hooks": self.hooks,
            "version": self.version,
            "distribution": self.distribution,
            "provides": self.provides,
        }


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def allowed_plugins(env: Mapping[str, str] | None = None) -> set[str] | None:
    """Names allowed by FORGE_BATCH_LOAD_PLUGINS, normalised; None when the variable is unset (load all)."""
    env = os.environ if env is None else env
    value = env.get(LOAD_PLUGINS_ENV)
    if value is None:
        return None
    return {_normalize(v.strip()) for v in value.split(",") if v.strip()}


def _import_plugin(spec: str, search_paths: Sequence[str] = ()) -> Any:
    """Import a plugin named in a job: a dotted module name or a path to a .py file.

    A module name that is not importable as is is looked for in ``search_paths`` too (the job file's folder
    and the working directory), so ``plugins: [my_plugin]`` finds a ``my_plugin.py`` next to the job even
    when ``forge-batch`` runs as an installed script (whose sys.path has neither)."""
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"no plugin file at {path}")
        mod_name = f"forge_batch_job_plugin_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        loader_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as e:
        top = spec.split(".")[0]
        if e.name != top:
            raise
        folder = _folder_holding(top, search_paths)
        if folder is None:
            raise
        if folder not in sys.path:
            sys.path.insert(0, folder)
        return importlib.import_module(spec)


def _folder_holding(top: str, search_paths: Sequence[str]) -> str | None:
    """The first of ``search_paths`` that holds module ``top`` (``top.py`` or ``top/__init__.py``)."""
    return next(
        (p for p in search_paths if (Path(p) / f"{top}.py").is_file() or (Path(p) / top / "__init__.py").is_file()),
        None,
    )


def find_plugin(spec: str, search_paths: Sequence[str] = ()) -> str | None:
    """Why a plugin named in a job cannot be loaded, found without importing (running) anything: a .py
    path must be a file; a module must be findable where :func:`_import_plugin` looks (sys.path, then
    ``search_paths``), its parent packages walked without executing their ``__init__``. None when found."""
    import importlib.machinery

    if spec.endswith(".py"):
        return None if Path(spec).is_file() else f"no plugin file at {spec}"
    parts = spec.split(".")
    if not all(part.isidentifier() for part in parts):
        return f"{spec!r} is neither a module name nor a path to a .py file"
    if spec in sys.modules:
        return None
    try:
        found = importlib.util.find_spec(parts[0])  # a top-level name: finds, imports nothing
    except (ImportError, ValueError):
        found = None
    if found is None:
        folder = _folder_holding(parts[0], search_paths)
        found = importlib.machinery.PathFinder.find_spec(parts[0], [folder]) if folder is not None else None
    if found is None:
        where = ", ".join(["sys.path", *search_paths])
        return f"no module named {parts[0]!r} (looked in {where})"
    name = parts[0]
    for part in parts[1:]:
        locations = found.submodule_search_locations
        if not locations:
            return f"{name!r} is a module, not a package: it cannot hold {part!r}"
        name = f"{name}.{part}"
        found = importlib.machinery.PathFinder.find_spec(name, list(locations))
        if found is None:
            return f"no module named {name!r}"
    return None


def get_plugin_manager(
    job_plugins: Sequence[str] = (),
    *,
    entry_points: bool = True,
    env: Mapping[str, str] | None = None,
    extra_plugins: Sequence[tuple[str, Any]] = (),
    search_paths: Sequence[str | os.PathLike[str]] = (),
    builtins: Sequence[str] = BUILTIN_PLUGINS,
) -> pluggy.PluginManager:
    """A fresh plugin manager with built-ins, allowed entry-point plugins and the job's plugins.

    ``builtins`` names the built-in plugin modules to register (all of them unless told);
    ``extra_plugins`` registers (name, object) pairs directly (tests and embedding applications use it);
    ``search_paths`` are folders where job plugins named by module are also looked for.
    Raises :class:`PluginLoadError` listing every job plugin that failed to import; a broken *installed*
    plugin is skipped with a warning in ``pm.forge_warnings`` so one bad package cannot stop every job.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    sources: dict[str, PluginInfo] = {}
    warnings: list[str] = []
    failures: list[tuple[str, str]] = []

    for mod_name in builtins:
        module = importlib.import_module(mod_name)
        pm.register(module, name=mod_name)
        sources[mod_name] = PluginInfo(mod_name, "builtin", mod_name)
    if entry_points:
        _register_entry_points(pm, sources, warnings, env)
    for spec, obj in extra_plugins:
        pm.register(obj, name=spec)
        sources[spec] = PluginInfo(spec, "module", getattr(obj, "__name__", type(obj).__name__))
    _register_job_plugins(pm, sources, failures, job_plugins, [str(p) for p in search_paths])

    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        failures.append((getattr(e, "plugin_name", None) or str(getattr(e, "plugin", "?")), str(e)))
    failures += _wrapper_failures(pm)

    if failures:
        raise PluginLoadError(failures)
    pm.forge_sources = sources  # type: ignore[attr-defined]
    pm.forge_warnings = warnings  # type: ignore[attr-defined]
    return pm


def _register_entry_points(
    pm: pluggy.PluginManager, sources: dict[str, PluginInfo], warnings: list[str], env: Mapping[str, str] | None
) -> None:
    """Register the installed plugins that the environment allows; a broken one becomes a warning."""
    allowed = allowed_plugins(env)
    matched: set[str] = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else None
        version = dist.version if dist is not None else None
        module_name = ep.value.split(":")[0]
        if allowed is not None:
            names = {_normalize(ep.name), _normalize(module_name)}
            if dist_name:
                names.add(_normalize(dist_name))
            if not names & allowed:
                continue
            matched |= names & allowed
        if pm.has_plugin(ep.name):
            continue
        try:
            obj = ep.load()
        except Exception as e:  # a broken installed plugin must not stop every job
            warnings.append(f"skipped plugin {ep.name!r} ({dist_name}): cannot import: {type(e).__name__}: {e}")
            continue
        if pm.is_registered(obj):
            continue
        try:
            pm.register(obj, name=ep.name)
        except pluggy.PluginValidationError as e:
            warnings.append(f"skipped plugin {ep.name!r} ({dist_name}): {e}")
            continue
        where = f"entry point ({dist_name} {version})" if dist_name else "entry point"
        sources[ep.name] = PluginInfo(ep.name, where, module_name, version=version, distribution=dist_name)
    # A name that selects nothing is most likely a typo: the plugin it meant silently does not load.
    unmatched = (allowed or set()) - matched
    if unmatched:
        written = {_normalize(v.strip()): v.strip() for v in (os.environ if env is None else env)[LOAD_PLUGINS_ENV].split(",")}
        installed = sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
        for name in sorted(unmatched):
            warnings.append(
                f"{LOAD_PLUGINS_ENV} names {written.get(name, name)!r}, but no installed plugin has that "
                f"entry-point, distribution or module name (installed: {', '.join(installed) or 'none'})"
            )


def _register_job_plugins(
    pm: pluggy.PluginManager,
    sources: dict[str, PluginInfo],
    failures: list[tuple[str, str]],
    job_plugins: Sequence[str],
    search_paths: list[str],
) -> None:
    """Register the plugins a job names (modules or .py files); each one that fails is a failure."""
    for spec in job_plugins:
        try:
            module = _import_plugin(spec, search_paths)
        except Exception as e:
            failures.append((spec, f"cannot import: {type(e).__name__}: {e}"))
            continue
        if pm.is_registered(module):
            name = pm.get_name(module)
            if name in sources and "job" not in sources[name].source:
                sources[name].source += "; also named in the job"
            continue
        name = spec if not spec.endswith(".py") else Path(spec).stem
        if pm.has_plugin(name):
            name = f"{name}@job"
        try:
            pm.register(module, name=name)
        except pluggy.PluginValidationError as e:
            failures.append((spec, str(e)))
            continue
        sources[name] = PluginInfo(name, "job", getattr(module, "__name__", spec))


def list_plugins(pm: pluggy.PluginManager) -> list[PluginInfo]:
    """Every registered plugin with where it came from, the hooks it implements and the names its
    ``register_*`` hooks provide (readers, writers, samplers, constraints)."""
    sources: dict[str, PluginInfo] = getattr(pm, "forge_sources", {})
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        info = sources.get(name) or PluginInfo(name, "module", getattr(plugin, "__name__", type(plugin).__name__))
        callers = pm.get_hookcallers(plugin) or []
        info.hooks = sorted(c.name for c in callers)
        info.provides = {}
        for hook in info.hooks:
            if not hook.startswith("register_"):
                continue
            for impl in iter_impls(pm, hook):
                if impl.plugin_name != name:
                    continue
                try:
                    result = call_impl(impl, hook, {})
                except PluginHookError as e:
                    info.provides[hook.removeprefix("register_")] = [f"<error: {e.original}>"]
                    continue
                if isinstance(result, Mapping) and result:
                    info.provides[hook.removeprefix("register_")] = sorted(map(str, result))
        out.append(info)
    return out


def hook_signature(fn: Any) -> str:
    """A hookspec's exact signature as documented in docs/plugins.md, e.g.
    ``def job_start(job: JobSpec, context: RunContext) -> None``."""
    import inspect

    sig = inspect.signature(fn)
    params = ", ".join(
        p.name if p.annotation is inspect.Parameter.empty else f"{p.name}: {p.annotation}" for p in sig.parameters.values()
    )
    ret = "" if sig.return_annotation is inspect.Signature.empty else f" -> {sig.return_annotation}"
    return f"def {fn.__name__}({params}){ret}"


def hookspec_functions() -> dict[str, Any]:
    """Every hook declared in forge_batch.hookspecs, by name."""
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return {
        name: fn for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, marker)
    }


def _is_wrapper(impl: Any) -> bool:
    return bool(getattr(impl, "hookwrapper", False) or getattr(impl, "wrapper", False))


def _wrapper_failures(pm: pluggy.PluginManager) -> list[tuple[str, str]]:
    """Every hook wrapper registered: forge-batch refuses them rather than skip them silently."""
    return [
        (impl.plugin_name, f"implements {name} as a hook wrapper, which forge-batch does not support: it calls "
                           "each implementation on its own so that an error names the plugin that raised it")
        for name in hookspec_functions()
        for impl in getattr(pm.hook, name).get_hookimpls()
        if _is_wrapper(impl)
    ]


def iter_impls(pm: pluggy.PluginManager, hook_name: str) -> Iterator[Any]:
    """Hook implementations of ``hook_name`` in pluggy's call order (tryfirst first, then last registered
    first). forge-batch calls every hook through this and :func:`call_impl`, one implementation at a time,
    so that an exception names its plugin (and, for row-level hooks, fails only that row). Hook wrappers
    cannot take part in that: :func:`get_plugin_manager` refuses them, and so does this."""
    for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
        if _is_wrapper(impl):
            raise PluginLoadError([(impl.plugin_name, f"implements {hook_name} as a hook wrapper (not supported)")])
        yield impl


def call_impl(impl: Any, hook_name: str, kwargs: Mapping[str, Any]) -> Any:
    """Call one implementation with the arguments it asks for; wraps its exceptions in PluginHookError
    (naming the plugin) except the deliberate SkipRow / DropResult / RowError signals."""
    args = [kwargs[a] for a in impl.argnames]
    kw = {a: kwargs[a] for a in getattr(impl, "kwargnames", ()) if a in kwargs}
    try:
        return impl.function(*args, **kw)
    except (SkipRow, DropResult, RowError):
        raise
    except Exception as e:
        raise PluginHookError(impl.plugin_name, hook_name, e) from e


_REPORTED: set[tuple[str, str]] = set()  # (plugin, hook) whose failure was already logged in this process


def collect_registry_with_sources(pm: pluggy.PluginManager, hook_name: str) -> dict[str, tuple[Any, str]]:
    """Merge the mappings a ``register_*`` hook returns: name -> (object, plugin name).

    Implementations are merged in registration order, so a plugin registered later (an installed or job
    plugin) replaces a built-in of the same name."""
    merged: dict[str, tuple[Any, str]] = {}
    sources: dict[str, PluginInfo] = getattr(pm, "forge_sources", {})
    for impl in reversed(list(iter_impls(pm, hook_name))):
        try:
            result = call_impl(impl, hook_name, {})
        except PluginHookError as e:
            info = sources.get(impl.plugin_name)
            if info is None or not info.source.startswith("entry point"):
                raise  # a built-in's or the job's own plugin: the job cannot run as written
            # an installed plugin that breaks is left out, as one that fails to import: it cannot stop every job
            if (impl.plugin_name, hook_name) not in _REPORTED:
                _REPORTED.add((impl.plugin_name, hook_name))
                log.warning("skipping what installed plugin %r registers in %s: %s", impl.plugin_name, hook_name, e)
            continue
        if not result:
            continue
        if not isinstance(result, Mapping):
            raise PluginHookError(
                impl.plugin_name, hook_name, TypeError(f"must return a dict of name -> object, got {type(result).__name__}")
            )
        for key, obj in result.items():
            merged[str(key)] = (obj, impl.plugin_name)
    return merged


def collect_registry(pm: pluggy.PluginManager, hook_name: str) -> dict[str, Any]:
    """Like :func:`collect_registry_with_sources`, without the plugin names."""
    return {k: v for k, (v, _) in collect_registry_with_sources(pm, hook_name).items()}
