"""Config schemas of the non-plugin groups, and their registration with Hydra.

Every Hydra group except ``reward`` and ``experiment`` is generated from a
dataclass (the single source of truth for names, defaults and help text):

- ``algorithm``, ``model``, ``sampler``, ``data``: one option per registered
  plugin (``algorithm=grpo`` is ``algorithms/grpo.py``'s ``Config``), with a
  ``name`` key naming the plugin;
- ``trainer``, ``optim``, ``execution``, ``logger``, ``alignment``, ``kernels``, ``distributed``: the dataclasses
  below (and ``coderlplus.kernels.KernelsConfig``).

``reward`` options are presets in ``conf/reward/*.yaml`` (which reward plugins
score which task kind); ``experiment`` options are presets in
``conf/experiment/*.yaml``. See every value with ``coderlplus-train --cfg job``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coderlplus.distributed import DistributedConfig
from coderlplus.kernels import KernelsConfig
from coderlplus.registry import (
    ALGORITHMS,
    MODELS,
    REWARDS,
    SAMPLERS,
    TASK_SOURCES,
    ConfigError,
    Registry,
    build_config,
    config_defaults,
)
from coderlplus.tasks.alignment import KIND as ALIGN_KIND
from coderlplus.tasks.alignment import AlignmentConfig

PLUGIN_GROUPS: dict[str, Registry] = {
    "algorithm": ALGORITHMS,
    "model": MODELS,
    "sampler": SAMPLERS,
    "data": TASK_SOURCES,
}


@dataclass
class TrainerConfig:
    max_steps: int = 30
    """Number of RL steps (one step = sample, score, update)."""
    prompts_per_step: int = 32
    """Prompts per step; each gets group_size rollouts."""
    group_size: int = 8
    """Rollouts per prompt (G)."""
    micro_batch_size: int = 128
    """Rollouts per forward/backward pass (gradient accumulation over the mini-batch)."""
    eval_every: int = 0
    """Evaluate every N steps (0 = only before the first and after the last step)."""
    save_every: int = 0
    """Save a checkpoint every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints kept (older ones are deleted), besides the best one (keep_best)."""
    keep_best: bool = True
    """Also keep the checkpoint with the best eval/validation/pass@1, saving one at every evaluation
    that sets a new best (needs validation in eval_splits; without it there is no best)."""
    resume: Any = False
    """false; auto (the newest complete checkpoint of this run dir, or a fresh start if there is none);
    or a path: a checkpoint folder (checkpoints/step_N) or a run dir (its newest checkpoint)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True): with a fixed thread count a CPU run is bit-for-bit
    reproducible, and a resumed run matches an uninterrupted one."""
    check_references: bool = True
    """Before training, run every reference solution of the train and eval splits on its tests (the
    sandbox; cached by content): a row whose reference fails is an error naming its file and line."""
    recompute_old_logp: bool = False
    """Recompute old log-probs with a forward pass instead of taking the sampler's (exact when the
    sampler shares the policy's weights, as the hf sampler does)."""
    eval_splits: list[str] = field(default_factory=lambda: ["validation", "test"])
    """Splits evaluated with greedy pass@1; eval/pass@1 is the last one."""
    eval_max_tasks: int | None = None
    """Evaluate on at most this many tasks per split (None = all)."""
    log_entropy: bool = True
    """Log the policy's token entropy (one softmax per token)."""
    threads: int | None = None
    """torch CPU threads (None = torch's default)."""
    device: str = "auto"
    """cpu, cuda or auto."""
    mixed_precision: str = "none"
    """none, or bf16: the matrix multiplies of the policy, reference and critic passes (and of the
    hf sampler's decoding) run in bfloat16 under ``torch.autocast``; parameters, gradients,
    optimiser state, the LM head and the log-softmax stay fp32 (TRL's ``bf16=True``, verl's bf16
    param dtype with fp32 reduce). ~2x faster GEMMs on GPUs and on CPUs with AVX512-BF16/AMX;
    log-probs then differ from an fp32 run at bf16 precision. (fp16 would need loss scaling: not
    offered.)"""
    progress: bool = True
    """Show a rich progress bar."""

    def __post_init__(self):
        for name in ("max_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"trainer.{name}={getattr(self, name)} must be >= 0")
        for name in ("prompts_per_step", "group_size", "micro_batch_size", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name}={getattr(self, name)} must be >= 1")
        if self.resume not in (False, None, "false", "auto") and not Path(str(self.resume)).exists():
            raise ConfigError(
                f"trainer.resume={self.resume!r} is not a checkpoint folder; use false, auto or an existing path"
            )
        if self.mixed_precision not in ("none", "bf16"):
            raise ConfigError(f"trainer.mixed_precision={self.mixed_precision!r}; choose none or bf16")
        for s in self.eval_splits:
            if s not in ("train", "validation", "test"):
                raise ConfigError(f"trainer.eval_splits: unknown split {s!r}; use train, validation or test")

    @property
    def rollouts_per_step(self) -> int:
        return self.prompts_per_step * self.group_size


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    fused: bool = True
    """torch's fused AdamW kernel (CPU and CUDA): one pass over each parameter instead of a
    dozen small ops (3x faster than the default loop on a CPU); false = torch's default."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    warmup_steps: int = 0
    """Linear warm-up over this many optimiser steps."""
    schedule: str = "constant"
    """constant or cosine (decay to 10% over trainer.max_steps)."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be > 0")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"optim.schedule={self.schedule!r}; choose constant or cosine")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas} must be two numbers in [0, 1)")
        if self.grad_clip < 0 or self.warmup_steps < 0:
            raise ConfigError("optim.grad_clip and optim.warmup_steps must be >= 0")


