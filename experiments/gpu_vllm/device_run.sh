#!/usr/bin/env bash
# Runs on the lent GPU machine (the `device` tool), from the repository root, after
# pack_vllm.sh's parts have travelled there, one .dcN per call, each copied to /tmp/dc (this
# call's own .dcN included). Writes at most 8 files to $OUT.
#
#   1. the default job (embedded tiny model, TinyCode, GRPO, 30 steps) with sampler=vllm on 1 GPU;
#      if it fails, again without CUDA graphs, then without sleep mode (each attempt's log kept);
#   2. the same job with sampler=hf (the lean decoder) for comparison;
#   3. if time is left: the GPU-marked tests, then bench_sampler on the embedded model.
set -u
T0=$SECONDS
LIMIT=${LIMIT:-420}            # seconds this script may use in all
STEPS=${STEPS:-30}
OUT=${OUT:-/tmp/out}
left() { echo $((LIMIT - (SECONDS - T0))); }

SITE=${SITE:-/tmp/site}       # SITE=none: use the packages already installed (a rehearsal elsewhere)
mkdir -p /tmp/cc /tmp/runs "$OUT"
mkdir -p /tmp/dc && cp .dc[0-9]/* /tmp/dc/ 2>/dev/null
if [ "$SITE" != none ] && [ ! -d "$SITE/vllm" ]; then
  mkdir -p "$SITE"
  cat /tmp/dc/site.part-a* | xz -d | tar -x -C "$SITE" || { echo "unpack failed"; exit 2; }
fi
[ -f /tmp/dc/cache.tar ] && tar -x -C /tmp/cc -f /tmp/dc/cache.tar
[ "$SITE" = none ] && SITE=
export PYTHONPATH=$SITE:$PWD/src PYTHONUNBUFFERED=1 WANDB_MODE=disabled CODERLPLUS_CACHE=/tmp/cc \
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# flashinfer is not packed (pack_vllm.sh); vLLM's GPU sampler imports it unless told not to use
# its top-k/top-p kernels (a plain `pip install vllm` brings flashinfer and needs no such switch).
export VLLM_USE_FLASHINFER_SAMPLER=0

{
  echo "# GPU run $(date -u +%FT%TZ)"
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, triton, transformers, vllm; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)" 2>&1 | tail -1
  echo "$(nproc) CPU cores"
  echo '```'
} > "$OUT/summary.md"
cat "$OUT/summary.md"

train() {  # name, timeout, overrides...
  local name=$1 limit=$2; shift 2
  rm -rf "/tmp/runs/$name"
  timeout "$limit" python3 -m coderlplus.train trainer.max_steps="$STEPS" trainer.progress=false \
    hydra.run.dir="/tmp/runs/$name" "$@" > "/tmp/runs/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc after $((SECONDS - T0)) s" | tee -a "$OUT/summary.md"
  return $rc
}

vllm_ok=0
for extra in "" "sampler.enforce_eager=true" "sampler.enforce_eager=true sampler.sleep_when_idle=false"; do
  [ "$(left)" -gt 150 ] || break
  # shellcheck disable=SC2086
  if train vllm 200 sampler=vllm $extra; then vllm_ok=1; echo "vllm overrides: ${extra:-none}" >> "$OUT/summary.md"; break; fi
  cp /tmp/runs/vllm.log "$OUT/vllm_failed_${#extra}.log"
done
[ "$vllm_ok" = 1 ] && cp /tmp/runs/vllm.log "$OUT/vllm.log"
[ "$(left)" -gt 60 ] && train hf 120 sampler=hf
[ -f /tmp/runs/hf.log ] && cp /tmp/runs/hf.log "$OUT/hf.log"
for r in vllm hf; do [ -f "/tmp/runs/$r/metrics.jsonl" ] && cp "/tmp/runs/$r/metrics.jsonl" "$OUT/${r}_metrics.jsonl"; done
python3 experiments/gpu_vllm/summarize.py /tmp/runs/hf /tmp/runs/vllm | tee -a "$OUT/summary.md"

if [ "$(left)" -gt 90 ]; then
  timeout $(($(left) - 60)) python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests: rc=$? $(tail -1 "$OUT/gpu_tests.log")" | tee -a "$OUT/summary.md"
fi
if [ "$vllm_ok" = 1 ] && [ "$(left)" -gt 100 ]; then
  OUT=/tmp/runs timeout $(($(left) - 10)) python3 experiments/bench_sampler/run.py --models embedded --rounds 3 > "$OUT/bench_sampler.log" 2>&1
  echo "bench_sampler: rc=$?" | tee -a "$OUT/summary.md"
  grep -A3 "^| model" "$OUT/bench_sampler.log" | tee -a "$OUT/summary.md"
fi
echo "done after $((SECONDS - T0)) s" | tee -a "$OUT/summary.md"
