#!/usr/bin/env bash
# GPU checks on one CUDA GPU (an H100 with torch, transformers, lightning and peft, but no DeepSpeed, and no network):
#   1. the engine in bf16 on CUDA against plain `generate` (bench/engine.py: ratios, and vs the naive engine);
#   2. a DeepSpeed ZeRO-2 and a ZeRO-3 training step of a small LoRA switcher, exported and reloaded through the
#      engine, with probabilities equal to the trained module's (bf16: within 2e-2).
# What is missing there is installed from the wheels in WHEELS (default .whl/ at the repository root, ignored by
# git). Make them first on a machine with network (about 10 MB; DeepSpeed is built as a pure-Python wheel whose
# ops compile at run time):   bash bench/gpu_check.sh --download
# then carry .whl/ to the GPU machine beside the work tree and run:   bash bench/gpu_check.sh
# It prints one JSON line and runs in about 3-5 minutes. `python bench/gpu_check.py --cpu-dry-run` runs the training,
# export and reload steps on CPU (fp32, no DeepSpeed), to check the script without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--download" ]; then
  WHEELS=${2:-.whl}
  pip download -q --no-deps -d "$WHEELS" hjson ninja py-cpuinfo einops psutil omegaconf gguf math-verify \
      latex2sympy2_extended torchmetrics lightning-utilities pydantic annotated-types typing-inspection
  for py in 3.10 3.11 3.12; do  # compiled ones, for whichever Python the GPU machine has
    pip download -q --no-deps --only-binary=:all: --python-version "$py" -d "$WHEELS" msgpack pydantic-core
  done
  pip wheel -q --no-deps --no-build-isolation -w "$WHEELS" deepspeed==0.19.8 antlr4-python3-runtime==4.9.3
  rm -f "$WHEELS"/*.tar.gz
  du -sh "$WHEELS"
  exit 0
fi
WHEELS=${1:-.whl}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
missing=()
for pair in deepspeed:deepspeed omegaconf:omegaconf gguf:gguf math_verify:math-verify torchmetrics:torchmetrics; do
  python -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing from $WHEELS: ${missing[*]}"
  pip install --no-index --find-links "$WHEELS" "${missing[@]}"
fi
pip install --no-deps --no-build-isolation -e . >/dev/null
timeout 450 python bench/gpu_check.py
