"""Sampler throughput side by side: ``hf`` (transformers generate) vs ``vllm`` (one engine),
same prompts, group size, length limit and temperature, plus the time of a vLLM weight push.

Models: the embedded tiny model (fp32) and a ~25M-parameter Qwen2 (random weights, the tiny
tokenizer) in a chosen dtype. Each sampler generates ``--rounds`` batches of ``--prompts``
TinyCode prompts x ``--n`` samples, rounds alternating between samplers; tokens/s is generated
response tokens over wall time (median round). The vLLM engine's start-up is reported apart.

    python experiments/bench_sampler/run.py                       # CPU, both models
    python experiments/bench_sampler/run.py --models embedded     # one model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _25m_model(tokenizer_dir: str, dtype: str, out: str) -> str:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def bench_model(name, path, dtype, args):
    import torch

    from coderlplus.models.hf import load_causal_lm
    from coderlplus.sampler.base import SamplingParams
    from coderlplus.sampler.hf import HFSampler, HFSamplerConfig
    from coderlplus.sampler.vllm import VLLMSampler, VLLMSamplerConfig
    from coderlplus.tasks.tinycode import TinyCodeConfig, TinyCodeSource

    model, tok = load_causal_lm(path, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    tasks = TinyCodeSource(TinyCodeConfig()).load("train")[: args.prompts]
    params = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens)
    hf = HFSampler(HFSamplerConfig(max_batch_rollouts=args.prompts * args.n), model, tok)
    t0 = time.perf_counter()
    vl = VLLMSampler(VLLMSamplerConfig(enforce_eager=args.enforce_eager), model, tok, seed=0)
    start_s = time.perf_counter() - t0
    samplers = {"hf": hf, "vllm": vl}
    rates = {k: [] for k in samplers}
    for _ in range(args.rounds):
        for k, s in samplers.items():  # alternate
            t0 = time.perf_counter()
            rollouts = s.generate(tasks, args.n, params)
            dt = time.perf_counter() - t0
            rates[k].append(sum(len(r.response_ids) for r in rollouts) / dt)
    pushes = []
    for _ in range(args.rounds):  # an optimiser step's worth of change, then a push of everything
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        vl.update_weights()
        pushes.append(vl.stats["push_s"])
    vl.close()
    return {
        "model": name, "params_m": n_params / 1e6, "dtype": dtype,
        "hf_tok_s": statistics.median(rates["hf"]), "vllm_tok_s": statistics.median(rates["vllm"]),
        "vllm_vs_hf": statistics.median(rates["vllm"]) / statistics.median(rates["hf"]),
        "vllm_start_s": start_s, "push_s": statistics.median(pushes), "push_mb": vl.stats["pushed_mb"],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="embedded,25m")
    ap.add_argument("--dtype-25m", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args()
    import torch

    from coderlplus.models.tiny import TinyModelConfig, ensure_tiny_model

    torch.set_num_threads(os.cpu_count() or 1)
    embedded = str(ensure_tiny_model(TinyModelConfig()))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "embedded":
                results.append(bench_model(name, embedded, "float32", args))
            else:
                path = _25m_model(embedded, args.dtype_25m, tmp)
                results.append(bench_model("qwen2-25m-random", path, args.dtype_25m, args))
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU {platform.machine()} x{os.cpu_count()}"
    )
    print(f"# {device}; {args.prompts} prompts x n={args.n}, <= {args.max_new_tokens} new tokens, T=1.0")
    print("| model | params | dtype | hf tok/s | vllm tok/s | vllm / hf | vLLM start s | push s (MB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['model']} | {r['params_m']:.1f}M | {r['dtype']} | {r['hf_tok_s']:.0f} | {r['vllm_tok_s']:.0f} | "
              f"{r['vllm_vs_hf']:.2f}x | {r['vllm_start_s']:.0f} | {r['push_s']:.3f} ({r['push_mb']:.0f}) |")  # fmt: skip
    out = Path(os.environ.get("OUT", HERE)) / "results.json"
    out.write_text(json.dumps({"device": device, "args": vars(args), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
