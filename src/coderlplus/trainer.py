"""The training loop: sample -> score -> advantages -> update -> log / evaluate / checkpoint.

Every box is a plugin or a small module; this file only wires them (DESIGN §3).
Shapes: B rollouts (= prompts_per_step * group_size), P prompt tokens, T response tokens.

Reliability (what a resumed run relies on):

- a checkpoint holds everything the next step depends on: weights, optimiser, scheduler,
  RNG (python, numpy, torch), the data position (``code_seen``; the order is a function of
  (seed, epoch)), the alignment buffer, the critic, and the metrics state (lines of
  ``metrics.jsonl``, the pre-RL evaluation, the best validation pass@1, sandbox counters);
  so on the CPU a resumed run repeats the uninterrupted run's steps exactly;
- SIGINT/SIGTERM end the current step, save and stop (:mod:`coderlplus.preemption`);
- a reward, sandbox or harvest failure on a rollout scores it 0 and is counted in
  ``errors/*``; the step goes on.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coderlplus.checkpoint import (
    CheckpointError,
    is_sharded,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    sharded_keys,
)
from coderlplus.config import ConfigError, ResolvedConfig
from coderlplus.distributed import TrainState, make_strategy
from coderlplus.evaluation import greedy_pass_at_1
from coderlplus.execution import Sandbox
from coderlplus.kernels import check_backend, sequence_logprobs
from coderlplus.logger import NullLogger, RunLogger, truncate_metrics
from coderlplus.ops import micro_batch_weight
from coderlplus.preemption import StopOnSignals
from coderlplus.registry import ALGORITHMS, MODELS, SAMPLERS, TASK_SOURCES
from coderlplus.reward import RewardRouter
from coderlplus.sampler.base import SamplingParams, encode_prompts
from coderlplus.tasks.alignment import Alignment, alignment_metrics
from coderlplus.tasks.dataset import check_references
from coderlplus.types import RewardOutput, Rollout, RolloutBatch, Task

log = logging.getLogger(__name__)

BEST_METRIC = "eval/validation/pass@1"
"""The metric ``trainer.keep_best`` ranks checkpoints by."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_deterministic_algorithms() -> None:
    """Make torch pick deterministic kernels (an error where there is none); on CUDA, cuBLAS needs
    a fixed workspace, set before its first use."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def make_batch(rollouts: list[Rollout], scores: list[RewardOutput] | None, pad_id: int) -> RolloutBatch:
    """Pack rollouts into tensors: prompts left-padded to P, responses right-padded to T
    (rewards 0 without ``scores``: the trainer fills them in when the sandbox is done)."""
    P = max(len(r.prompt_ids) for r in rollouts)
    T = max(1, max(len(r.response_ids) for r in rollouts))
    B = len(rollouts)
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, P + T), dtype=torch.long)
    old_logp = torch.zeros((B, T))
    for i, r in enumerate(rollouts):
        p, n = len(r.prompt_ids), len(r.response_ids)
        input_ids[i, P - p : P] = torch.tensor(r.prompt_ids)
        input_ids[i, P : P + n] = torch.tensor(r.response_ids, dtype=torch.long)
        attention_mask[i, P - p : P + n] = 1
        old_logp[i, :n] = torch.tensor(r.logprobs)
    return RolloutBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=attention_mask[:, P:].float(),
        rewards=torch.tensor(
            [s.reward for s in scores] if scores is not None else [0.0] * B, dtype=torch.float32
        ),
        group_ids=torch.tensor([r.group_id for r in rollouts], dtype=torch.long),
        old_logp=old_logp,
        task_kinds=[r.task.kind for r in rollouts],
    )


def reward_metrics(rollouts: list[Rollout], scores: list[RewardOutput], group_size: int) -> dict[str, float]:
    rewards = np.array([s.reward for s in scores])
    statuses = [s.info.get("outcome", {}).get("status") for s in scores]
    judged = [st for st in statuses if st is not None]
    m = {
        "batch/rollouts": float(len(rollouts)),  # the whole step's, gathered from every rank
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()),
        "response/length_mean": float(np.mean([len(r.response_ids) for r in rollouts])),
        "response/truncated_frac": float(np.mean([r.finish_reason == "length" for r in rollouts])),
        # rollouts scored 0 because a reward raised, by where it raised (coderlplus.reward)
        "errors/reward": float(sum("reward" in _error_origins(s) for s in scores)),
        "errors/sandbox": float(sum("sandbox" in _error_origins(s) for s in scores)),
    }
    kinds = [r.task.kind for r in rollouts]
    for kind in sorted(set(kinds)):
        of_kind = [x for x, k in zip(rewards, kinds) if k == kind]
        m[f"reward/{kind}/mean"] = float(np.mean(of_kind))
        m[f"batch/{kind}_share"] = len(of_kind) / len(rollouts)
    if judged:
        m["reward/pass_rate"] = sum(st == "pass" for st in judged) / len(judged)
        for st in sorted(set(judged)):
            m[f"reward/status/{st}"] = sum(x == st for x in judged) / len(judged)
    groups = rewards.reshape(-1, group_size)
    m["batch/groups_with_signal"] = float((groups.std(axis=1) > 0).mean())
    return m


def _error_origins(score: RewardOutput) -> set[str]:
    return {
        v.get("error_origin", "reward")
        for v in score.info.values()
        if isinstance(v, dict) and "reward_error" in v
    }


def advantage_metrics(adv: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Statistics of the advantages over the real response tokens."""
    real = adv[mask.bool()]
    if real.numel() == 0:
        return {}
    return {
        "adv/mean": float(real.mean()),
        "adv/std": float(real.std()) if real.numel() > 1 else 0.0,
        "adv/max": float(real.max()),
        "adv/min": float(real.min()),
        "adv/zero_frac": float((real == 0).float().mean()),
    }


