"""coderlplus vs TRL's GRPOTrainer: seconds per RL step on the same work, on this CPU.

Both trainers get the same model folder, the same 16 TinyCode prompts, the same reward (the
outcome reward through our sandbox, wrapped as a TRL reward function), 4 generations per
prompt, 8 completions per step (2 prompts x 4), completions of at most 32 tokens, the same
learning rate, KL coefficient and number of steps, one thread. Runs alternate (TRL, ours,
TRL, ours, ...), each in a fresh process; the table reports the median seconds per step
(the first step, warm-up, left out), the ratio, and each process's peak RSS.

    pip install -e ".[bench-trl]"        # trl: a benchmark-only dependency
    OMP_NUM_THREADS=1 python experiments/bench_vs_trl/run.py            # both model sizes
    python experiments/bench_vs_trl/run.py --quick                      # smoke test

Models: the embedded tiny model (~1.8M parameters, the project's default) and a ~25M-parameter
Qwen2 config with the same tokenizer (random weights: the step's cost, not its quality, is
measured). Writes ``results.csv``, ``results.md`` and ``curves.png`` here.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import csv
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
N_PROMPTS, PROMPTS_PER_STEP, GENERATIONS, MAX_NEW = 16, 2, 4, 32


# ----------------------------------------------------------------------------- shared work


def tasks():
    from coderlplus.tasks.tinycode import TinyCodeConfig, TinyCodeSource

    return TinyCodeSource(TinyCodeConfig()).load("train")[:N_PROMPTS]


def make_25m_model(tiny_dir: str, out: Path) -> str:
    """A ~25M-parameter Qwen2 with the tiny model's tokenizer and chat template (random weights)."""
    if (out / "config.json").exists():
        return str(out)
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


# ----------------------------------------------------------------------------- workers


# The fixes issue 11's profile pointed to, switched off: `ours-before` is our trainer without them
# (sampling through model.generate, one transformers forward per row, torch's default AdamW loop). The reward
# overlapping the no-grad passes has no switch.
BEFORE_FIXES = (
    "sampler.fast_decode=false",
    "kernels.shared_prefix=false",
    "kernels.lean_forward=false",
    "optim.fused=false",
)


def run_ours(model: str, steps: int, lr: float, beta: float, extra: tuple[str, ...] = ()) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import coderlplus
    from coderlplus.config import conf_dir, register_hydra_configs, resolve_config
    from coderlplus.trainer import Trainer

    coderlplus.load_plugins()
    register_hydra_configs()
    overrides = [
        "model=hf",
        f"model.path={model}",
        f"trainer.prompts_per_step={PROMPTS_PER_STEP}",
        f"trainer.group_size={GENERATIONS}",
        f"trainer.max_steps={steps}",
        "trainer.micro_batch_size=8",
        "trainer.eval_splits=[]",
        "trainer.check_references=false",
        "trainer.threads=1",
        "trainer.progress=false",
        f"sampler.max_new_tokens={MAX_NEW}",
        f"optim.lr={lr}",
        "optim.warmup_steps=0",
        f"algorithm.kl_coef={beta}",
        "execution.workers=1",
        "logger.wandb_mode=disabled",
        *extra,
        *os.environ.get("BENCH_OURS_OVERRIDES", "").split(),  # e.g. kernels=torch, to try options
    ]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        rc = resolve_config(
            OmegaConf.to_container(compose(config_name="train", overrides=overrides), resolve=True)
        )
    import tempfile

    trainer = Trainer(rc, tempfile.mkdtemp(prefix="bench-ours-"))
    trainer.train_tasks = tasks()  # the same 16 prompts as TRL's dataset
    rows = []
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            m = trainer.train_step(step)
            rows.append(
                {
                    "step_s": time.perf_counter() - t0,
                    "reward": m["reward/mean"],
                    "loss": m.get("actor/pg_loss", 0.0) + beta * m.get("actor/kl_loss", 0.0),
                    **{k: v for k, v in m.items() if k.startswith("timing/")},
                }
            )
    finally:
        trainer.close()
    return {"rows": rows}


