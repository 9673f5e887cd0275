"""`forge-batch bench --against vllm`'s bridge: the GGUF -> HF conversion vLLM reads, and the worker run in
another interpreter, exercised with a stand-in `vllm` package (vLLM itself lives in its own environment
and is not installed in CI)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from forge_batch import bench_vllm

FAKE_VLLM = textwrap.dedent('''
    """Stand-in for vLLM's offline API: records how it was built and called, answers one token id per
    requested token."""
    import json, os

    LOG = os.environ["FAKE_VLLM_LOG"]


    class SamplingParams:
        def __init__(self, **kw):
            self.kw = kw


    class _Completion:
        def __init__(self, n):
            self.token_ids = list(range(n))


    class _Output:
        def __init__(self, n, prompt_len):
            self.outputs = [_Completion(n)]
            self.prompt_token_ids = list(range(prompt_len))
            self.metrics = None


    class LLM:
        def __init__(self, **kw):
            with open(LOG, "a") as f:
                f.write(json.dumps({"init": kw}) + "\\n")

        def chat(self, messages, params, use_tqdm=True):
            with open(LOG, "a") as f:
                f.write(json.dumps({"chat": len(messages), "params": params.kw}) + "\\n")
            return [_Output(params.kw["max_tokens"], 3 + len(m)) for m in messages]
''')


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch) -> Path:
    pkg = tmp_path / "fake" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_VLLM)
    log = tmp_path / "vllm-calls.jsonl"
    monkeypatch.setenv("PYTHONPATH", str(pkg.parent))
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    return log


def test_worker_runs_every_workload_greedy_with_eos_ignored(fake_vllm, tiny_model_dir):
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "there"}]]
    jobs = [{"workload": "W1", "prompts": prompts, "max_tokens": 5},
            {"workload": "W0", "prompts": prompts[:1], "max_tokens": 7}]
    results = bench_vllm.run_vllm(sys.executable, tiny_model_dir, "float32", jobs, max_num_seqs=16)
    assert [r["workload"] for r in results] == ["W1", "W0"]
    assert [r["output_tokens"] for r in results] == [10, 7]
    assert all(r["wall_s"] > 0 and r["load_to_first_s"] > 0 and r["peak_rss_mb"] > 0 for r in results)
    calls = [json.loads(line) for line in fake_vllm.read_text().splitlines()]
    assert calls[0]["init"]["model"] == str(tiny_model_dir)
    assert calls[0]["init"]["dtype"] == "float32" and calls[0]["init"]["max_num_seqs"] == 16
    runs = [c for c in calls[1:] if c["chat"] > 1 or c["params"]["max_tokens"] > 1]  # after the warm-up
    assert [(c["chat"], c["params"]["max_tokens"], c["params"]["min_tokens"]) for c in runs] == [(2, 5, 5), (1, 7, 7)]
    assert all(c["params"]["temperature"] == 0.0 and c["params"]["ignore_eos"] for c in runs)


def test_worker_failure_names_the_interpreter_and_shows_the_error(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "empty"))  # no vllm importable
    with pytest.raises(RuntimeError, match=r"vLLM \(.*\) failed.*\n(.|\n)*No module named 'vllm'"):
        bench_vllm.run_vllm(sys.executable, tiny_model_dir, "float32",
                            [{"workload": "W1", "prompts": [[{"role": "user", "content": "x"}]], "max_tokens": 1}])


def test_hf_directory_is_used_as_is(tiny_model_dir, tmp_path):
    assert bench_vllm.hf_checkpoint(tiny_model_dir, "float32", cache_root=tmp_path) == tiny_model_dir
    assert not any(tmp_path.iterdir())


def test_gguf_is_dequantized_once_into_an_hf_directory_with_the_same_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_gguf_loader import write_tiny_gguf

    gguf_path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(gguf_path)
    cache = tmp_path / "cache"
    hf_dir = bench_vllm.hf_checkpoint(gguf_path, "float32", cache_root=cache)
    assert (hf_dir / "config.json").exists() and hf_dir.parent == cache
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    state = model.state_dict()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.equal(state[name], torch.from_numpy(expected[name]).to(torch.float32)), name
    mtime = (hf_dir / "config.json").stat().st_mtime_ns
    assert bench_vllm.hf_checkpoint(gguf_path, "float32", cache_root=cache) == hf_dir  # cached, not redone
    assert (hf_dir / "config.json").stat().st_mtime_ns == mtime


def test_bench_against_vllm_reports_its_rows_and_ratios(fake_vllm, tiny_model_dir, tmp_path, capsys):
    from forge_batch import bench

    rc = bench.main([
        "--model", str(tiny_model_dir), "--workloads", "W0,W1,W3", "--num-prompts", "3", "--max-tokens", "4",
        "--dtype", "float32", "--against", "vllm", "--vllm-python", sys.executable, "--vllm-max-num-seqs", "8",
        "--json", str(tmp_path / "results.json"),
    ])
    assert rc == 0
    printed = capsys.readouterr().out
    rows = {(r["engine"], r["workload"]): r for r in json.loads((tmp_path / "results.json").read_text())}
    assert {("vllm", "W0"), ("vllm", "W1")} <= set(rows) and ("vllm", "W3") not in rows
    assert rows[("vllm", "W0")]["extra"]["dtype"] == "float32"
    assert "W1: forge-batch / vllm = " in printed and "W0: forge-batch / vllm = " in printed
    calls = [json.loads(line) for line in fake_vllm.read_text().splitlines()]
    assert calls[0]["init"]["max_num_seqs"] == 8
    assert [c["chat"] for c in calls[1:]] == [1, 1, 3]  # the warm-up, W0's one stream, W1's three prompts


def test_bench_against_vllm_without_its_python_is_a_usage_error(tiny_model_dir, monkeypatch, capsys):
    from forge_batch import bench

    monkeypatch.delenv("FORGE_BATCH_VLLM_PYTHON", raising=False)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--model", str(tiny_model_dir), "--against", "vllm"])
    assert exc.value.code == 2
    assert "--vllm-python" in capsys.readouterr().err
