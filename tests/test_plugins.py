"""The plugin manager: built-ins through the same hooks, entry-point discovery, FORGE_BATCH_LOAD_PLUGINS,
plugins named in a job, overriding a built-in, broken plugins."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from forge_batch.hookspecs import hookimpl
from forge_batch.plugin_manager import (
    BUILTIN_PLUGINS,
    CONSTRAINT_PLUGINS,
    LOAD_PLUGINS_ENV,
    PluginHookError,
    PluginLoadError,
    collect_registry,
    collect_registry_with_sources,
    get_plugin_manager,
    list_plugins,
)


def fake_distribution(site: Path, dist: str, module: str, ep_name: str, body: str, version: str = "1.2.3") -> None:
    """An installed distribution with a `forge_batch` entry point, as pip would leave it (no pip needed)."""
    (site / f"{module}.py").write_text(textwrap.dedent(body))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[forge_batch]\n{ep_name} = {module}\n")


PLUGIN_BODY = """
from forge_batch.hookspecs import hookimpl
from forge_batch.io.base import Writer

class NullWriter(Writer):
    name = "null"
    extension = ".null"
    def write_part(self, table, path, context):
        open(path, "w").write(str(table.num_rows))

@hookimpl
def register_writers():
    return {"null": NullWriter()}
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "site"
    d.mkdir()
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.delenv(LOAD_PLUGINS_ENV, raising=False)
    yield d
    for name in [m for m in sys.modules if m.startswith("fb_test_plugin")]:
        del sys.modules[name]


def test_builtins_are_plugins_through_the_same_hooks() -> None:
    pm = get_plugin_manager(entry_points=False)
    infos = {i.name: i for i in list_plugins(pm)}
    assert set(BUILTIN_PLUGINS) <= set(infos)
    assert all(infos[n].source == "builtin" for n in BUILTIN_PLUGINS)
    assert {"jsonl", "parquet", "openai-batch"} <= set(collect_registry(pm, "register_readers"))
    assert {"jsonl", "parquet", "openai-batch"} <= set(collect_registry(pm, "register_writers"))
    assert {"default", "greedy", "multinomial"} <= set(collect_registry(pm, "register_samplers"))
    assert "register_readers" in infos["forge_batch.plugins.readers"].hooks
    assert infos["forge_batch.plugins.writers"].provides["writers"] == ["jsonl", "openai-batch", "parquet"]


def test_the_constraint_plugins_are_every_builtin_that_registers_kinds() -> None:
    # forge_batch.LLM loads only CONSTRAINT_PLUGINS: a built-in kind registered elsewhere would go missing there
    pm = get_plugin_manager(entry_points=False)
    registering = {i.name for i in list_plugins(pm) if "register_constraints" in i.hooks}
    assert registering == set(CONSTRAINT_PLUGINS)
    from forge_batch.api import builtin_constraints

    assert builtin_constraints().keys() == collect_registry(pm, "register_constraints").keys()


def test_the_python_api_gets_its_constraint_kinds_without_the_io_plugins() -> None:
    # the readers and writers import pyarrow, pydantic and yaml: an engine's load should not pay for them
    code = ("import sys; from forge_batch.api import builtin_constraints; kinds = builtin_constraints(); "
            "print(sorted(kinds), [m for m in ('pyarrow', 'pydantic', 'yaml') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("] [")[1].strip() == "]", out
    assert "'json_schema'" in out and "'regex'" in out and "'choice'" in out


def test_entry_point_plugin_is_found_and_attributed(site: Path) -> None:
    fake_distribution(site, "fb-null-writer", "fb_test_plugin_null", "nullw", PLUGIN_BODY)
    pm = get_plugin_manager()
    info = {i.name: i for i in list_plugins(pm)}["nullw"]
    assert info.source == "entry point (fb-null-writer 1.2.3)" and info.distribution == "fb-null-writer"
    assert info.hooks == ["register_writers"] and info.provides == {"writers": ["null"]}
    assert collect_registry_with_sources(pm, "register_writers")["null"][1] == "nullw"


