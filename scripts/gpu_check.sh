#!/usr/bin/env bash
# The CUDA path on a GPU machine, in one command that never stops at the first failure:
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Made for the workplace's H200 image (python3 3.12 with torch 2.11 + CUDA 13, Triton 3.6, transformers,
# pyarrow, pluggy, safetensors, tokenizers, jinja2; no pydantic, jsonschema, llguidance or gguf, and no
# network). Stages, each under its own timeout, each one's exit code and seconds in OUTDIR/results.json:
#
#   setup   the wheels in .whl/ (scripts/gpu_wheels.sh fetches them beforehand, elsewhere) and this
#           project, both without dependencies and with no index, into a --target folder on PYTHONPATH
#   env     nvidia-smi, versions, CUDA visible or not, a copy-bandwidth and a bf16-matmul ceiling
#   pytest  pytest -m gpu (Triton kernels vs the reference, CUDA graphs vs eager vs CPU, the engine's
#           greedy tokens on Triton vs the reference, batch invariance of the kernels and the engine)
#   invariance  python -m forge_batch.bench_invariance: SmolLM2-135M shape, random bf16 weights, batch_invariant
#           on: 8 prompts alone vs among 64 and in chunked steps of 4 sequences, token ids and logits bits
#           identical; then the 64 timed with batch_invariant on and off (the cost)
#   bench   python -m forge_batch.bench_gpu: Llama-3.1-8B shape, random bf16 weights, 256 prompts x 128
#           tokens, ours vs transformers, decode bandwidth fraction, torch profile of one decode step
#
# OUTDIR receives at most 7 files (the device tool brings back 8): results.json, setup.log, pytest.log,
# bench.log, bench.md, profile.txt, profile_trace.json.
# The whole run stays inside GPU_CHECK_DEADLINE_S (default 450 s), each stage inside its own timeout.
# Knobs for a second, narrower run: GPU_CHECK_STAGES (default "setup env pytest invariance bench"),
# GPU_CHECK_PYTEST_ARGS (e.g. "-k attention"), GPU_CHECK_BENCH_ARGS (replaces the bench options below),
# GPU_CHECK_INVARIANCE_ARGS (replaces the invariance options below),
# GPU_CHECK_PROFILE (set empty to leave out the profile), GPU_CHECK_SITE (the --target folder, default
# /tmp/site).
set -u

if [ $# -ne 1 ]; then
    echo "usage: bash scripts/gpu_check.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUTDIR="$(cd "$1" && pwd)"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO" || exit 2
SITE="${GPU_CHECK_SITE:-/tmp/site}"
STAGES="${GPU_CHECK_STAGES:-setup env pytest invariance bench}"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"
STAGE_TSV="$WORK/stages.tsv"
: >"$STAGE_TSV"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
# The project runs from $SITE, never from the checkout: a checkout's ./forge_batch lacks the kernels and
# plugins subpackages (pyproject maps them in from ./kernels and ./plugins), so the current directory
# must not come first on sys.path (PYTHONSAFEPATH, Python 3.11+).
export PYTHONSAFEPATH=1
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET FORGE_BATCH_KERNELS
T_START=$(date +%s)
DEADLINE="${GPU_CHECK_DEADLINE_S:-450}"
GPU_CHECK_PROFILE="${GPU_CHECK_PROFILE-1}"

want() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# run_stage NAME TIMEOUT_S LOG CMD...: run CMD under a timeout, append its output to LOG, record rc and seconds.
# A stage's timeout is cut to what is left of GPU_CHECK_DEADLINE_S (whole run, default 450 s: a second run
# must fit in the same 15-minute device budget), keeping 20 s for results.json.
run_stage() {
    local name=$1 limit=$2 log=$3
    shift 3
    local t0 rc left
    t0=$(date +%s)
    left=$((DEADLINE - (t0 - T_START) - 20))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 10 ]; then
        echo "=== $name: skipped, ${left}s left of the ${DEADLINE}s deadline" | tee -a "$log"
        printf '%s\t%s\t%s\t%s\n' "$name" 125 0 "$(basename "$log")" >>"$STAGE_TSV"
        return 125
    fi
    echo "=== $name: $* (timeout ${limit}s) $(date -u +%FT%TZ)" | tee -a "$log"
    # bash -c: the stage may be one of the functions above (exported); timeout signals its process group
    timeout --kill-after=15 "$limit" bash -c '"$@"' "$name" "$@" >>"$log" 2>&1
    rc=$?
    [ "$rc" -eq 124 ] && echo "=== $name: TIMED OUT after ${limit}s" | tee -a "$log"
    echo "=== $name: rc=$rc in $(($(date +%s) - t0))s" | tee -a "$log"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$(basename "$log")" >>"$STAGE_TSV"
    return "$rc"
}

