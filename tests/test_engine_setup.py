"""How an engine is put together: nothing happens at import, the engine imports no plugin, its
constraint kinds come from its caller."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from forge_batch import LLM, SamplingParams
from forge_batch.engine.llm import LLM as EngineLLM

ROOT = Path(__file__).resolve().parent.parent

IMPORT_CHILD = """
import json, threading, time
before = {t.ident for t in threading.enumerate()}
import forge_batch
import forge_batch.engine.llm
from forge_batch import LLM
time.sleep(0.3)  # a thread started at import would be running by now
after = [t.name for t in threading.enumerate() if t.ident not in before]
print(json.dumps(after))
"""


def test_importing_the_package_starts_no_thread_and_compiles_nothing(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "FORGE_BATCH_CACHE": str(cache)}
    child = subprocess.run([sys.executable, "-c", IMPORT_CHILD], capture_output=True, text=True, env=env,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    assert json.loads(child.stdout.strip().splitlines()[-1]) == []
    assert not cache.exists() or not any(cache.rglob("*"))  # no kernel library built


def _imports(path: Path) -> set[str]:
    """Every module a file imports: at the top, inside functions and under TYPE_CHECKING."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("folder", ["forge_batch/engine", "forge_batch/models", "kernels"])
def test_engine_models_and_kernels_import_no_plugin_job_or_runner(folder):
    upper = ("forge_batch.plugins", "forge_batch.plugin_manager", "forge_batch.hookspecs", "forge_batch.runner",
             "forge_batch.job", "forge_batch.io", "forge_batch.cli", "forge_batch.api")
    bad = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / folder).rglob("*.py")
        for name in _imports(path)
        if name.startswith(upper)
    }
    assert not bad


def test_engine_constraint_kinds_come_from_its_caller(tiny_model_dir):
    params = SamplingParams(max_tokens=4, temperature=0, json_schema={"type": "integer"})
    bare = EngineLLM(str(tiny_model_dir), device="cpu", dtype="float32", max_num_seqs=4)
    out = bare.generate(["1"], params)[0]
    assert out.finish_reason == "error" and "unknown constraint kind 'json_schema'" in out.error
    public = LLM(str(tiny_model_dir), device="cpu", dtype="float32", max_num_seqs=4)
    assert {"json_schema", "regex", "choice"} <= set(public.constraints)
    out = public.generate(["1"], SamplingParams(max_tokens=8, temperature=0, choice=["yes", "no"]))[0]
    assert out.error is None and out.outputs[0].text in ("yes", "no")
