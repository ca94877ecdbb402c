#!/usr/bin/env bash
# Code reasoning and test-output prediction before (the embedded model) and after RL (the final
# checkpoint of every run given), 100 TinyCode test problems each, greedy. Writes
# <run>/reasoning_eval/results.json. Usage: bash reasoning_eval.sh multirun/tinycode_ablation/{0,3,...}
set -euo pipefail
base=$(python -c "from coderlplus.models.tiny import TinyModelConfig, ensure_tiny_model; print(ensure_tiny_model(TinyModelConfig()))")
common=("reasoning=[code,test_output]" max_tasks=100 "splits=[test]")
WANDB_MODE=disabled coderlplus-eval model=hf "model.path=$base" "${common[@]}" hydra.run.dir=multirun/tinycode_ablation/base_reasoning_eval
for run in "$@"; do
  ckpt=$(ls -d "$run"/checkpoints/step_* | tail -1)
  WANDB_MODE=disabled coderlplus-eval model=hf "model.path=$ckpt/model" "${common[@]}" "hydra.run.dir=$run/reasoning_eval"
done
