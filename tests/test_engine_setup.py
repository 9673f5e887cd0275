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


def test_two_engines_in_one_process_each_keep_their_kernel_backend(tiny_model_dir, monkeypatch):
    """The kernel backend belongs to an engine: creating one on the compiled CPU kernels ("auto") does not
    move an earlier one off the torch reference, and each gives its own, equal, greedy tokens."""
    from forge_batch.kernels.cpu import attention, build, elementwise

    if not build.available():
        pytest.skip("no C compiler for the CPU kernels")
    calls: list[str] = []
    for module, name in ((elementwise, "rms_norm"), (elementwise, "silu_and_mul"),
                         (elementwise, "rotary_store_kv"), (attention, "paged_decode_attention")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    options = {"device": "cpu", "dtype": "float32", "max_num_seqs": 4}
    reference_llm = EngineLLM(str(tiny_model_dir), kernel_backend="reference", **options)
    auto_llm = EngineLLM(str(tiny_model_dir), kernel_backend="auto", **options)
    prompts = [{"prompt_token_ids": [5, 9, 2, 7, 11][: 2 + i]} for i in range(3)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)

    on_reference = [o.token_ids for o in reference_llm.generate(prompts, params)]
    assert calls == []  # not one compiled CPU kernel
    on_auto = [o.token_ids for o in auto_llm.generate(prompts, params)]
    assert {"rms_norm", "silu_and_mul", "rotary_store_kv", "paged_decode_attention"} <= set(calls)
    calls.clear()
    assert [o.token_ids for o in reference_llm.generate(prompts, params)] == on_reference and calls == []
    assert on_reference == on_auto and all(len(ids) == 8 for ids in on_auto)
    assert (reference_llm.engine_config.kernel_backend, reference_llm.engine_config.kernel_path) == ("reference", "torch")
    assert (auto_llm.engine_config.kernel_backend, auto_llm.engine_config.kernel_path) == ("auto", "cpu-c")


def test_engine_config_is_resolved_once_and_logged(tiny_model_dir, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="forge_batch.engine"):
        llm = EngineLLM(str(tiny_model_dir), device="cpu", dtype="float32", max_num_seqs=6, num_blocks=40,
                        max_model_len=200)
    config = llm.engine_config
    assert (config.device.type, config.dtype, config.max_num_seqs, config.num_blocks) == ("cpu", llm.dtype, 6, 40)
    assert config.max_model_len == llm.max_model_len == 200 and not config.cuda_graphs
    assert llm.scheduler.config.max_num_seqs == 6 and llm.block_manager.num_blocks == 40
    as_dict = config.to_dict()
    assert as_dict["dtype"] == "float32" and as_dict["device"] == "cpu" and json.loads(json.dumps(as_dict)) == as_dict
    lines = [r.getMessage() for r in caplog.records if r.name == "forge_batch.engine.llm"]
    ready = [line for line in lines if line.startswith("engine ready")]
    assert len(ready) == 1 and "40 blocks x 16 tokens" in ready[0] and "kernels auto" in ready[0]


def test_a_max_model_len_past_the_models_context_is_lowered_with_a_warning(tiny_model_dir, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="forge_batch.engine"):
        llm = EngineLLM(str(tiny_model_dir), device="cpu", dtype="float32", max_model_len=10**6)
    limit = llm.config.max_position_embeddings
    assert llm.max_model_len == limit
    assert any(f"max_model_len lowered from 1000000 to {limit}" in r.getMessage() for r in caplog.records)
