#!/usr/bin/env bash
# Fetch into .whl/ the wheels that scripts/gpu_check.sh installs on the GPU machine, which has no network:
# exactly this project's dependencies that its image lacks (the image's package list is in the device
# tool's KINDS.md: it has torch, numpy, pyyaml, tqdm, requests, attrs, idna, python-dateutil, pyarrow,
# pluggy, safetensors, tokenizers, jinja2, transformers), for CPython 3.12 on manylinux x86_64.
#
#   bash scripts/gpu_wheels.sh          # run where pip reaches an index; .whl/ is git-ignored
#
# Pinned to the versions the test suite runs with here, one version of each (two stop the install there),
# --no-deps: the list is the whole closure of what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
    # pydantic and its closure (typing-extensions too: pydantic needs >= 4.16, newer than the image may hold)
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0
    # jsonschema, its closure, and the format checkers pyproject asks for
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
    fqdn==1.6.0 isoduration==20.11.0 arrow==1.4.0 tzdata==2026.6 jsonpointer==3.12 rfc3339-validator==0.1.4
    rfc3986-validator==0.1.1 uri-template==1.3.0 webcolors==25.10.0
    # constrained decoding and GGUF loading
    llguidance==1.9.1 gguf==0.19.0
)

mkdir -p .whl
# manylinux_2_31: llguidance 1.9 is built for glibc >= 2.31 (the image's Python 3.12.3 is Ubuntu 24.04's,
# glibc 2.39)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "${WHEELS[@]}"

# Exactly the pinned set: drop anything else an earlier run left behind.
python3 - "${WHEELS[@]}" <<'EOF'
import pathlib, re, sys
want = {re.sub(r"[-_.]+", "_", spec.split("==")[0]).lower(): spec.split("==")[1] for spec in sys.argv[1:]}
have = {}
for whl in pathlib.Path(".whl").glob("*.whl"):
    name, version = whl.name.split("-")[:2]
    key = re.sub(r"[-_.]+", "_", name).lower()
    if want.get(key) != version:
        print("removing", whl.name)
        whl.unlink()
    else:
        have[key] = whl
missing = sorted(set(want) - set(have))
if missing:
    sys.exit(f"missing wheels: {missing}")
size = sum(w.stat().st_size for w in have.values())
print(f"{len(have)} wheels in .whl/, {size / 2**20:.1f} MiB")
EOF
