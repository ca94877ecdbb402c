"""The critic of actor-critic algorithms (PPO): a causal-LM backbone and a scalar value head.

``values[b, t]`` estimates the return from the state *before* response token ``t`` (the
prompt plus ``response[:t]``), read from the hidden state at the position that predicts token
``t`` — the same positions the policy's log-probs come from.

Two layouts (``share_backbone``):

- separate (default, as in verl and OpenRLHF): a copy of the policy's backbone, initialised
  from the policy, trained with its own optimiser; ``parameters()`` are the copy and the head;
- shared: the policy's own backbone plus a head. The backbone is *not* a submodule here, so
  ``parameters()`` / ``state_dict()`` are the head only; the value loss's gradients reach the
  backbone through the policy's parameters and its optimiser. It costs one extra forward
  pass through the policy per micro-batch (the policy's log-prob pass does not return hidden
  states).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ValueModel(nn.Module):
    def __init__(self, policy: nn.Module, share_backbone: bool = False, lr: float = 1e-4):
        super().__init__()
        base = policy.base_model  # the transformer without the LM head
        if share_backbone:
            self._shared = (base,)  # a tuple hides it from nn.Module's parameter registry
        else:
            self.backbone = copy.deepcopy(base)
        self.share_backbone = share_backbone
        self.lr = lr
        hidden = policy.config.hidden_size
        param = next(base.parameters())
        self.head = nn.Linear(hidden, 1, device=param.device, dtype=torch.float32)
        nn.init.zeros_(self.head.weight)  # values start at 0: no random bias in the first advantages
        nn.init.zeros_(self.head.bias)

    @property
    def base(self) -> nn.Module:
        return self._shared[0] if self.share_backbone else self.backbone

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int
    ) -> torch.Tensor:
        """``[B, P+T]`` ids and mask (as in ``sequence_logprobs``) -> values ``[B, T]`` (fp32)."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.base(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        hidden = out.last_hidden_state[:, -response_len - 1 : -1]  # (B, T, H): predicts token t
        return self.head(hidden.float()).squeeze(-1)  # (B, T)
