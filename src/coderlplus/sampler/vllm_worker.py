"""Runs inside vLLM's worker processes (``LLM(worker_extension_cls=...)``): in-place weight updates.

Imported by the worker before it loads the model. Two jobs:

1. On the CPU, vLLM repacks every linear weight for oneDNN / its own GEMM kernels at load
   time and empties ``layer.weight``; ``load_weights`` then writes into an empty tensor and the
   layers keep computing with the stale packed copy (log-probs off by ~1 after an update).
   Importing this module in the worker replaces that dispatch with a plain ``F.linear`` on
   ``layer.weight`` — slower GEMMs, but weights that can be updated. GPUs are untouched.
2. ``WeightSyncExtension.coderlplus_load_weights(blob)``, called on every worker through
   ``LLM.collective_rpc``, loads a safetensors-serialised bucket of Hugging Face-named tensors
   with the model's own ``load_weights`` (which maps them onto vLLM's fused layers).
"""

from __future__ import annotations

import torch


def _keep_plain_cpu_linear() -> None:
    try:
        from vllm.model_executor.layers import utils
        from vllm.platforms import current_platform
    except ImportError:  # not inside vLLM
        return
    if not current_platform.is_cpu():
        return

    def plain_linear(layer: torch.nn.Module, remove_weight: bool) -> None:
        layer.cpu_linear = torch.nn.functional.linear  # reads layer.weight at every call

    utils.dispatch_cpu_unquantized_gemm = plain_linear


_keep_plain_cpu_linear()


class WeightSyncExtension:
    """Mixed into vLLM's worker class; ``self.model_runner`` is the worker's."""

    def coderlplus_load_weights(self, blob: bytes) -> int:
        from safetensors.torch import load

        tensors = load(blob)
        self.model_runner.model.load_weights(weights=tensors.items())
        return len(tensors)
