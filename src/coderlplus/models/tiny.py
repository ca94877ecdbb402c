"""The embedded default model: a tiny Qwen2-architecture LM with a locally trained tokenizer.

Built on first use and cached, so the main job runs offline on a CPU:

1. a byte-level BPE tokenizer is trained with ``tokenizers`` on TinyCode train
   prompts and solutions, with Qwen2's normalizer and pre-tokenizer (so that
   transformers reloads it as ``Qwen2Tokenizer`` with the same ids) and a
   ChatML chat template (``<|im_start|>`` / ``<|im_end|>``, eos = ``<|im_end|>``);
2. a ~1.7M-parameter ``Qwen2ForCausalLM`` is initialised from a seed;
3. a short *warm start* (supervised fine-tuning on TinyCode train solutions and,
   for a share ``warm_start_align_frac`` of the examples, on CodeRL+ alignment
   tasks: a program, an input, and the traced output and variables as the JSON
   answer, in the harvester's own prompt format) makes it decent but far from
   perfect, leaving room for RL.

The warm-start demonstrations come from a deliberately **sloppy teacher** that
makes two classic slips of real SFT data, each with probability
``warm_start_noise`` where it applies: loops that should run to ``n`` inclusive
stop one short (``range(1, n)`` for ``range(1, n + 1)``), and "greater than" is
written as "at least" (``n >= K`` for ``n > K``). The model imitates them; RL with
execution feedback is what can tell right from wrong. Set ``model.warm_start_noise=0`` for
clean demonstrations (the model then starts stronger and RL has less to fix).

The result is saved with ``save_pretrained`` under
``<cache>/models/tiny-<hash of the config>/`` (``<cache>`` is
``$CODERLPLUS_CACHE`` or ``~/.cache/coderlplus``) and every later run loads it
with ``from_pretrained`` like any Hugging Face model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from coderlplus.registry import ConfigError, register_model

log = logging.getLogger(__name__)

BUILD_VERSION = 4  # bump when the build recipe changes, so old caches are not reused
PAD, BOS_CHAT, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2's pre-tokenizer regex (transformers rebuilds this pipeline when it loads a qwen2 tokenizer).
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def cache_root() -> Path:
    return Path(os.environ.get("CODERLPLUS_CACHE", "~/.cache/coderlplus")).expanduser()


@dataclass
class TinyModelConfig:
    cache_dir: str | None = None
    """Where built models are cached; default ``$CODERLPLUS_CACHE/models`` or ``~/.cache/coderlplus/models``."""
    vocab_size: int = 1024
    """BPE vocabulary size (including special tokens)."""
    hidden_size: int = 192
    """Width of the transformer."""
    intermediate_size: int = 512
    """Width of the MLP."""
    num_layers: int = 4
    """Number of transformer blocks."""
    num_heads: int = 6
    """Attention heads (hidden_size must be divisible by it)."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention; must divide num_heads)."""
    seed: int = 0
    """Seed of the initialisation and of the warm start's data order."""
    data_seed: int = 0
    """TinyCode seed of the warm-start problems (the RL train split)."""
    n_train: int = 4000
    """Number of TinyCode train problems the tokenizer and the warm start see."""
    warm_start_steps: int = 450
    """Supervised fine-tuning steps on TinyCode train solutions and alignment tasks (0 = random init)."""
    warm_start_batch_size: int = 32
    """Examples per warm-start step."""
    warm_start_lr: float = 2e-3
    """Peak learning rate of the warm start (cosine decay to 10%)."""
    warm_start_noise: float = 0.6
    """Probability of each sloppy-teacher slip (off-by-one loop end, >= for >) where it applies."""
    warm_start_align_frac: float = 0.25
    """Share of warm-start examples that are alignment tasks (predict a program's output and variables)."""
    max_prompt_tokens: int = 256
    """Prompts longer than this are dropped (with a warning) before sampling."""
    rebuild: bool = False
    """Rebuild even if a cached copy exists."""

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}"
            )
        if self.vocab_size < 300:
            raise ConfigError(f"model.vocab_size={self.vocab_size} is too small: byte-level BPE needs >= 300")
        for name in ("warm_start_steps", "n_train"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0")
        if not 0 <= self.warm_start_noise <= 1:
            raise ConfigError(f"model.warm_start_noise={self.warm_start_noise} must be in [0, 1]")
        if not 0 <= self.warm_start_align_frac < 1:
            raise ConfigError(f"model.warm_start_align_frac={self.warm_start_align_frac} must be in [0, 1)")

    def build_key(self) -> str:
        """A hash of everything that changes the built model."""
        fields = dataclasses.asdict(self)
        for k in ("cache_dir", "rebuild", "max_prompt_tokens"):
            fields.pop(k)
        blob = json.dumps({"v": BUILD_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def model_dir(self) -> Path:
        base = Path(self.cache_dir).expanduser() if self.cache_dir else cache_root() / "models"
        return base / f"tiny-{self.build_key()}"


# The sloppy teacher's two classic slips: (what the right program has, what the teacher writes).
SLIPS = (
    ("n + 1)", "n)"),  # a loop that should include n stops one short
    ("if n > ", "if n >= "),  # "greater than" written as "at least"
)


def sloppy_teacher(solution: str, rng: random.Random, noise: float) -> str:
    """The demonstration a sloppy teacher writes: each slip that applies is made with probability ``noise``."""
    for right, wrong in SLIPS:
        if right in solution and rng.random() < noise:
            solution = solution.replace(right, wrong)
    return solution


def _warm_start_rows(cfg: TinyModelConfig) -> tuple[list[dict], list[str]]:
    """Warm-start rows ``{"prompt": messages, "response": text}`` and their prompt texts.

    Code generation: TinyCode train problems, solved as the sloppy teacher writes them.
    Alignment (``warm_start_align_frac`` of all rows): sloppy solutions of other train
    problems traced on their first test input, asked and answered exactly as
    :mod:`coderlplus.tasks.alignment` asks (the answer: one reasoning line, then the JSON).
    """
    from coderlplus.tasks.tinycode import TinyCodeConfig, TinyCodeSource

    source = TinyCodeSource(TinyCodeConfig(seed=cfg.data_seed, n_train=cfg.n_train))
    tasks = [t for t in source.load("train") if t.payload.get("reference")]
    rng = random.Random(cfg.seed + 7919)
    programs = [sloppy_teacher(t.payload["reference"], rng, cfg.warm_start_noise) for t in tasks]
    rows = [
        {"prompt": t.prompt, "response": response_text(p), "kind": "codegen"} for t, p in zip(tasks, programs)
    ]
    n_align = round(len(rows) * cfg.warm_start_align_frac / (1 - cfg.warm_start_align_frac))
    if n_align:
        picked = [rng.randrange(len(tasks)) for _ in range(n_align)]
        rows += _alignment_rows([tasks[i] for i in picked], [programs[i] for i in picked])
    return rows, [r["prompt"][-1]["content"] for r in rows]


ALIGN_REASONING = "I run the program on this input and track each variable."


def _alignment_rows(tasks, programs: list[str]) -> list[dict]:
    """Alignment demonstrations: the traced output and last three variables, as the JSON answer."""
    from coderlplus.execution import Sandbox
    from coderlplus.tasks.alignment import AlignmentConfig, choose_variables, make_alignment_task

    acfg = AlignmentConfig()
    jobs = [(p, t.payload["tests"][0]["input"]) for t, p in zip(tasks, programs)]
    with Sandbox(timeout_s=2.0, isolation="bwrap") as sandbox:
        traces = sandbox.trace_many(jobs)
    rows = []
    for (code, stdin), trace in zip(jobs, traces):
        if trace.status != "ok" or not trace.stdout.strip() or trace.dropped or not trace.variables:
            continue
        variables = choose_variables(trace, acfg.max_variables, "last", random.Random(0))
        task = make_alignment_task(code, stdin, trace.stdout, variables, acfg.template, "warm", {})
        # Variables first: the model writes the state before the output it determines
        # (the reward reads the keys in any order).
        answer = json.dumps({"variables": variables, "final_output": trace.stdout})
        rows.append({"prompt": task.prompt, "response": f"{ALIGN_REASONING}\n{answer}", "kind": "align"})
    return rows


def response_text(solution: str) -> str:
    """The assistant turn the code-generation warm start teaches: one fenced python block."""
    return f"```python\n{solution.strip()}\n```"


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer with Qwen2's pipeline, wrapped for transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS_CHAT, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=1024,
    )


def _tokenize_examples(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + eos) per row, tokenized apart as at sampling time."""
    out = []
    for r in rows:
        p = tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True)
        if isinstance(p, dict) or hasattr(p, "input_ids"):
            p = p["input_ids"]
        resp = tokenizer(r["response"], add_special_tokens=False)["input_ids"]
        out.append((list(p), [*resp, tokenizer.eos_token_id]))
    return out


def warm_start(model, tokenizer, rows: list[dict], cfg: TinyModelConfig) -> list[float]:
    """Supervised fine-tuning on (prompt, solution) pairs; loss on response tokens only."""
    examples = _tokenize_examples(tokenizer, rows)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warm_start_lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, cfg.warm_start_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, cfg.warm_start_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    batches: list[list[int]] = []
    losses = []
    model.train()
    for _step in range(cfg.warm_start_steps):
        if not batches:  # a new epoch: batches of one kind each (similar lengths, less padding)
            by_kind: dict[str, list[int]] = {}
            for i, r in enumerate(rows):
                by_kind.setdefault(r.get("kind", ""), []).append(i)
            for idxs in by_kind.values():
                rng.shuffle(idxs)
                batches += [
                    idxs[j : j + cfg.warm_start_batch_size]
                    for j in range(0, len(idxs), cfg.warm_start_batch_size)
                ]
            rng.shuffle(batches)
        idx = batches.pop()
        seqs = [examples[i][0] + examples[i][1] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        labels = torch.full((len(seqs), width), -100)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, i in enumerate(idx):
            p, r = examples[i]
            ids[row, : len(p) + len(r)] = torch.tensor(p + r)
            labels[row, len(p) : len(p) + len(r)] = torch.tensor(r)
            mask[row, : len(p) + len(r)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def build_tiny_model(cfg: TinyModelConfig, out_dir: Path) -> dict:
    """Build tokenizer, model and warm start into ``out_dir``; returns build info."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t0 = time.time()
    rows, prompts = _warm_start_rows(cfg)
    chat = [f"user\n{p}\nassistant\n" for p in prompts]  # special tokens are added, not learned
    corpus = chat + [r["response"] for r in rows]
    tokenizer = train_tokenizer(corpus, cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    losses = warm_start(model, tokenizer, rows, cfg) if cfg.warm_start_steps else []
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {
        "config": dataclasses.asdict(cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "warm_start_final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])) if losses else None,
        "build_seconds": round(time.time() - t0, 1),
    }
    (out_dir / "coderlplus_build.json").write_text(json.dumps(info, indent=2))
    return info


def ensure_tiny_model(cfg: TinyModelConfig) -> Path:
    """The cached model folder, building it first if needed (atomic: build in a temp dir, then rename)."""
    final = cfg.model_dir()
    if final.exists() and not cfg.rebuild:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    log.warning("building the embedded tiny model into %s (first use; a few minutes on a CPU)", final)
    try:
        info = build_tiny_model(cfg, tmp)
        if final.exists():  # rebuild, or another process finished first
            if not cfg.rebuild:
                shutil.rmtree(tmp)
                return final
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.warning(
        "built %s: %d parameters, warm-start loss %s, %.0f s",
        final.name,
        info["parameters"],
        info["warm_start_final_loss"],
        info["build_seconds"],
    )
    return final


@register_model("tiny")
class TinyModel:
    """The embedded default: built and cached on first use, then loaded with ``from_pretrained``."""

    Config = TinyModelConfig

    def __init__(self, cfg: TinyModelConfig):
        self.cfg = cfg

    def load(self):
        from coderlplus.models.hf import load_causal_lm

        return load_causal_lm(ensure_tiny_model(self.cfg))