# Every module the project imports from its dependencies (yaml: pyyaml, dateutil: python-dateutil; six:
# rfc3339-validator's, whose absence silently drops jsonschema's date-time/time checks).
DEP_MODULES="pydantic jsonschema llguidance gguf yaml tqdm numpy pyarrow pluggy safetensors tokenizers jinja2
fqdn isoduration jsonpointer rfc3339_validator rfc3986_validator uri_template webcolors six
dateutil attrs requests idna"

missing_modules() {
    python3 -c "
import importlib.util, sys
missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]
print(' '.join(missing))" $DEP_MODULES
}

install_wheels() {
    # Only what the image lacks travels (scripts/gpu_wheels.sh); nothing is resolved or fetched here.
    local missing
    missing=$(missing_modules) || return 1
    if [ -z "$missing" ]; then
        echo "every dependency is importable already: no wheels installed"
        return 0
    fi
    echo "missing before: $missing"
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        echo "no .whl/ folder: run scripts/gpu_wheels.sh where pip can reach an index, and carry .whl"
        return 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl || return 1
    missing=$(missing_modules) || return 1
    echo "missing after: ${missing:-none}"
    [ -z "$missing" ]
}

install_project() {
    # A regular (not editable) install into $SITE, built from a copy of the sources with the image's own
    # setuptools (--no-build-isolation: nothing to fetch); the copy keeps build/ and egg-info out of the
    # checkout.
    local src="$WORK/src"
    mkdir -p "$src"
    cp -r pyproject.toml README.md forge_batch kernels plugins "$src/" || return 1
    find "$src" -name __pycache__ -prune -exec rm -rf {} +
    rm -rf "$SITE"/forge_batch "$SITE"/forge_batch-*.dist-info
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" "$src" \
        || return 1
    (cd / && python3 -c "
import forge_batch, forge_batch.kernels, forge_batch.plugins, forge_batch.kernels.dispatch
print('forge_batch from', forge_batch.__file__)
print('forge_batch.kernels from', forge_batch.kernels.__file__)") || return 1
    # Every file of the checkout's packages must have been installed (package-data misses show up here).
    local f dest missing=0
    while IFS= read -r f; do
        case "$f" in
            kernels/*) dest="$SITE/forge_batch/${f}" ;;
            plugins/*) dest="$SITE/forge_batch/${f}" ;;
            *) dest="$SITE/$f" ;;
        esac
        [ -e "$dest" ] || { echo "not installed: $f"; missing=1; }
    done < <(find forge_batch kernels plugins -type f ! -name '*.pyc' ! -path '*/__pycache__/*')
    return "$missing"
}

show_env() {
    echo "--- nvidia-smi"
    nvidia-smi || echo "nvidia-smi failed (rc $?)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>/dev/null
    echo "--- versions, and ceilings measured here and now"
    python3 - "$WORK/env.json" <<'EOF'
import importlib.metadata as md, json, platform, sys, time
facts = {"python": sys.version.split()[0], "platform": platform.platform()}
for dist in ["torch", "triton", "transformers", "numpy", "pyarrow", "pydantic", "jsonschema", "llguidance",
             "gguf", "forge-batch", "pytest", "pytest-timeout"]:
    try:
        facts[dist] = md.version(dist)
    except md.PackageNotFoundError:
        facts[dist] = None
import torch
facts["cuda_available"] = torch.cuda.is_available()
facts["torch_cuda"] = torch.version.cuda
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    facts.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                 memory_gib=round(p.total_memory / 2**30, 1))

    def timed(fn, reps=10):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps

    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    facts["copy_tb_s_read_plus_write"] = round(2 * x.numel() / timed(lambda: y.copy_(x)) / 1e12, 2)
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    facts["bf16_matmul_tflop_s"] = round(2 * 8192**3 / timed(lambda: a @ a) / 1e12, 1)
print(json.dumps(facts, indent=1))
json.dump(facts, open(sys.argv[1], "w"))
EOF
}

export -f missing_modules install_wheels install_project show_env
export SITE WORK DEP_MODULES

if want setup; then
    run_stage setup-wheels 60 "$OUTDIR/setup.log" install_wheels
    run_stage setup-project 60 "$OUTDIR/setup.log" install_project
fi
if want env; then
    run_stage env 45 "$OUTDIR/setup.log" show_env
fi
if want pytest; then
    TIMEOUT_ARGS=()
    python3 -c "import pytest_timeout" 2>/dev/null && TIMEOUT_ARGS=(--timeout=120)
    # shellcheck disable=SC2086
    run_stage pytest 210 "$OUTDIR/pytest.log" python3 -m pytest -m gpu -p no:cacheprovider -rfEs --durations=15 \
        ${TIMEOUT_ARGS[@]+"${TIMEOUT_ARGS[@]}"} --junitxml="$WORK/pytest.xml" ${GPU_CHECK_PYTEST_ARGS:-}
fi
if want invariance; then
    # one model's rows alone vs batched, bit for bit, batch_invariant on; and the cost of it (its log goes to
    # bench.log: OUTDIR keeps to 7 files)
    # shellcheck disable=SC2086
    run_stage invariance 90 "$OUTDIR/bench.log" python3 -m forge_batch.bench_invariance \
        ${GPU_CHECK_INVARIANCE_ARGS:---num-prompts 64 --alone 8 --max-tokens 32} --json "$WORK/invariance.json"
fi
if want bench; then
    # 256 prompts x 128 tokens as the issue asks; transformers' static batches 64 and 256, then its
    # continuous batching last (slowest, and the JSON keeps everything measured before a timeout).
    # shellcheck disable=SC2086
    run_stage bench 240 "$OUTDIR/bench.log" python3 -m forge_batch.bench_gpu \
        ${GPU_CHECK_BENCH_ARGS:---num-prompts 256 --max-tokens 128 --hf-batch-sizes 64,256 --decode-steps 32} \
        --json "$WORK/bench.json" ${GPU_CHECK_PROFILE:+--profile "$OUTDIR/profile.txt"}
fi

# results.json: every stage's rc and seconds, the environment, the pytest counts and failures, the bench
# figures (and its markdown report, also as bench.md).
python3 - "$STAGE_TSV" "$WORK" "$OUTDIR" "$(($(date +%s) - T_START))" "$(git rev-parse --short HEAD 2>/dev/null)" <<'EOF'
import json, os, sys
import xml.etree.ElementTree as ET
tsv, work, outdir, total, commit = sys.argv[1:6]
res = {"commit": commit or None, "total_seconds": int(total), "stages": {}}
for line in open(tsv):
    name, rc, secs, log = line.rstrip("\n").split("\t")
    res["stages"][name] = {"rc": int(rc), "seconds": int(secs), "log": log, "timed_out": rc in ("124", "137"),
                           "skipped_for_time": rc == "125"}
env = os.path.join(work, "env.json")
if os.path.exists(env):
    res["env"] = json.load(open(env))
xml = os.path.join(work, "pytest.xml")
if os.path.exists(xml):
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in suite.iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                failed.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": tag,
                               "message": (el.get("message") or "")[:500]})
    skipped = sorted({(c.find("skipped").get("message") or "")[:200] for c in suite.iter("testcase")
                      if c.find("skipped") is not None})
    res["pytest"] = {**counts, "failed": failed, "skip_reasons": skipped}
invariance = os.path.join(work, "invariance.json")
if os.path.exists(invariance):
    res["invariance"] = json.load(open(invariance))
bench = os.path.join(work, "bench.json")
if os.path.exists(bench):
    res["bench"] = json.load(open(bench))
    if res["bench"].get("report"):
        with open(os.path.join(outdir, "bench.md"), "w") as f:
            f.write(res["bench"]["report"])
# What keeps this run from being a pass, in words (empty: every stage ran and every gpu test passed)
cuda = res.get("env", {}).get("cuda_available")
problems = [] if cuda else ["no CUDA device visible to torch"]
problems += [f"stage {n}: " + ("timed out" if s["timed_out"] else "skipped, out of time" if s["skipped_for_time"]
                                else f"rc {s['rc']}") for n, s in res["stages"].items() if s["rc"] != 0]
if "pytest" in res:
    p = res["pytest"]
    if p["failures"] or p["errors"]:
        problems.append(f"pytest: {p['failures']} failed, {p['errors']} errors")
    if p["skipped"]:
        problems.append(f"pytest: {p['skipped']} gpu tests skipped ({'; '.join(p['skip_reasons'])})")
if "invariance" in res and not res["invariance"].get("ok"):
    inv = res["invariance"]
    problems.append(f"invariance: engine {inv.get('engine')}, rows differing in the batch "
                    f"{inv.get('differ_in_batch')}, in chunked steps {inv.get('differ_chunked_4_seqs')}")
if "bench" in res:
    b = res["bench"]
    if b.get("status") != "done":
        problems.append(f"bench: {b.get('status')}")
    if (b.get("ours") or {}).get("triton_fallback"):
        problems.append(f"bench: Triton fell back to the reference: {b['ours']['triton_fallback']}")
    if (b.get("transformers") or {}).get("errors"):
        problems.append(f"bench: transformers failed: {b['transformers']['errors']}")
res["problems"] = problems
res["ok"] = not problems
with open(os.path.join(outdir, "results.json"), "w") as f:
    json.dump(res, f, indent=1, default=str)
print(json.dumps({"ok": res["ok"], "problems": problems, "stages": {n: s["rc"] for n, s in res["stages"].items()},
                  "pytest": {k: v for k, v in res.get("pytest", {}).items() if k != "skip_reasons"}}, indent=1))
EOF
OK=$(python3 -c "import json,sys; print(int(json.load(open(sys.argv[1]))['ok']))" "$OUTDIR/results.json" 2>/dev/null)
rm -rf "$WORK"
[ "$OK" = 1 ]
