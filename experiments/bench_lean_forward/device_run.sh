#!/usr/bin/env bash
# On the lent GPU machine (the `device` tool), from the repository root, with .gpupack carried:
# hydra-core, omegaconf and antlr4 (pure Python, what the image lacks for these checks), e.g.
#   mkdir -p .gpupack/site && (cd .gpupack/site && for w in <their wheels>; do unzip -q -o $w; done)
# Runs the GPU-marked kernel and lean-forward tests, then the lean-forward benchmark at two sizes.
set -u
PY=${PY:-python3}
export PYTHONPATH=$PWD/.gpupack/site:$PWD/src PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
timeout 150 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_lean_forward.py tests/test_kernels.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
timeout 120 $PY experiments/bench_lean_forward/run.py --device cuda --size 0.5b --prompts 8 --n 8 \
  --prompt-len 128 --response-len 128 --repeats 5 2>&1 | tail -12 | tee "$OUT/bench_0.5b.md"
timeout 60 $PY experiments/bench_lean_forward/run.py --device cuda --size 25m --repeats 10 2>&1 | tail -12 | tee "$OUT/bench_25m.md"