class Trainer:
    def __init__(self, cfg: ResolvedConfig, run_dir: str | Path, full_config: dict[str, Any] | None = None):
        self.cfg = cfg
        tc = cfg.trainer
        # Data parallel over the ranks torchrun started (distributed=ddp|fsdp2); one rank otherwise.
        self.dist = make_strategy(cfg.distributed)
        self.run_dir = Path(self.dist.broadcast(str(run_dir)))  # rank 0's (Hydra's clock may differ per rank)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.dist.is_main:  # rank 0 tells the story; the others only warn
            logging.getLogger("coderlplus").setLevel(logging.WARNING)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        if tc.deterministic:
            use_deterministic_algorithms()
        seed_everything(cfg.seed)
        self.device = self.dist.device(tc.device)

        # Components, each from its registry (no if/elif on plugin names).
        self.policy, self.tokenizer = MODELS.get(cfg.model_name)(cfg.model).load()
        self.policy.to(self.device)
        log.info("kernels: %s", check_backend(cfg.kernels.backend, self.device))
        self.algo = ALGORITHMS.get(cfg.algorithm_name)()
        self.reference = None
        if self.algo.needs_reference(cfg.algorithm):
            self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
            if tc.mixed_precision == "bf16":
                _bf16_projections(self.reference)
        # Actor-critic algorithms (PPO) train a value model beside the policy, with its own optimiser.
        self.critic = self.algo.make_critic(self.policy, cfg.algorithm)
        # every rank samples its own prompts: its own sampling seed (rank 0's is the single-process one)
        self.sampler_seed = sampler_seed = cfg.seed + 1_000_003 * self.dist.rank
        self.sampler = SAMPLERS.get(cfg.sampler_name)(
            cfg.sampler, self.policy, self.tokenizer, seed=sampler_seed
        )
        if self.dist.rank:  # the hf sampler draws from torch's global RNG: each rank its own stream
            torch.manual_seed(sampler_seed)
        self.sandbox = Sandbox(**dataclasses.asdict(cfg.execution))
        self._reward_thread = ThreadPoolExecutor(1, thread_name_prefix="reward")  # see train_step
        try:
            self._setup(full_config)
        except BaseException:  # a bad dataset or checkpoint: leave no sandbox or engine behind
            self._reward_thread.shutdown()
            self.sandbox.close()
            self.sampler.close()
            raise

    def _setup(self, full_config: dict[str, Any] | None) -> None:
        """Tasks, optimisers, the resumed state and the logger (after the sandbox exists)."""
        cfg, tc = self.cfg, self.cfg.trainer
        self.reward = RewardRouter(cfg.reward, sandbox=self.sandbox)
        source = TASK_SOURCES.get(cfg.data_name)(cfg.data)
        max_prompt = self._prompt_limit()
        # CodeRL+: alignment tasks harvested from failed rollouts, mixed into later batches.
        self.alignment = None
        if cfg.alignment.enabled:
            self.alignment = Alignment(
                cfg.alignment,
                self.sandbox,
                prompt_tokens=lambda task: len(encode_prompts(self.tokenizer, [task])[0]),
                max_prompt_tokens=max_prompt,
                seed=cfg.seed,
            )
        self.train_tasks = self._fit_prompts(source.load("train"), "train", max_prompt)
        self.eval_tasks = {
            s: self._fit_prompts(source.load(s), s, max_prompt)[: tc.eval_max_tasks] for s in tc.eval_splits
        }
        if tc.check_references:  # a reference that fails its own tests: a wrong row (file:line)
            from coderlplus.models.tiny import cache_root

            for tasks in [self.train_tasks, *self.eval_tasks.values()]:  # one cache entry per split
                checked = check_references(tasks, self.sandbox, source, cache_dir=cache_root() / "checked")
                if checked:
                    log.info("reference solutions of %d tasks pass their tests", checked)
        # With alignment on: held-out alignment tasks from the first eval split's reference programs.
        self.align_eval_tasks = []
        if self.alignment is not None and tc.eval_splits:
            first = self.eval_tasks[tc.eval_splits[0]]
            self.align_eval_tasks = self.alignment.eval_tasks(first, limit=tc.eval_max_tasks)

        self._check_shards()
        # What the update runs: the policy's log-prob forward, wrapped by the data-parallel engine
        # (for fsdp2 a sharded copy; self.policy stays the full model the sampler and checkpoints use).
        self.train_model = self.dist.wrap(self.policy, self.device)
        oc = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.train_model.parameters(),
            lr=oc.lr,
            betas=tuple(oc.betas),
            eps=oc.eps,
            weight_decay=oc.weight_decay,
            fused=oc.fused or None,
        )
        updates = max(1, tc.max_steps * cfg.algorithm.epochs * cfg.algorithm.mini_batches)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: self._lr_factor(s, updates)
        )
        self.critic_optimizer = None
        if self.critic is not None:
            self.critic.to(self.device).eval()
        # replicated (ddp) or sharded in place (fsdp2) before its optimiser is built on its parameters
        self.critic_train = self.dist.wrap_critic(self.critic, self.device)
        if self.critic is not None:
            self.critic_optimizer = torch.optim.AdamW(
                self.critic.parameters(),
                lr=self.critic.lr,
                betas=tuple(oc.betas),
                eps=oc.eps,
                fused=oc.fused or None,
            )
        self.step = 0
        self.code_seen = 0  # code-generation prompts drawn so far (the epoch counts these)
        self._order_epoch, self._order = -1, []
        self.before: dict[str, float] = {}  # the evaluation before RL (step 0), kept for the summary
        self.best: dict[str, float] = {}  # {"step", "value"}: the best BEST_METRIC of a checkpoint so far
        self._saved_step = -1
        self._logged_errors: set[str] = set()
        self.resumed_from: Path | None = None  # the checkpoint this run continues
        state = self._maybe_resume()  # before the logger opens metrics.jsonl: resume may cut it
        self.resumed = state is not None
        # sandbox/* count from the first step on (not the start-up checks, which a cache may skip),
        # continuing a resumed run's counts
        saved = (state or {}).get("sandbox_stats") or {}
        self._sandbox_offset = {k: saved.get(k, 0) - v for k, v in self.sandbox.stats.items()}
        if self.dist.is_main:  # one rank logs
            self.logger = RunLogger(
                cfg.logger, self.run_dir, full_config or {}, resume_id=(state or {}).get("wandb_id")
            )
        else:
            self.logger = NullLogger()

    # ------------------------------------------------------------------ setup helpers
    def _check_shards(self) -> None:
        """With N ranks: whole prompts per rank, and every mini-batch splits evenly over the ranks
        (equal shards keep the ranks in step, and the global batch is the same for any N)."""
        world, tc, ac = self.dist.world, self.cfg.trainer, self.cfg.algorithm
        mini = tc.rollouts_per_step // ac.mini_batches
        if world > 1 and (tc.prompts_per_step % world or mini % world):
            raise ConfigError(
                f"{world} ranks: trainer.prompts_per_step={tc.prompts_per_step} and the mini-batch of {mini} "
                f"rollouts (rollouts per step / algorithm.mini_batches) must both be divisible by {world}"
            )

    def _prompt_limit(self) -> int | None:
        """The longest prompt (tokens) the run takes: ``model.max_prompt_tokens``, and at most what the
        model's context (``max_position_embeddings``) leaves after ``sampler.max_new_tokens``."""
        limit = getattr(self.cfg.model, "max_prompt_tokens", None)
        context = getattr(self.policy.config, "max_position_embeddings", None)
        new = getattr(self.cfg.sampler, "max_new_tokens", 0)
        if context:
            if new >= context:
                raise ConfigError(
                    f"sampler.max_new_tokens={new} leaves no room for a prompt: the model's context is "
                    f"{context} tokens (max_position_embeddings); lower sampler.max_new_tokens"
                )
            limit = context - new if limit is None else min(limit, context - new)
        return limit

    def _fit_prompts(self, tasks: list[Task], split: str, max_prompt: int | None) -> list[Task]:
        """Drop (with a warning naming them) the prompts longer than ``max_prompt`` tokens."""
        if not max_prompt:
            return tasks
        lengths = [len(p) for p in encode_prompts(self.tokenizer, tasks)]
        kept = [t for t, n in zip(tasks, lengths) if n <= max_prompt]
        too_long = [f"{t.id} ({n} tokens)" for t, n in zip(tasks, lengths) if n > max_prompt]
        what_to_do = (
            f"the limit is model.max_prompt_tokens or the model's context minus sampler.max_new_tokens: "
            f"{max_prompt} tokens; raise it, or shorten the prompt template"
        )
        if not kept:
            raise ConfigError(f"{split}: every prompt is too long, e.g. {too_long[:3]}; {what_to_do}")
        if too_long:
            log.warning(
                "%s: dropped %d of %d prompts that are too long, e.g. %s; %s",
                split, len(too_long), len(tasks), ", ".join(too_long[:5]), what_to_do,
            )  # fmt: skip
        return kept

    def _lr_factor(self, update: int, total: int) -> float:
        oc = self.cfg.optim
        if update < oc.warmup_steps:
            return (update + 1) / oc.warmup_steps
        if oc.schedule == "cosine":
            progress = min(1.0, (update - oc.warmup_steps) / max(1, total - oc.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    def _resume_path(self) -> Path | None:
        """The checkpoint ``trainer.resume`` names: none (false), the newest complete one of this run
        dir (auto), a checkpoint folder, or the newest of another run dir."""
        resume = self.cfg.trainer.resume
        if resume in (False, None, "false"):
            return None
        if resume == "auto":
            path = latest_checkpoint(self.run_dir)
            if path is None:
                log.warning("trainer.resume=auto: no checkpoint in %s; starting from scratch", self.run_dir)
                # what an earlier attempt logged before it died is replaced, not appended to
                cut = truncate_metrics(self.run_dir / "metrics.jsonl", 0) if self.dist.is_main else 0
                if cut:
                    log.warning(
                        "metrics.jsonl: dropped %d line(s) of an earlier attempt without checkpoint", cut
                    )
            return path
        path = Path(str(resume)).expanduser()
        if (path / "checkpoints").is_dir():  # a run dir: its newest checkpoint
            found = latest_checkpoint(path)
            if found is None:
                raise CheckpointError(
                    f"trainer.resume={resume}: no complete checkpoint under {path}/checkpoints"
                )
            return found
        return path

    def _maybe_resume(self) -> dict[str, Any] | None:
        """Restore the state of the checkpoint ``trainer.resume`` names; return its state.json (or None)."""
        # rank 0 picks the checkpoint (and cleans up after a killed save); every rank loads it
        path = self.dist.broadcast(self._resume_path() if self.dist.is_main else None)
        if path is None:
            return None
        # the data order is a function of (seed, epoch, train set): resuming with others would not continue it
        saved = read_state(path)
        for key, now, what in (
            ("seed", self.cfg.seed, "seed"),
            ("n_train", len(self.train_tasks), "train tasks"),
        ):
            if key in saved and saved[key] != now:
                raise ConfigError(
                    f"checkpoint {path} was written by a run with {what}={saved[key]}, this run has {now}: "
                    f"its data order and sampling would not continue. Resume with the run's own config "
                    f"({path.parent.parent}/.hydra/config.yaml), or start a new run from its weights "
                    f"(model=hf model.path={path}/model, without trainer.resume)"
                )
        if is_sharded(path):  # DCP shards, resharded to this run's ranks: the trained modules and optimisers
            if self.critic is not None and "critic" not in sharded_keys(path):
                raise CheckpointError(f"{path} has no critic: it was not saved by an actor-critic run")
            state = load_checkpoint(path, self.policy, None, self.scheduler, sharded=self._sharded_state())
        else:  # one consolidated copy, loaded by every rank
            optimizer = self.dist.optimizer_state(self.train_model, self.optimizer)
            state = load_checkpoint(path, self.policy, optimizer, self.scheduler)
            self.dist.load_policy(self.train_model, self.policy)
            if self.critic is not None:
                if not (path / "critic.pt").exists():
                    raise CheckpointError(f"{path} has no critic.pt: it was not saved by an actor-critic run")
                critic_state = torch.load(path / "critic.pt", weights_only=False, map_location=self.device)
                self.dist.load_model_state(self.critic, critic_state["model"])
                critic_optimizer = self.dist.optimizer_state(self.critic, self.critic_optimizer)
                critic_optimizer.load_state_dict(critic_state["optimizer"])
        self.step = int(state["step"])
        self._restore_rank_rng(path)
        self.code_seen = int(state.get("code_seen", self.step * self.cfg.trainer.prompts_per_step))
        if self.alignment is not None and (path / "alignment.json").exists():
            self.alignment.load_state_dict(json.loads((path / "alignment.json").read_text()))
        self.before = dict(state.get("before") or {})
        self.best = dict(state.get("best") or {})
        self._saved_step = self.step
        self.resumed_from = path
        if path.resolve().parent.parent == self.run_dir.resolve() and self.dist.is_main:
            if "metrics_lines" in state:  # rows logged after the checkpoint are logged again by this run
                cut = truncate_metrics(self.run_dir / "metrics.jsonl", int(state["metrics_lines"]))
                if cut:
                    log.warning("metrics.jsonl: dropped %d line(s) logged after %s", cut, path.name)
            else:
                log.warning("%s predates metrics truncation: metrics.jsonl may repeat steps", path)
        log.warning("resumed from %s at step %d", path, self.step)
        return state

    def _sharded_state(self) -> dict[str, TrainState]:
        """The DCP entries of a sharded checkpoint: the trained modules with their optimisers."""
        entries = {"policy": TrainState(self.train_model, self.optimizer)}
        if self.critic is not None:
            entries["critic"] = TrainState(self.critic, self.critic_optimizer)
        return entries

    def _restore_rank_rng(self, path: Path) -> None:
        """Give each rank its own saved RNG streams (``rng_ranks.pt``) when the world size is the
        saved one; with another world size rank 0 keeps ``rng.pt`` and the others reseed their own."""
        if self.dist.world == 1:
            return  # rng.pt: rank 0's state, set by load_checkpoint
        saved = path / "rng_ranks.pt"
        states = torch.load(saved, weights_only=False) if saved.exists() else None
        if states is not None and len(states) == self.dist.world:
            set_rng_state(states[self.dist.rank])
        elif self.dist.rank:
            torch.manual_seed(self.sampler_seed + self.step)

    # ------------------------------------------------------------------ the loop
    def next_tasks(self) -> list[Task]:
        """The next batch's prompts: code-generation tasks, plus alignment tasks once there are some.

        Code-generation prompts walk a seeded reshuffle of the train set per epoch (the
        epoch is defined by them); with alignment on, ``alignment.ratio`` of the batch
        comes from the alignment buffer once it holds enough.
        """
        k = self.cfg.trainer.prompts_per_step
        n_align = self.alignment.n_align(k) if self.alignment is not None else 0
        n = len(self.train_tasks)
        code = []
        for pos in range(self.code_seen, self.code_seen + k - n_align):
            epoch, i = divmod(pos, n)
            code.append(self.train_tasks[self._epoch_order(epoch)[i]])
        self.code_seen += len(code)
        return code + (self.alignment.sample(n_align) if n_align else [])

    def _epoch_order(self, epoch: int) -> list[int]:
        """The train-set permutation of ``epoch``: a function of (seed, epoch) only, so resume replays it."""
        if self._order_epoch != epoch:
            order = list(range(len(self.train_tasks)))
            random.Random(self.cfg.seed * 100_003 + epoch).shuffle(order)
            self._order_epoch, self._order = epoch, order
        return self._order

    def train_step(self, step: int) -> dict[str, float]:
        tc, ac = self.cfg.trainer, self.cfg.algorithm
        t0 = time.perf_counter()
        tasks = self.next_tasks()[self.dist.rank :: self.dist.world]  # this rank's prompts
        with self._amp():  # the hf sampler decodes under the passes' precision
            rollouts = self.sampler.generate(tasks, tc.group_size)
        t1 = time.perf_counter()
        # The sandbox scores this rank's rollouts (in its own processes) while this process runs
        # the passes that do not need rewards: reference / old log-probs, critic values.
        pending = self._reward_thread.submit(self._timed_reward, rollouts)
        if self.dist.world > 1:  # every rank gets the whole batch
            rollouts, _ = _merge_ranks([(part, []) for part in self.dist.gather(rollouts)])
        batch = make_batch(rollouts, None, self.tokenizer.pad_token_id)
        if self.reference is not None:
            batch.ref_logp = self._logprobs(self.reference, batch)
        if tc.recompute_old_logp:
            batch.old_logp = self._logprobs(self.policy, batch)
        if self.critic is not None:
            batch.values = self._per_micro_batch(self.critic, batch)
        t2 = time.perf_counter()
        scores, t_reward = pending.result()
        if self.dist.world > 1:
            scores = [s for part in self.dist.gather(scores) for s in part]  # rank order, as the rollouts
        batch.rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32)
        t_wait = time.perf_counter() - t2
        align_metrics = self._harvest(rollouts, scores, step) if self.alignment else {}
        adv = self.algo.compute_advantages(batch, ac)  # (B, T)
        adv_metrics = advantage_metrics(adv, batch.response_mask)
        t3 = time.perf_counter()
        metrics = self._update(batch, adv, step)
        self.dist.sync_policy(self.train_model, self.policy)
        self.sampler.update_weights()
        t4 = time.perf_counter()
        metrics |= reward_metrics(rollouts, scores, tc.group_size) | adv_metrics
        metrics |= align_metrics | alignment_metrics(rollouts, scores)
        metrics |= {
            "timing/sample_s": t1 - t0,
            "timing/reward_s": t_reward,  # overlapped with timing/logprob_s
            "timing/reward_wait_s": t_wait,
            "timing/logprob_s": t2 - t1,
            "timing/align_harvest_s": t3 - t2 - t_wait,
            "timing/update_s": t4 - t3,
            "timing/step_s": t4 - t0,
            **self._sandbox_stats(),
        }
        return metrics

    def _amp(self):
        """The forward passes' autocast: bf16 matrix multiplies with ``trainer.mixed_precision=bf16``
        (parameters, optimiser and log-softmax stay fp32), else a no-op."""
        bf16 = self.cfg.trainer.mixed_precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def _timed_reward(self, rollouts: list[Rollout]) -> tuple[list[RewardOutput], float]:
        t = time.perf_counter()
        return self.reward(rollouts), time.perf_counter() - t

    def _harvest(self, rollouts: list[Rollout], scores: list[RewardOutput], step: int) -> dict[str, float]:
        """CodeRL+'s harvest of this step's rollouts into the alignment buffer; a failure skips it."""
        try:
            return self.alignment.after_step(rollouts, scores, step) | {"errors/align_harvest": 0.0}
        except Exception as e:
            self._log_once(f"harvest:{type(e).__name__}", f"step {step}: alignment harvest failed, skipped")
            return {"errors/align_harvest": 1.0}

    def _log_once(self, key: str, message: str) -> None:
        """Log an error with its traceback the first time ``key`` occurs, at debug level after that."""
        if key in self._logged_errors:
            log.debug(message, exc_info=True)
        else:
            self._logged_errors.add(key)
            log.exception(
                "%s (the step goes on; further errors of this kind are logged at debug level)", message
            )

    def _sandbox_stats(self) -> dict[str, float]:
        """``sandbox/*`` counters since the first step (carried over a resume)."""
        return {
            f"sandbox/{k}": float(v + self._sandbox_offset.get(k, 0)) for k, v in self.sandbox.stats.items()
        }

    def _logprobs(self, model, batch: RolloutBatch) -> torch.Tensor:
        """Teacher-forced log-probs ``[B, T]`` of the response tokens under ``model``."""
        kc, temp = self.cfg.kernels, self.cfg.sampler.temperature
        return self._per_micro_batch(
            lambda ids, am, T: sequence_logprobs(model, ids, am, T, temp, kernels=kc)[0], batch
        )

    @torch.no_grad()
    def _per_micro_batch(self, fn, batch: RolloutBatch) -> torch.Tensor:
        """``fn(input_ids, attention_mask, T) -> [b, T]`` over micro-batches, without gradients:
        log-probs (policy, reference) or the critic's values. With N ranks each computes every N-th
        row and the rows are gathered (every rank holds the whole batch's result)."""
        T, mb = batch.response_mask.shape[1], self.cfg.trainer.micro_batch_size
        mine = slice(self.dist.rank, None, self.dist.world)
        ids_all, am_all = batch.input_ids[mine], batch.attention_mask[mine]
        out = []
        for s in range(0, len(ids_all), mb):
            ids = ids_all[s : s + mb].to(self.device)
            am = am_all[s : s + mb].to(self.device)
            with self._amp():
                out.append(fn(ids, am, T).float().cpu())
        return self.dist.gather_rows(torch.cat(out), len(batch))

    def _update(self, batch: RolloutBatch, adv: torch.Tensor, step: int = 0) -> dict[str, float]:
        """Epochs x mini-batches of optimiser steps; micro-batches accumulate gradients.

        With N ranks each takes every N-th row of a mini-batch; losses are weighted against the
        whole mini-batch and scaled by N (the engine averages gradients over the ranks).
        """
        tc, ac = self.cfg.trainer, self.cfg.algorithm
        B, T = batch.response_mask.shape
        world = self.dist.world
        sums: dict[str, float] = defaultdict(float)
        norms: dict[str, float] = defaultdict(float)
        n_updates = 0
        self.train_model.train()
        if self.critic is not None:
            self.critic.train()
        # the same mini-batch order on every rank: a function of (seed, step)
        shuffle = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        for _epoch in range(ac.epochs):
            order = torch.randperm(B, generator=shuffle) if ac.mini_batches > 1 else torch.arange(B)
            for mini in order.chunk(ac.mini_batches):
                self.optimizer.zero_grad(set_to_none=True)
                if self.critic is not None:
                    self.critic_optimizer.zero_grad(set_to_none=True)
                micros = mini[self.dist.rank :: world].split(tc.micro_batch_size)
                for k, micro in enumerate(micros):
                    last = k == len(micros) - 1
                    sub = batch.select(micro)
                    with (
                        self.dist.no_sync(self.train_model, last),
                        self.dist.no_sync(self.critic_train, last),
                    ):
                        loss, m, entropy, w = self._micro_loss(sub, batch.response_mask[mini], adv[micro], T)
                        (loss * (w * world)).backward()
                    for key, v in m.items():
                        sums[key] += w * v
                    if entropy is not None:
                        sums["actor/entropy"] += w * float(
                            (entropy.detach() * sub.response_mask).sum()
                            / sub.response_mask.sum().clamp(min=1)
                        )
                grad_clip = self.cfg.optim.grad_clip or float("inf")
                norms["actor/grad_norm"] += self.dist.clip_grad_norm(self.train_model.parameters(), grad_clip)
                _optimizer_step(self.optimizer)
                if self.critic is not None:
                    critic_norm = self.dist.clip_grad_norm(self.critic.parameters(), grad_clip)
                    norms["critic/grad_norm"] += critic_norm
                    _optimizer_step(self.critic_optimizer)
                self.scheduler.step()
                n_updates += 1
        self.train_model.eval()
        if self.critic is not None:
            self.critic.eval()
        sums = self.dist.sum_metrics(dict(sums))  # each rank holds its rows' share of the weighted means
        metrics = {k: v / n_updates for k, v in (sums | norms).items()}
        metrics["actor/lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def _micro_loss(self, sub: RolloutBatch, mini_mask: torch.Tensor, adv: torch.Tensor, T: int):
        """One micro-batch's loss (actor, plus critic if any), metrics, entropy and its weight in the mini-batch."""
        tc, ac = self.cfg.trainer, self.cfg.algorithm
        with self._amp():
            logp, entropy = self.train_model(
                sub.input_ids.to(self.device),
                sub.attention_mask.to(self.device),
                T,
                self.cfg.sampler.temperature,
                with_entropy=ac.entropy_coef > 0 or tc.log_entropy,
                entropy_grad=ac.entropy_coef > 0,
                kernels=self.cfg.kernels,
            )
        sub = _to_device(sub, self.device)
        loss, m = self.algo.policy_loss(logp, sub, adv.to(self.device), ac, entropy=entropy)
        if self.critic is not None:  # one backward for both: a shared backbone gets both
            with self._amp():
                values = self.critic_train(sub.input_ids, sub.attention_mask, T).float()  # (b, T)
            critic_loss, cm = self.algo.critic_loss(values, sub, ac)
            loss, m = loss + critic_loss, m | cm
        return loss, m, entropy, micro_batch_weight(sub.response_mask, mini_mask, ac.loss_agg)

    def evaluate(self, step: int) -> dict[str, float]:
        """Greedy pass@1 per eval split (and held-out alignment accuracy); rank 0 evaluates, all get it."""
        with self._amp():  # the hf sampler decodes under the passes' precision
            return self.dist.broadcast(self._evaluate(step) if self.dist.is_main else None)

    def _evaluate(self, step: int) -> dict[str, float]:
        metrics = {}
        eval_dir = self.run_dir / "eval"
        eval_dir.mkdir(exist_ok=True)
        for split, tasks in self.eval_tasks.items():
            res = greedy_pass_at_1(self.sampler, tasks, self.sandbox, self.cfg.sampler.max_new_tokens)
            metrics[f"eval/{split}/pass@1"] = res.pass_at_1
            metrics["eval/pass@1"] = res.pass_at_1  # the last split (test by default)
            with (eval_dir / f"{split}_step{step:06d}.jsonl").open("w") as f:
                for r, ok in zip(res.rollouts, res.passed):
                    f.write(json.dumps({"id": r.task.id, "passed": ok, "completion": r.completion}) + "\n")
        if self.align_eval_tasks:  # greedy answers to held-out alignment tasks, scored by their reward
            params = SamplingParams(temperature=0.0, max_new_tokens=self.cfg.sampler.max_new_tokens)
            rollouts = self.sampler.generate(self.align_eval_tasks, 1, params)
            m = alignment_metrics(rollouts, self.reward(rollouts))
            metrics |= {f"eval/{k}": v for k, v in m.items()}
        return metrics

    def save(self, eval_metrics: dict[str, float] | None = None) -> Path:
        """Checkpoint the run at ``self.step``; ``eval_metrics``: this step's evaluation (ranks it for
        ``trainer.keep_best``). Raises CheckpointError (the earlier checkpoints intact) if it cannot."""
        tc = self.cfg.trainer
        state = {
            "seed": self.cfg.seed,
            "code_seen": self.code_seen,
            "n_train": len(self.train_tasks),
            "metrics_lines": self.logger.lines,
            "before": self.before,
            "best": self.best,
            "eval": {k: v for k, v in (eval_metrics or {}).items() if k.startswith("eval/")},
            "sandbox_stats": {k[len("sandbox/") :]: v for k, v in self._sandbox_stats().items()},
            "wandb_id": self.logger.run_id,
        }
        extra_torch: dict[str, Any] = {}
        if self.dist.world > 1:  # every rank's RNG streams (each samples with its own)
            extra_torch["rng_ranks"] = self.dist.gather(rng_state())
        optimizer, sharded = None, None
        if self.dist.cfg.sharded_checkpoints:  # every rank writes its shards into dcp/
            sharded = self._sharded_state()
        else:  # one consolidated copy (gathering it is a collective for fsdp2: every rank takes part)
            optimizer = self.dist.optimizer_state(self.train_model, self.optimizer).state_dict()
            if self.critic is not None:
                critic_optimizer = self.dist.optimizer_state(self.critic, self.critic_optimizer)
                extra_torch["critic"] = {
                    "model": self.dist.model_state(self.critic),
                    "optimizer": critic_optimizer.state_dict(),
                }
        path = save_checkpoint(
            self.run_dir,
            self.step,
            self.policy,
            self.tokenizer,
            optimizer,
            self.scheduler,
            state,
            keep_last=tc.keep_last,
            extra_json={"alignment": self.alignment.state_dict()} if self.alignment else None,
            extra_torch=extra_torch,
            best_metric=BEST_METRIC if tc.keep_best else None,
            sharded=sharded,
            comm=self.dist,
        )
        self._saved_step = self.step
        return path

    def _new_best(self, eval_metrics: dict[str, float]) -> bool:
        """Whether this evaluation sets a new best ``BEST_METRIC`` (then ``self.best`` records it)."""
        value = eval_metrics.get(BEST_METRIC)
        if not self.cfg.trainer.keep_best or value is None or value <= self.best.get("value", -math.inf):
            return False
        self.best = {"step": self.step, "value": value}
        return True

    def fit(self) -> dict[str, Any]:
        """Train to ``trainer.max_steps``; return the summary. On SIGINT/SIGTERM: finish the step, save,
        and return early with ``summary["interrupted"]`` (the signal's name) and ``"signum"``."""
        from coderlplus.progress import TrainProgress

        tc = self.cfg.trainer
        t_start = time.time()
        start_step = self.step
        with StopOnSignals() as stop:
            stopped = False  # a signal reached some rank: every rank stops after the same step
            if not self.resumed:
                self.before = self.evaluate(self.step)
                self._record(self.before, self.step)
            with TrainProgress(
                tc.max_steps, start_step, enabled=tc.progress and self.dist.is_main
            ) as progress:
                for step in range(start_step + 1, tc.max_steps + 1):
                    stopped = self.dist.any(stop.signum is not None)
                    if stopped:
                        break
                    metrics = self.train_step(step)
                    self.step = step
                    evaluated = {}
                    if tc.eval_every and step % tc.eval_every == 0 and step != tc.max_steps:
                        evaluated = self.evaluate(step)
                        metrics |= evaluated
                    self._record(metrics, step)
                    progress.update(step, metrics)
                    best = self._new_best(evaluated)  # a new best is saved, so keep_best can keep it
                    due = tc.save_every and step % tc.save_every == 0 and step != tc.max_steps
                    if due or best:
                        self.save(evaluated)
            if stopped or self.dist.any(stop.signum is not None):
                return self._stopped(stop, start_step)
            after = self.before
            if self.step > start_step:
                after = self.evaluate(self.step)
                self._record(after, self.step)
                self._new_best(after)
            if self.step > start_step or self.resumed_from is None:
                ckpt = self.save(after if self.step > start_step else None)
            else:  # resumed at max_steps: nothing new to save
                ckpt = self.resumed_from
        before = self.before
        summary = {
            "pass@1_before": before.get("eval/pass@1", math.nan),
            "pass@1_after": after.get("eval/pass@1", math.nan),
            "steps": self.step - start_step,
            "minutes": (time.time() - t_start) / 60,
            "checkpoint": str(ckpt),
            "run_dir": str(self.run_dir),
            **{f"{k}_before": v for k, v in before.items()},
            **{f"{k}_after": v for k, v in after.items()},
        }
        if self.best:
            summary |= {"best_checkpoint": str(ckpt.parent / f"step_{int(self.best['step']):06d}")}
            summary |= {f"best_{BEST_METRIC}": self.best["value"]}
        self.logger.summary({k: v for k, v in summary.items() if isinstance(v, (int, float))})
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _stopped(self, stop: StopOnSignals, start_step: int) -> dict[str, Any]:
        """After a SIGINT/SIGTERM: checkpoint the last finished step (unless it was just saved)."""
        ckpt = (
            self.save()
            if self._saved_step != self.step
            else (latest_checkpoint(self.run_dir) or self.resumed_from)
        )
        log.warning(
            "stopped by %s after step %d; checkpoint %s. Resume with trainer.resume=auto and the same "
            "run dir (hydra.run.dir=%s), or trainer.resume=%s",
            stop.name, self.step, ckpt, self.run_dir, ckpt,
        )  # fmt: skip
        return {
            "interrupted": stop.name,
            "signum": stop.signum,
            "steps": self.step - start_step,
            "step": self.step,
            "checkpoint": str(ckpt),
            "run_dir": str(self.run_dir),
        }

    def _record(self, metrics: dict[str, float], step: int) -> None:
        self.logger.log(metrics, step)

    def close(self) -> None:
        self._reward_thread.shutdown(wait=True)
        self.logger.close()
        self.sandbox.close()
        self.sampler.close()
        self.dist.close()


def _optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``. torch's fused AdamW writes the parameters without bumping their
    version counters, which is how ``sampler=vllm`` finds the tensors to push: bump them here."""
    optimizer.step()
    if optimizer.defaults.get("fused"):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.autograd.graph.increment_version(params)


def _merge_ranks(
    parts: list[tuple[list[Rollout], list[RewardOutput]]],
) -> tuple[list[Rollout], list[RewardOutput]]:
    """Concatenate the ranks' (rollouts, scores) in rank order, with group ids unique across ranks."""
    rollouts, scores, offset = [], [], 0
    for rank_rollouts, rank_scores in parts:
        ids = sorted({r.group_id for r in rank_rollouts})
        new_id = {g: offset + i for i, g in enumerate(ids)}
        rollouts += [dataclasses.replace(r, group_id=new_id[r.group_id]) for r in rank_rollouts]
        scores += rank_scores
        offset += len(ids)
    return rollouts, scores


def _bf16_projections(model: torch.nn.Module) -> None:
    """The frozen reference under ``trainer.mixed_precision=bf16``: its linear layers stored in
    bf16, which is what autocast casts them to at every pass — the same numbers without a cast of
    every weight per step. The output head (the log-probs' fp32 LM head) and the embedding it may
    share stay as they are."""
    head = model.get_output_embeddings()
    keep = {id(p) for p in head.parameters()} if head is not None else set()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not any(id(p) in keep for p in m.parameters()):
            m.to(torch.bfloat16)


def _to_device(batch: RolloutBatch, device: torch.device) -> RolloutBatch:
    if device.type == "cpu":
        return batch
    for name in (
        "input_ids",
        "attention_mask",
        "response_mask",
        "rewards",
        "group_ids",
        "old_logp",
        "ref_logp",
        "values",
    ):
        t = getattr(batch, name)
        if t is not None:
            setattr(batch, name, t.to(device))
    return batch
