"""Data-parallel training on many processes: ``distributed=none|ddp|fsdp2``, launched by torchrun.

``torchrun --nproc_per_node N -m coderlplus.train distributed=ddp ...`` runs the same
trainer loop in N processes (ranks). Per step:

1. every rank computes the same global list of prompts and samples its share
   (``prompts[rank::world]``, whole groups) with its own sampler and scores it with its
   own sandbox;
2. the rollouts and scores are gathered, so every rank holds the whole batch (group-wise
   advantages, REINFORCE++'s batch whitening, the CodeRL+ harvest are computed on all of
   it, identically on every rank); the no-grad passes (reference and old log-probs, critic
   values) are split over the ranks and gathered;
3. every mini-batch of the global batch is split across ranks (``mini[rank::world]``);
   each rank accumulates gradients over its micro-batches and the engine averages them:
   ``DistributedDataParallel`` (``ddp``, full replicas) or ``fully_shard`` (``fsdp2``,
   parameters, gradients and optimiser state sharded per decoder layer). The loss of each
   micro-batch is weighted against the *global* mini-batch and multiplied by the world
   size (the engines average over ranks), so the update is the one a single process makes
   on the same global batch, whatever N is;
4. rank 0 evaluates and logs; checkpoints (``distributed.checkpoint``) are ``full``
   (rank 0 writes one consolidated ``optimizer.pt``; ``none``/``ddp`` by default) or
   ``sharded`` (``fsdp2`` by default: every rank writes its shards of the trained weights
   and optimiser state with ``torch.distributed.checkpoint`` into ``dcp/``, nothing is
   gathered). Either kind resumes with any number of ranks, one process included (DCP
   reshards on load), and both hold the consolidated weights in ``model/`` for
   ``from_pretrained`` and evaluation (:mod:`coderlplus.checkpoint`).

The sampler always runs on a plain, full copy of the policy: the policy itself for
``none``/``ddp``; for ``fsdp2`` a copy refreshed after every update by gathering the
shards one tensor at a time (what a vLLM weight push does too). The reference model is a
plain copy on every rank (no gradients to shard). PPO's critic is replicated (``ddp``) or
sharded per decoder layer (``fsdp2``) like the policy, with its own optimiser. Not
supported: a critic that shares the policy's backbone (``algorithm.share_backbone=true``)
with ``ddp`` or ``fsdp2``; a config error.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from coderlplus.kernels import sequence_logprobs
from coderlplus.registry import ConfigError


@dataclass
class DistributedConfig:
    strategy: str = "none"
    """none (one process), ddp (DistributedDataParallel) or fsdp2 (fully_shard); N ranks via torchrun."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on GPUs, gloo on the CPU), nccl or gloo."""
    timeout_min: float = 30.0
    """How long a collective may wait for the other ranks (sampling and the sandbox run between them)."""
    checkpoint: str = "auto"
    """auto (sharded for fsdp2, full otherwise), sharded (every rank writes its shards of the weights and
    optimiser state with torch.distributed.checkpoint) or full (rank 0 writes one consolidated copy)."""

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ConfigError(
                f"distributed.strategy={self.strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ConfigError(f"distributed.backend={self.backend!r}; choose auto, gloo or nccl")
        if self.timeout_min <= 0:
            raise ConfigError(f"distributed.timeout_min={self.timeout_min} must be > 0")
        if self.checkpoint not in ("auto", "sharded", "full"):
            raise ConfigError(f"distributed.checkpoint={self.checkpoint!r}; choose auto, sharded or full")

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether checkpoints hold the training state as DCP shards (``dcp/``) rather than ``optimizer.pt``."""
        return self.checkpoint == "sharded" or (self.checkpoint == "auto" and self.strategy == "fsdp2")


class LogprobModule(nn.Module):
    """The policy's training forward (teacher-forced log-probs) as one module call.

    The engines hook a module's ``forward``: the kernels' log-prob computation reaches into
    the model (its backbone, then the LM head's weight), so it runs inside this wrapper's
    forward, which DDP and FSDP2 wrap as a whole.
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, input_ids, attention_mask, response_len, temperature, **kw):
        return sequence_logprobs(self.policy, input_ids, attention_mask, response_len, temperature, **kw)


class Strategy:
    """``distributed=none``: one process; every collective is the identity."""

    def __init__(self, cfg: DistributedConfig):
        self.cfg = cfg
        self.rank, self.world, self.local_rank = 0, 1, 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -------------------------------------------------------------- set-up and models
    def device(self, requested: str) -> torch.device:
        if requested != "auto":
            return torch.device(requested)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def wrap(self, policy: nn.Module, device: torch.device) -> nn.Module:
        """The module the update runs: ``LogprobModule`` around the policy (or a sharded copy)."""
        return LogprobModule(policy)

    def wrap_critic(self, critic: nn.Module | None, device: torch.device) -> nn.Module | None:
        return critic

    def sync_policy(self, train: nn.Module, policy: nn.Module) -> None:
        """After an update: make ``policy`` (what the sampler and checkpoints use) hold the new weights."""

    def load_policy(self, train: nn.Module, policy: nn.Module) -> None:
        """After ``policy`` was loaded from a checkpoint: put its weights into ``train``."""

    def optimizer_state(self, train: nn.Module, optimizer) -> Any:
        """What a checkpoint holds as ``optimizer.pt``: an object with ``state_dict``/``load_state_dict``."""
        return optimizer

    def model_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s full (unsharded) state dict; every rank calls it (a collective for fsdp2)."""
        return module.state_dict()

    def load_model_state(self, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a full state dict (every rank holds it) into ``module``, sharded or not."""
        module.load_state_dict(state)

    def no_sync(self, train: nn.Module, last: bool):
        """Around a micro-batch's backward: average gradients across ranks only on the ``last``."""
        return contextlib.nullcontext()

    def clip_grad_norm(self, params, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(list(params), max_norm))

    # -------------------------------------------------------------- collectives
    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_rows(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """Reassemble ``n`` rows of which each rank computed ``rows[rank::world]`` (as ``part``)."""
        if self.world == 1:
            return part
        on = (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else part.device
        )
        parts = [torch.empty_like(part, device=on) for _ in range(self.world)]
        dist.all_gather(parts, part.to(on).contiguous())
        out = part.new_empty((n, *part.shape[1:]))
        for rank, rows in enumerate(parts):
            out[rank :: self.world] = rows.to(out.device)
        return out

    def sum_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Sum each metric over ranks (every rank must pass the same keys)."""
        if self.world == 1 or not metrics:
            return metrics
        keys = sorted(metrics)
        t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return dict(zip(keys, t.tolist()))

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on some rank (e.g. a stop signal reached one of them)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.barrier()  # gloo aborts a rank that tears its group down while another still uses it
            dist.destroy_process_group()


class _ProcessGroup(Strategy):
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""

    def __init__(self, cfg: DistributedConfig):
        super().__init__(cfg)
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return  # a plain launch: one rank, no process group (the collectives are identities)
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if self.world > 1 and not dist.is_initialized():
            backend = cfg.backend
            if backend == "auto":
                backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=cfg.timeout_min))

    def wrap_critic(self, critic, device):
        if critic is None or self.world == 1:
            return critic
        if getattr(critic, "share_backbone", False):
            raise ConfigError(
                f"distributed={self.cfg.strategy} with a critic sharing the policy's backbone is not "
                "supported (the backbone lives inside the policy's replicated or sharded training module); "
                "use algorithm.share_backbone=false"
            )
        return self._wrap_critic(critic, device)

    def _wrap_critic(self, critic: nn.Module, device: torch.device) -> nn.Module:
        """The critic replicated or sharded over the ranks (world > 1, its own backbone)."""
        raise NotImplementedError

    def device(self, requested: str) -> torch.device:
        dev = super().device(requested)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(dev)
        return dev


class DDP(_ProcessGroup):
    """``distributed=ddp``: a full replica per rank, gradients averaged by DistributedDataParallel."""

    def wrap(self, policy: nn.Module, device: torch.device) -> nn.Module:
        module = LogprobModule(policy)
        if self.world == 1:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def _wrap_critic(self, critic, device):
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(critic, device_ids=ids)

    def no_sync(self, train, last):
        if last or not isinstance(train, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return train.no_sync()


class FSDP2(_ProcessGroup):
    """``distributed=fsdp2``: ``fully_shard`` on each decoder layer and the whole model."""

    _mesh = None

    def _shard(self, module: nn.Module, device: torch.device) -> nn.Module:
        """``fully_shard`` each decoder layer of ``module``, then ``module`` itself (in place)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if self._mesh is None:
            self._mesh = init_device_mesh(device.type, (self.world,))
        for layer in _decoder_layers(module):
            fully_shard(layer, mesh=self._mesh)
        fully_shard(module, mesh=self._mesh)
        return module

    def wrap(self, policy: nn.Module, device: torch.device) -> nn.Module:
        module = LogprobModule(copy.deepcopy(policy))  # sharded in place; the sampler keeps `policy`
        return self._shard(module, device) if self.world > 1 else module

    def _wrap_critic(self, critic, device):
        """Shard the critic in place (its optimiser is built afterwards, on the shards)."""
        return self._shard(critic, device)

    @torch.no_grad()
    def sync_policy(self, train, policy):
        """Gather the shards one tensor at a time (every rank, same order) into the full policy."""
        full = dict(policy.named_parameters())
        for name, param in train.policy.named_parameters():
            value = param.full_tensor() if hasattr(param, "full_tensor") else param
            full[name].copy_(value.to(full[name].device))

    def load_policy(self, train, policy):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = {f"policy.{k}": v for k, v in policy.state_dict().items()}  # every rank loaded the same file
        set_model_state_dict(train, full, options=StateDictOptions(full_state_dict=True))

    def optimizer_state(self, train, optimizer):
        return _FullOptimizerState(train, optimizer) if self.world > 1 else optimizer

    def model_state(self, module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.world == 1:
            return module.state_dict()
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(module, options=opts)

    def load_model_state(self, module, state):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if self.world == 1:
            module.load_state_dict(state)
        else:
            set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))

    def no_sync(self, train, last):
        if hasattr(train, "set_requires_gradient_sync"):
            train.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def clip_grad_norm(self, params, max_norm):
        norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


class _FullOptimizerState:
    """An FSDP2 optimiser's state as one unsharded state dict (so any world size can load it)."""

    def __init__(self, train: nn.Module, optimizer):
        self.train, self.optimizer = train, optimizer

    def _options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.train, self.optimizer, options=self._options())

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.train, self.optimizer, optim_state_dict=state, options=opts)


class TrainState:
    """A module and its optimiser as one ``torch.distributed.checkpoint`` entry (DCP's ``Stateful``).

    ``state_dict`` gives ``{"model": ..., "optim": ...}`` keyed by parameter names without the
    engines' wrappers (DDP's ``module.``), with each rank's shards for FSDP2 and whole tensors
    otherwise, so what one world size saves, any other (one plain process included) loads.
    """

    def __init__(self, module: nn.Module, optimizer):
        self.module, self.optimizer = module, optimizer

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.module, self.optimizer)
        return {"model": model, "optim": optim}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers causal LM (``model.model.layers`` and the like)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return list(module)
    return []


STRATEGIES: dict[str, type[Strategy]] = {"none": Strategy, "ddp": DDP, "fsdp2": FSDP2}
"""``distributed=<name>`` -> its strategy (file-level table: these are engines, not research plugins)."""


def make_strategy(cfg: DistributedConfig) -> Strategy:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and cfg.strategy == "none":
        raise ConfigError(
            f"launched on {launched} ranks (WORLD_SIZE) with distributed=none: every rank would train "
            f"alone into the same run dir; add distributed=ddp or distributed=fsdp2"
        )
    return STRATEGIES[cfg.strategy](cfg)