def run_trl(model: str, steps: int, lr: float, beta: float, bf16: bool = False) -> dict:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from coderlplus.registry import REWARDS

    torch.set_num_threads(1)
    import coderlplus

    coderlplus.load_plugins()
    outcome = REWARDS.get("outcome")(REWARDS.config_class("outcome")())
    from coderlplus.execution import Sandbox

    outcome.sandbox = Sandbox(workers=1)

    def outcome_reward(completions, tests, **_):  # the same reward, as a TRL reward function
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [s.reward for s in outcome.score(texts, [{"tests": t} for t in tests])]

    ts = tasks()
    data = Dataset.from_list([{"prompt": t.prompt, "tests": t.payload["tests"]} for t in ts])
    rows: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            rows.append({"step_s": time.perf_counter() - self.t0})

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and rows and "reward" in logs:
                rows[-1]["reward"] = logs["reward"]
                rows[-1]["loss"] = logs.get("loss", float("nan"))

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        per_device_train_batch_size=PROMPTS_PER_STEP * GENERATIONS,
        num_generations=GENERATIONS,
        max_completion_length=MAX_NEW,
        learning_rate=lr,
        lr_scheduler_type="constant",
        beta=beta,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        temperature=1.0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        bf16=bf16,  # TRL's default is bf16 autocast (where the CPU has it); ours computes in fp32
    )
    trainer = GRPOTrainer(model=model, reward_funcs=outcome_reward, args=args, train_dataset=data)
    trainer.add_callback(Clock())
    try:
        trainer.train()
    finally:
        outcome.sandbox.close()
    return {"rows": rows}


def run_trl_bf16(model: str, steps: int, lr: float, beta: float) -> dict:
    return run_trl(model, steps, lr, beta, bf16=True)


def run_ours_before(model: str, steps: int, lr: float, beta: float) -> dict:
    return run_ours(model, steps, lr, beta, extra=BEFORE_FIXES)


def run_ours_onednn(model: str, steps: int, lr: float, beta: float) -> dict:
    return run_ours(model, steps, lr, beta, extra=("sampler.native_decode=false",))


def run_ours_bf16(model: str, steps: int, lr: float, beta: float) -> dict:
    return run_ours(model, steps, lr, beta, extra=("trainer.mixed_precision=bf16",))


WORKERS = {
    "ours": run_ours,
    "ours-onednn": run_ours_onednn,
    "ours-before": run_ours_before,
    "ours-bf16": run_ours_bf16,
    "trl": run_trl,
    "trl-bf16": run_trl_bf16,
}
# trl-bf16: TRL's default precision (bf16 autocast), compared with ours-bf16 (the same);
# ours-onednn: ours decoding with oneDNN's prepacked products instead of the native kernels (fix 8);
# ours-before: ours without the fixes
TRAINERS = ("trl", "ours", "ours-onednn", "ours-before", "trl-bf16", "ours-bf16")
SAME_PRECISION = {"ours": "trl", "ours-onednn": "trl", "ours-before": "trl", "ours-bf16": "trl-bf16"}