@dataclass
class ExecutionConfig:
    timeout_s: float = 2.0
    """Wall-clock limit per program run."""
    memory_mb: int = 512
    """Address-space limit per program."""
    max_output_bytes: int = 65536
    """Stdout/stderr cap per program."""
    workers: int | None = None
    """Warm worker processes (None = number of CPU cores)."""
    isolation: str = "bwrap"
    """bwrap (namespaces: no network, no host files, own PIDs) or rlimit (limits only)."""
    require_isolation: bool = False
    """If bwrap cannot start: false = fall back to rlimit with a loud warning, true = error."""
    tmp_mb: int = 64
    """Size of each bwrap server's private /tmp (what programs may write)."""
    recycle_after: int = 10000
    """Replace a sandbox server by a fresh one after this many programs (see Sandbox)."""
    site_packages: bool = False
    """Let programs import the trainer's site-packages (read-only); default: stdlib only."""
    batch_tests: bool = True
    """Run a program's stdin/stdout tests in one child process (each with its own stdin,
    output, limits, fresh __main__), not one process per test; see Sandbox."""
    native: bool = True
    """Run single programs through the servers' C fork loop (forkrun.c, built on first use
    with the system's C compiler; without one the Python loop runs); false = Python only."""

    def __post_init__(self):
        if self.timeout_s <= 0 or self.memory_mb < 16 or self.max_output_bytes < 1:
            raise ConfigError("execution: timeout_s must be > 0, memory_mb >= 16, max_output_bytes >= 1")
        if self.workers is not None and self.workers < 1:
            raise ConfigError("execution.workers must be >= 1 (or null for one per core)")
        if self.isolation not in ("bwrap", "rlimit"):
            raise ConfigError(f"execution.isolation must be bwrap or rlimit, got {self.isolation!r}")
        if self.tmp_mb < 1 or self.recycle_after < 1:
            raise ConfigError("execution: tmp_mb and recycle_after must be >= 1")


@dataclass
class LoggerConfig:
    wandb_mode: str = "auto"
    """auto (online with WANDB_API_KEY, else offline; $WANDB_MODE wins), online, offline or disabled."""
    project: str = "coderlplus"
    """W&B project."""
    group: str | None = None
    """W&B group (sweeps group their runs)."""
    tags: list[str] = field(default_factory=list)
    """W&B tags."""
    name: str | None = None
    """Run name (default: the run directory's name)."""

    def __post_init__(self):
        if self.wandb_mode not in ("auto", "online", "offline", "disabled"):
            raise ConfigError(
                f"logger.wandb_mode={self.wandb_mode!r}; choose auto, online, offline or disabled"
            )


STATIC_GROUPS: dict[str, dict[str, Any]] = {
    "trainer": {"default": TrainerConfig()},
    "optim": {"adamw": OptimConfig()},
    "execution": {"local": ExecutionConfig()},
    "logger": {"wandb": LoggerConfig(), "none": LoggerConfig(wandb_mode="disabled")},
    "alignment": {"default": AlignmentConfig()},
    # kernels=auto|torch|chunked|triton: how log-probs and entropy are computed (coderlplus.kernels)
    "kernels": {
        "auto": KernelsConfig(),
        "torch": KernelsConfig(backend="torch", linear=False),
        "chunked": KernelsConfig(backend="chunked"),
        "triton": KernelsConfig(backend="triton"),
    },
    # distributed=none|ddp|fsdp2: data parallel over the ranks torchrun starts (coderlplus.distributed)
    "distributed": {name: DistributedConfig(strategy=name) for name in ("none", "ddp", "fsdp2")},
}
STATIC_SCHEMAS = {group: type(next(iter(opts.values()))) for group, opts in STATIC_GROUPS.items()}


