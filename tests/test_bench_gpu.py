"""`python -m forge_batch.bench_gpu`, `python -m forge_batch.bench_invariance` and `scripts/gpu_check.sh`
without a GPU: the benchmark's and the invariance check's whole code paths on a tiny shape on the CPU (JSON,
profile, report), their no-CUDA answers, and the check script's set-up stages (the GPU run itself happens
on a GPU machine; the speed numbers here mean nothing)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forge_batch import bench_gpu, bench_invariance

REPO = Path(__file__).resolve().parent.parent


def test_bench_gpu_runs_every_stage_on_a_tiny_cpu_model(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    rc = bench_gpu.main([
        "--device", "cpu", "--shape", "tiny", "--dtype", "float32", "--num-prompts", "5", "--max-tokens", "4",
        "--max-num-seqs", "4", "--decode-steps", "3", "--hf-batch-sizes", "2", "--skip-generate-batch",
        "--json", str(out / "bench.json"), "--profile", str(out / "profile.txt"),
        "--append-to", str(out / "bench.md"),
    ])
    assert rc == 0
    res = json.loads((out / "bench.json").read_text())
    assert res["status"] == "done" and res["device_name"] == "cpu"
    ours = res["ours"]
    assert ours["output_tokens"] == 5 * 4 and ours["tok_s"] > 0
    assert ours["triton_fallback"] is None and not ours["cuda_graphs"]
    work = bench_gpu.prompts(5, bench_gpu.TINY["vocab_size"])
    assert [d["batch"] for d in ours["decode"]] == [1, 4]
    for d in ours["decode"]:
        prompt_tokens = sum(len(p) for p in work[: d["batch"]])
        # past each prompt: its first token (prefill), one untimed step, then the timed ones
        assert prompt_tokens + d["batch"] < d["context_tokens"] < prompt_tokens + d["batch"] * (d["steps"] + 2)
        assert d["step_s"] > 0 and d["bytes_per_step"] > ours["weight_bytes"]
    prof = ours["profile"]
    assert prof["eager"]["step_s"] > 0  # no CUDA graphs on the CPU: the eager step only
    assert res["transformers"]["generate bs=2"] > 0
    text = (out / "profile.txt").read_text()
    assert "top ops by device time" in text and "aten::" in text
    assert "traceEvents" in json.loads((out / "profile_trace.json").read_text())
    md = (out / "bench.md").read_text()
    assert md == "\n" + res["report"] and "| forge-batch (" in md and "| transformers" in md
    assert "| 4 |" in md  # the full-batch decode row
    assert res["report"] in capsys.readouterr().out


def test_bench_gpu_without_cuda_says_so_and_records_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = bench_gpu.main(["--json", str(tmp_path / "bench.json")])
    assert rc == 0
    assert "no CUDA device" in capsys.readouterr().err
    assert json.loads((tmp_path / "bench.json").read_text())["status"] == "no CUDA device"


def test_bench_invariance_checks_rows_and_times_both_modes_on_a_tiny_cpu_model(tmp_path, capsys):
    """The device check's whole code path on the CPU (whose compiled kernels are batch-invariant too)."""
    rc = bench_invariance.main(["--device", "cpu", "--shape", "tiny", "--dtype", "float32", "--num-prompts", "4",
                                "--alone", "2", "--max-tokens", "3", "--json", str(tmp_path / "inv.json")])
    res = json.loads((tmp_path / "inv.json").read_text())
    assert rc == 0 and res["ok"] and res["status"] == "done"
    assert res["engine"]["batch_invariant"] is True and res["prefix_hits"] > 0
    assert res["differ_in_batch"] == res["differ_chunked_4_seqs"] == {"tokens": 0, "logits": 0}
    assert res["tok_s"]["batch_invariant"] > 0 and res["tok_s"]["not_invariant"] > 0
    assert json.loads(capsys.readouterr().out) == res


def test_bench_invariance_without_cuda_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_invariance.main(["--json", str(tmp_path / "inv.json")]) == 0
    assert "no CUDA device" in capsys.readouterr().err
    assert json.loads((tmp_path / "inv.json").read_text())["status"] == "no CUDA device"


@pytest.mark.parametrize("name, kind", [
    ("_paged_attention_kernel", "attention"),
    ("_merge_segments_kernel", "attention"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matmul"),
    ("_rotary_kernel", "kv store + rotary"),
    ("_rms_norm_kernel", "rms_norm + silu"),
    ("Memcpy HtoD (Pageable -> Device)", "copies"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>>>", "other"),
])
def test_kernel_kinds_sort_profiled_kernels(name, kind):
    assert bench_gpu.kernel_kind(name) == kind


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                    reason="gpu_check.sh builds the project with this environment's setuptools")
def test_gpu_check_script_installs_runs_and_fails_only_for_want_of_cuda(tmp_path):
    """The script's stages as the GPU machine runs them, with CUDA hidden and the benchmark on its tiny CPU
    shape: everything runs, and the one problem reported is the missing GPU."""
    pytest.importorskip("transformers")
    bench_args = ("--device cpu --shape tiny --dtype float32 --num-prompts 3 --max-tokens 3 --max-num-seqs 2 "
                  "--decode-steps 2 --hf-batch-sizes 2 --skip-generate-batch")
    invariance_args = "--device cpu --shape tiny --dtype float32 --num-prompts 4 --alone 2 --max-tokens 3"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GPU_CHECK_STAGES": "setup env invariance bench",
           "GPU_CHECK_BENCH_ARGS": bench_args, "GPU_CHECK_INVARIANCE_ARGS": invariance_args,
           "GPU_CHECK_SITE": str(tmp_path / "site"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    res = json.loads((out / "results.json").read_text())
    assert run.returncode == 1, run.stdout + run.stderr  # not a pass: there is no GPU
    assert res["problems"] == ["no CUDA device visible to torch"], res
    assert {name: s["rc"] for name, s in res["stages"].items()} == {
        "setup-wheels": 0, "setup-project": 0, "env": 0, "invariance": 0, "bench": 0}
    assert res["invariance"]["ok"] and res["invariance"]["differ_in_batch"] == {"tokens": 0, "logits": 0}
    # the installed copy, kernels and plugins mapped into forge_batch, not the checkout
    assert f"forge_batch.kernels from {tmp_path / 'site'}/forge_batch/kernels/__init__.py" in (
        out / "setup.log").read_text()
    assert res["env"]["cuda_available"] is False
    assert res["bench"]["status"] == "done" and res["bench"]["ours"]["output_tokens"] == 3 * 3
    assert (out / "bench.md").read_text() == res["bench"]["report"]
    assert "top ops by device time" in (out / "profile.txt").read_text()
    # what the device tool brings back: at most 8 plain files, none deeper than OUTDIR itself
    files = list(out.rglob("*"))
    assert all(p.is_file() and p.parent == out for p in files) and len(files) <= 8, files