def worker_main(args) -> int:
    out = WORKERS[args.worker](args.model, args.steps, args.lr, args.beta)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).write_text(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------- driver


def machine() -> str:
    cpu = "unknown"
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    import torch
    import trl

    return (
        f"{cpu}, {os.cpu_count()} vCPUs, Linux {platform.release()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, trl {trl.__version__}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2, help="runs per trainer and model (alternating)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument(
        "--beta", type=float, default=0.04, help="KL coefficient (both trainers keep a reference)"
    )
    ap.add_argument("--models", default="tiny,25m")
    ap.add_argument(
        "--trainers",
        default=",".join(TRAINERS),
        help="which of them to run (trl must be one: the ratios are to it); e.g. trl,ours,ours-before "
        "on a CPU without bf16 instructions, where bf16 autocast is emulated and slow for both",
    )
    ap.add_argument("--quick", action="store_true", help="3 steps, 1 repeat, tiny model; writes no files")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.quick:
        args.steps, args.repeats, args.models = 3, 1, "tiny"
    args.trainers = tuple(t for t in TRAINERS if t in args.trainers.split(","))
    if "trl" not in args.trainers:
        ap.error(f"--trainers: give trl and any of {', '.join(TRAINERS[1:])}")

    from coderlplus.models.tiny import TinyModelConfig, ensure_tiny_model

    tiny = str(ensure_tiny_model(TinyModelConfig()))
    folders = {"tiny": tiny, "25m": make_25m_model(tiny, HERE / ".models" / "qwen2-25m")}
    results = []  # (model, trainer, repeat, out)
    for name in args.models.split(","):
        for rep in range(args.repeats):
            for trainer in args.trainers if rep % 2 == 0 else args.trainers[::-1]:
                out = HERE / f".run-{name}-{trainer}-{rep}.json"
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    trainer,
                    "--model",
                    folders[name],
                    "--out",
                    str(out),
                ]
                cmd += ["--steps", str(args.steps), "--lr", str(args.lr), "--beta", str(args.beta)]
                t0 = time.time()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                    return 1
                print(f"{name} {trainer} repeat {rep}: {time.time() - t0:.0f} s", flush=True)
                results.append((name, trainer, rep, json.loads(out.read_text())))
                out.unlink()
    table = report(results, args)
    print(table)
    if not args.quick:
        write_outputs(results, table)
    return 0


def report(results, args) -> str:
    lines = [
        "| model | trainer | median s/step | steps timed | peak RSS MB | time / TRL fp32 | time / TRL, same precision |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    med = {}
    for name in args.models.split(","):
        for trainer in args.trainers:
            runs = [r for m, t, _, r in results if m == name and t == trainer]
            times = [row["step_s"] for r in runs for row in r["rows"][1:]]
            med[name, trainer] = statistics.median(times)
            rss = max(r["peak_rss_mb"] for r in runs)
            ratio = f"{med[name, trainer] / med[name, 'trl']:.2f}" if trainer != "trl" else ""
            base = SAME_PRECISION.get(trainer)
            same = f"{med[name, trainer] / med[name, base]:.2f}" if base in args.trainers else ""
            lines.append(
                f"| {name} | {trainer} | {med[name, trainer]:.3f} | {len(times)} | {rss:.0f} | {ratio} | {same} |"
            )
    lines += ["", "Our step by phase (median seconds of the trainer's own `timing/*`):", ""]
    phases = ("sample_s", "logprob_s", "reward_s", "reward_wait_s", "update_s", "step_s")
    lines += ["| model | trainer | " + " | ".join(phases) + " |", "|---|---|" + "---:|" * len(phases)]
    for name in args.models.split(","):
        for trainer in [t for t in TRAINERS if t.startswith("ours") and t in args.trainers]:
            rows = [row for m, t, _, r in results if m == name and t == trainer for row in r["rows"][1:]]
            cells = [statistics.median(row.get(f"timing/{k}", 0.0) for row in rows) for k in phases]
            lines.append(f"| {name} | {trainer} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def write_outputs(results, table: str) -> None:
    with open(HERE / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "trainer", "repeat", "step", "step_s", "reward", "loss"])
        for name, trainer, rep, r in results:
            for i, row in enumerate(r["rows"], 1):
                w.writerow([name, trainer, rep, i, row["step_s"], row.get("reward"), row.get("loss")])
    (HERE / "results.md").write_text(f"# bench_vs_trl results\n\n{machine()}\n\n{table}\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = sorted({m for m, *_ in results})
    fig, axes = plt.subplots(len(models), 2, figsize=(10, 3.2 * len(models)), squeeze=False)
    for i, name in enumerate(models):
        for name_, trainer, rep, r in results:
            if name_ != name:
                continue
            steps = range(1, len(r["rows"]) + 1)
            style = {
                "ours": "-",
                "ours-onednn": "-",
                "ours-before": "-.",
                "ours-bf16": "-",
                "trl": "--",
                "trl-bf16": ":",
            }[trainer]
            for j, key in enumerate(("reward", "loss")):
                axes[i][j].plot(steps, [row.get(key) for row in r["rows"]], style, label=f"{trainer} #{rep}")
                axes[i][j].set_title(f"{name}: {key}")
        axes[i][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "curves.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
