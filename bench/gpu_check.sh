#!/usr/bin/env bash
# GPU checks on one CUDA GPU (an H100 with torch, transformers, lightning and peft, but no DeepSpeed, and no network):
#   1. the engine in bf16 on CUDA against plain `generate` (bench/engine.py: ratios, and vs the naive engine);
#   2. a DeepSpeed ZeRO-2 and a ZeRO-3 training step of a small LoRA switcher, exported and reloaded through the
#      engine, with probabilities equal to the trained module's (bf16: within 2e-2).
# What is missing is installed from the wheels in WHEELS (default .whl/ at the repository root, ignored by git), made
# on a machine with network by:
#   pip download --no-deps -d .whl hjson ninja py-cpuinfo msgpack omegaconf antlr4-python3-runtime==4.9.3 gguf \
#       math-verify latex2sympy2_extended torchmetrics lightning-utilities
#   pip wheel --no-deps --no-build-isolation -w .whl deepspeed==0.19.8   # pure Python: its ops build at run time
# (about 4 MB; the device tool carries .whl beside the work tree). Runs in about 3-5 minutes; prints one JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:-.whl}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
missing=()
for pair in deepspeed:deepspeed omegaconf:omegaconf gguf:gguf math_verify:math-verify torchmetrics:torchmetrics \
            hjson:hjson cpuinfo:py-cpuinfo msgpack:msgpack ninja:ninja; do
  python -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing from $WHEELS: ${missing[*]}"
  pip install --no-index --find-links "$WHEELS" "${missing[@]}"
fi
pip install --no-deps --no-build-isolation -e . >/dev/null
timeout 450 python bench/gpu_check.py
