"""``coderlplus-eval``: greedy pass@1 (and, with ``n_samples``, sampled pass@k) of any model on
code-generation splits: TinyCode, HumanEval (``data=humaneval``), any JSONL dataset.

Writes ``results.json`` and ``results.md`` in the Hydra run directory, plus every
completion in ``<split>.jsonl``, and logs the numbers to W&B (the ``logger`` group). Examples::

    coderlplus-eval                                    # the embedded tiny model on TinyCode test
    coderlplus-eval model=hf model.path=outputs/<run>/checkpoints/step_000030/model splits=[validation,test]
    coderlplus-eval model=hf model.path=<checkpoint>/model data=humaneval n_samples=10 'k=[1,5,10]'
    coderlplus-eval 'reasoning=[code,test_output,humaneval_asserts]'   # the paper's other two families
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from coderlplus.config import STATIC_SCHEMAS, conf_dir, register_hydra_configs, resolve_plugin
from coderlplus.models.hf import quiet_hf_progress_bars
from coderlplus.plugins import load_plugins
from coderlplus.registry import MODELS, SAMPLERS, TASK_SOURCES, ConfigError, UnknownPluginError, build_config

load_plugins()
register_hydra_configs()


def run_eval(cfg: dict, run_dir: Path) -> dict[str, float]:
    import torch

    from coderlplus.evaluation import greedy_pass_at_1, sampled_pass_at_k
    from coderlplus.execution import Sandbox
    from coderlplus.logger import RunLogger
    from coderlplus.sampler.base import SamplingParams
    from coderlplus.tasks.reasoning import reasoning_accuracy

    (model_name, model_cfg), (sampler_name, sampler_cfg), (data_name, data_cfg) = (
        resolve_plugin(group, cfg[group]) for group in ("model", "sampler", "data")
    )
    model_cls, sampler_cls, source_cls = (
        MODELS.get(model_name),
        SAMPLERS.get(sampler_name),
        TASK_SOURCES.get(data_name),
    )
    ex = build_config(STATIC_SCHEMAS["execution"], cfg["execution"], where="execution")
    torch.manual_seed(int(cfg.get("seed", 0)))
    model, tokenizer = model_cls(model_cfg).load()
    sampler = sampler_cls(sampler_cfg, model, tokenizer, seed=int(cfg.get("seed", 0)))
    source = source_cls(data_cfg)
    results: dict[str, float] = {}
    run_dir.mkdir(parents=True, exist_ok=True)
    with Sandbox(**dataclasses.asdict(ex)) as sandbox, contextlib.closing(sampler):
        for split in cfg["splits"]:
            tasks = source.load(split)[: cfg.get("max_tasks")]
            res = greedy_pass_at_1(sampler, tasks, sandbox, sampler_cfg.max_new_tokens)
            results[f"{split}/pass@1"] = res.pass_at_1
            results[f"{split}/n"] = len(tasks)
            rows = [(r, ok, "greedy") for r, ok in zip(res.rollouts, res.passed)]
            n = int(cfg.get("n_samples") or 0)
            if n:  # n samples per task at the sampling temperature: unbiased pass@k
                params = SamplingParams(float(cfg.get("temperature", 0.8)), 1.0, sampler_cfg.max_new_tokens)
                sampled = sampled_pass_at_k(sampler, tasks, sandbox, n, list(cfg.get("k", [1])), params)
                results |= {f"{split}/pass@{k}_sampled": v for k, v in sampled.pass_at.items()}
                rows += [(r, ok, "sampled") for r, ok in zip(sampled.rollouts, sampled.passed)]
            with (run_dir / f"{split}.jsonl").open("w") as f:
                for r, ok, how in rows:
                    f.write(
                        json.dumps({"id": r.task.id, "how": how, "passed": ok, "completion": r.completion})
                        + "\n"
                    )
        for name in cfg.get("reasoning") or []:  # code reasoning / test-output prediction, greedy
            tasks = reasoning_tasks(name, cfg, source)
            rollouts = sampler.generate(tasks, 1, SamplingParams(0.0, 1.0, sampler_cfg.max_new_tokens))
            acc, ok = reasoning_accuracy(rollouts)
            results[f"reasoning/{name}/accuracy"] = acc
            results[f"reasoning/{name}/n"] = len(tasks)
            with (run_dir / f"reasoning_{name}.jsonl").open("w") as f:
                for r, good in zip(rollouts, ok):
                    f.write(json.dumps({"id": r.task.id, "correct": good, "completion": r.completion}) + "\n")
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    sampled_keys = sorted({k.split("/", 1)[1] for k in results if k.endswith("_sampled")})
    lines = [
        "| split | n | greedy pass@1 |" + "".join(f" {k.removesuffix('_sampled')} |" for k in sampled_keys)
    ]
    lines.append("|---|---|---|" + "---|" * len(sampled_keys))
    for sp in cfg["splits"]:
        extra = "".join(f" {results[f'{sp}/{k}']:.3f} |" for k in sampled_keys)
        lines.append(f"| {sp} | {results[f'{sp}/n']} | {results[f'{sp}/pass@1']:.3f} |{extra}")
    reasoning = [k.split("/")[1] for k in results if k.startswith("reasoning/") and k.endswith("/accuracy")]
    if reasoning:
        lines += ["", "| reasoning task | n | accuracy |", "|---|---|---|"]
        lines += [
            f"| {r} | {results[f'reasoning/{r}/n']} | {results[f'reasoning/{r}/accuracy']:.3f} |"
            for r in reasoning
        ]
    (run_dir / "results.md").write_text("\n".join(lines) + "\n")
    # W&B (offline without a key, like training runs): the numbers as the run's summary.
    logger = RunLogger(
        build_config(STATIC_SCHEMAS["logger"], cfg.get("logger") or {}, where="logger"), run_dir, cfg
    )
    logger.log(results, step=0)
    logger.summary(results)
    logger.close()
    return results


REASONING = ("code", "test_output", "cruxeval", "humaneval_asserts")


def reasoning_tasks(name: str, cfg: dict, source) -> list:
    """The tasks of one reasoning evaluation (see ``coderlplus.tasks.reasoning``)."""
    from coderlplus.tasks import reasoning
    from coderlplus.tasks.humaneval import HumanEvalSource

    limit = cfg.get("max_tasks")
    split = cfg["splits"][-1]
    if name == "code":  # the data source's reference programs
        return reasoning.tinycode_output_tasks(source.load(split))[:limit]
    if name == "test_output":
        return reasoning.output_prediction_tasks(source.load(split))[:limit]
    if name == "cruxeval":
        path = cfg.get("cruxeval_path")
        if not path or not Path(path).exists():
            raise ConfigError(f"reasoning=[cruxeval] needs cruxeval_path=<cruxeval.jsonl> (got {path!r})")
        return reasoning.cruxeval_tasks(path, limit)
    if name == "humaneval_asserts":
        return reasoning.humaneval_assert_tasks(HumanEvalSource().problems())[:limit]
    raise ConfigError(f"unknown reasoning evaluation {name!r}; choose from {list(REASONING)}")


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="eval")
def main(cfg: DictConfig) -> None:
    quiet_hf_progress_bars()
    plain = OmegaConf.to_container(cfg, resolve=True)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run_eval(plain, run_dir)
    except (ConfigError, UnknownPluginError) as e:
        print(f"coderlplus-eval: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    print((run_dir / "results.md").read_text() + f"results: {run_dir}")


if __name__ == "__main__":
    main()