def register_hydra_configs() -> None:
    """Store every dataclass-backed option in Hydra's ConfigStore (call after ``load_plugins``)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for group, registry in PLUGIN_GROUPS.items():
        for name in registry.names():
            cls = registry.config_class(name)
            cs.store(group=group, name=name, node={"name": name, **(config_defaults(cls) if cls else {})})
    for group, options in STATIC_GROUPS.items():
        for name, value in options.items():
            cs.store(group=group, name=name, node=dataclasses.asdict(value))


def conf_dir() -> Path:
    """The ``conf/`` folder of the checkout."""
    from coderlplus.plugins import project_root

    return project_root() / "conf"


@dataclass
class ResolvedConfig:
    """The validated config: one dataclass per group plus the names of the chosen plugins."""

    seed: int
    algorithm_name: str
    algorithm: Any
    model_name: str
    model: Any
    sampler_name: str
    sampler: Any
    data_name: str
    data: Any
    reward: dict[str, dict[str, dict[str, Any]]]
    trainer: TrainerConfig
    optim: OptimConfig
    execution: ExecutionConfig
    logger: LoggerConfig
    alignment: AlignmentConfig
    kernels: KernelsConfig
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def resolve_plugin(group: str, values: dict[str, Any] | None) -> tuple[str, Any]:
    """``(plugin name, validated config dataclass)`` of one plugin group's composed values."""
    registry = PLUGIN_GROUPS[group]
    values = dict(values or {})
    name = values.pop("name", None)
    if name is None:
        raise ConfigError(f"{group}: no 'name' key; pick one with {group}=<one of {registry.names()}>")
    registry.get(name)  # unknown name -> lists the valid ones
    return name, registry.make_config(name, values, where=f"{group}={name}")


def resolve_config(cfg: dict[str, Any]) -> ResolvedConfig:
    """Validate a composed config (a plain dict) into dataclasses; raise ConfigError on any problem."""
    known = {"seed", "reward", *PLUGIN_GROUPS, *STATIC_SCHEMAS}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ConfigError(f"unknown top-level config keys {unknown}; valid keys: {sorted(known)}")
    out: dict[str, Any] = {"seed": int(cfg.get("seed", 0))}
    for group in PLUGIN_GROUPS:
        out[f"{group}_name"], out[group] = resolve_plugin(group, cfg.get(group))
    for group, schema in STATIC_SCHEMAS.items():
        out[group] = build_config(schema, dict(cfg.get(group) or {}), where=group)
    reward = cfg.get("reward") or {}
    if not isinstance(reward, dict) or not reward:
        raise ConfigError(
            "reward: expected a mapping task kind -> {reward name: options}, e.g. reward=outcome"
        )
    for kind, rewards in reward.items():  # each reward's options, checked now rather than at start-up
        for name, opts in (rewards or {}).items():
            REWARDS.get(name)  # unknown name -> lists the valid ones
            REWARDS.make_config(name, dict(opts or {}), where=f"reward.{kind}.{name}")
    out["reward"] = reward
    if out["alignment"].enabled and ALIGN_KIND not in reward:
        raise ConfigError(
            f"alignment.enabled=true makes {ALIGN_KIND!r} tasks, but the reward config scores only "
            f"{sorted(reward)}; use reward=coderlplus (or add reward.{ALIGN_KIND}.trace_alignment)"
        )
    resolved = ResolvedConfig(**out)
    check_combinations(resolved)
    return resolved


def check_combinations(rc: ResolvedConfig) -> None:
    """Checks across groups (each group's dataclass checks its own values); ConfigError says what to set."""
    from coderlplus.algorithm import Algorithm

    tc, ac = rc.trainer, rc.algorithm
    rollouts = tc.rollouts_per_step
    if rollouts % ac.mini_batches:
        raise ConfigError(
            f"algorithm.mini_batches={ac.mini_batches} does not divide the {rollouts} rollouts of a step "
            f"(trainer.prompts_per_step={tc.prompts_per_step} x trainer.group_size={tc.group_size}); "
            f"pick a divisor of {rollouts}"
        )
    algo_cls = ALGORITHMS.get(rc.algorithm_name)
    min_group = getattr(algo_cls, "min_group_size", 1)
    if tc.group_size < min_group:
        raise ConfigError(
            f"algorithm={rc.algorithm_name} compares the rollouts of a prompt with each other, so "
            f"trainer.group_size={tc.group_size} gives every rollout advantage 0; set trainer.group_size>={min_group}"
        )
    if ac.loss_norm_tokens and ac.loss_agg != "seq-mean-token-sum-norm":
        raise ConfigError(
            f"algorithm.loss_norm_tokens={ac.loss_norm_tokens} applies only to "
            f"algorithm.loss_agg=seq-mean-token-sum-norm (it is {ac.loss_agg}); set one or drop the other"
        )
    if ac.fused_loss and algo_cls.policy_loss is not Algorithm.policy_loss:
        raise ConfigError(
            f"algorithm.fused_loss=true does not apply to algorithm={rc.algorithm_name}: it computes its "
            f"own policy loss; drop algorithm.fused_loss"
        )
    al = rc.alignment
    if al.enabled:
        n_align = round(al.ratio * tc.prompts_per_step)
        if not 0 < n_align < tc.prompts_per_step:
            raise ConfigError(
                f"alignment.ratio={al.ratio} of trainer.prompts_per_step={tc.prompts_per_step} gives "
                f"{n_align} alignment prompts per batch: need at least 1 and fewer than "
                f"{tc.prompts_per_step} (code prompts feed the buffer); change either value"
            )