@pytest.mark.parametrize(
    "value, loaded", [("", False), ("nullw", True), ("fb-null-writer", True), ("other, fb_null_writer", True), ("other", False)]
)
def test_load_plugins_env_restricts_installed_plugins(site: Path, monkeypatch: pytest.MonkeyPatch, value: str, loaded: bool) -> None:
    fake_distribution(site, "fb-null-writer", "fb_test_plugin_null", "nullw", PLUGIN_BODY)
    monkeypatch.setenv(LOAD_PLUGINS_ENV, value)
    pm = get_plugin_manager()
    assert pm.has_plugin("nullw") is loaded
    assert pm.has_plugin("forge_batch.plugins.readers")  # built-ins always load


def test_broken_installed_plugin_is_skipped_with_a_warning(site: Path) -> None:
    fake_distribution(site, "fb-broken", "fb_test_plugin_broken", "broken", "raise ImportError('missing dependency xyz')\n")
    pm = get_plugin_manager()
    assert not pm.has_plugin("broken")
    assert any("broken" in w and "missing dependency xyz" in w for w in pm.forge_warnings)


def test_an_installed_plugin_whose_registration_raises_is_left_out_a_job_plugins_is_a_problem(
    site: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    body = "from forge_batch.hookspecs import hookimpl\n\n@hookimpl\ndef register_readers():\n    raise RuntimeError('no foo')\n"
    fake_distribution(site, "fb-badreg", "fb_test_plugin_badreg", "badreg", body)
    with caplog.at_level(logging.WARNING, logger="forge_batch.plugin_manager"):
        readers = collect_registry(get_plugin_manager(), "register_readers")
    assert {"jsonl", "parquet"} <= set(readers)  # the built-ins still register
    assert any("installed plugin 'badreg'" in r.getMessage() and "no foo" in r.getMessage() for r in caplog.records)
    pfile = tmp_path / "mine.py"
    pfile.write_text(body)
    with pytest.raises(PluginHookError, match="plugin 'mine' raised in register_readers"):
        collect_registry(get_plugin_manager([str(pfile)], entry_points=False), "register_readers")


def test_job_plugins_by_module_and_file(site: Path, tmp_path: Path) -> None:
    (site / "fb_test_plugin_mod.py").write_text(PLUGIN_BODY)
    pfile = tmp_path / "my_plugin.py"
    pfile.write_text("from forge_batch.hookspecs import hookimpl\n\n@hookimpl\ndef job_start(job):\n    pass\n")
    pm = get_plugin_manager(["fb_test_plugin_mod", str(pfile)], entry_points=False)
    infos = {i.name: i for i in list_plugins(pm)}
    assert infos["fb_test_plugin_mod"].source == "job" and infos["my_plugin"].hooks == ["job_start"]
    assert "null" in collect_registry(pm, "register_writers")


def test_job_plugin_import_errors_are_all_reported(tmp_path: Path) -> None:
    with pytest.raises(PluginLoadError) as exc:
        get_plugin_manager(["no_such_module_abc", str(tmp_path / "missing.py")], entry_points=False)
    assert [n for n, _ in exc.value.failures] == ["no_such_module_abc", str(tmp_path / "missing.py")]


def test_misnamed_hook_is_an_error(tmp_path: Path) -> None:
    pfile = tmp_path / "typo.py"
    pfile.write_text("from forge_batch.hookspecs import hookimpl\n\n@hookimpl\ndef proces_result(record):\n    pass\n")
    with pytest.raises(PluginLoadError, match="proces_result"):
        get_plugin_manager([str(pfile)], entry_points=False)


@pytest.mark.parametrize("style", ["wrapper=True", "hookwrapper=True"])
def test_a_hook_wrapper_is_refused_loudly_not_skipped(tmp_path: Path, style: str) -> None:
    pfile = tmp_path / "wrapping.py"
    pfile.write_text(
        "from forge_batch.hookspecs import hookimpl\n\n"
        f"@hookimpl({style})\ndef process_result(record):\n    yield\n"
    )
    with pytest.raises(PluginLoadError) as exc:
        get_plugin_manager([str(pfile)], entry_points=False)
    [(name, message)] = exc.value.failures
    assert name == "wrapping" and "process_result" in message and "hook wrapper" in message


def test_plugin_overrides_builtin_by_name() -> None:
    sentinel = object()

    @hookimpl
    def register_readers():
        return {"jsonl": sentinel}

    pm = get_plugin_manager(entry_points=False, extra_plugins=[("mine", types.SimpleNamespace(register_readers=register_readers))])
    obj, source = collect_registry_with_sources(pm, "register_readers")["jsonl"]
    assert obj is sentinel and source == "mine"
