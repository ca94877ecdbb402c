"""The lean log-prob forward (``kernels.lean_forward``) against the ``transformers`` forward with a
shared prefix, side by side in one process: milliseconds per no-grad pass and per forward +
backward, fp32 and bf16 autocast, on a random Qwen2 model (no download).

    OMP_NUM_THREADS=1 python experiments/bench_lean_forward/run.py               # CPU, the 25M shape
    OMP_NUM_THREADS=1 python experiments/bench_lean_forward/run.py --model DIR   # a model folder
    python experiments/bench_lean_forward/run.py --device cuda --size 0.5b       # a GPU, Qwen2.5-0.5B's shape

Prints a markdown table (median of --repeats, alternating the two paths) with the machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

SIZES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "25m": (512, 8, 8, 4, 1536, 1024),
    "0.5b": (896, 24, 14, 2, 4864, 151936),
}


def build(size: str, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    h, n, heads, kv, inter, vocab = SIZES[size]
    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=kv,
        intermediate_size=inter, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=True,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg).to(device).train()


def batch(vocab, prompts, n, P, T, device):
    """``prompts`` groups of ``n`` rows sharing a left-padded prompt (lengths P/2..P), responses of
    T/2..T tokens, right-padded."""
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(prompts * n, P + T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for u in range(prompts):
        plen = int(torch.randint(P // 2, P + 1, (1,), generator=g))
        prompt = torch.randint(3, vocab, (plen,), generator=g)
        for j in range(n):
            r, rlen = u * n + j, int(torch.randint(T // 2, T + 1, (1,), generator=g))
            ids[r, P - plen : P], mask[r, P - plen : P + rlen] = prompt, 1
            ids[r, P : P + rlen] = torch.randint(3, vocab, (rlen,), generator=g)
    return ids.to(device), mask.to(device)


def main(argv=None) -> int:
    from coderlplus.kernels import KernelsConfig, sequence_logprobs

    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", choices=sorted(SIZES), default="25m")
    ap.add_argument("--model", help="a model folder instead of --size (e.g. the embedded tiny model)")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=55)
    ap.add_argument("--response-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cpu":
        torch.set_num_threads(1)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if args.model:
        from coderlplus.models.hf import load_causal_lm

        model = load_causal_lm(args.model)[0].to(dev).train()
    else:
        model = build(args.size, args.device)
    ids, mask = batch(model.config.vocab_size, args.prompts, args.n, args.prompt_len, args.response_len, dev)
    T = args.response_len
    rows = []
    for amp in (False, True):
        times = {True: [], False: []}
        for rep in range(args.repeats + 2):
            for lean in (True, False):
                kc = KernelsConfig(lean_forward=lean)
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    sync()
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        sequence_logprobs(model, ids, mask, T, kernels=kc)
                    sync()
                    t1 = time.perf_counter()
                    logp, _ = sequence_logprobs(model, ids, mask, T, kernels=kc)
                logp.sum().backward()
                sync()
                t2 = time.perf_counter()
                model.zero_grad(set_to_none=True)
                if rep >= 2:  # warm-up left out
                    times[lean].append((t1 - t0, t2 - t1))
        med = {k: [statistics.median(x[i] for x in v) * 1e3 for i in range(2)] for k, v in times.items()}
        for i, what in enumerate(("no-grad pass", "forward + backward")):
            hf, lean = med[False][i], med[True][i]
            rows.append(
                f"| {'bf16 autocast' if amp else 'fp32'} | {what} | {hf:.1f} | {lean:.1f} | {lean / hf:.2f} |"
            )
    name = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu"
    print(
        f"{args.model or args.size + ' Qwen2 (random weights)'}, {args.prompts} prompts x {args.n} samples, prompt <= "
        f"{args.prompt_len}, response <= {T} tokens; {name}, torch {torch.__version__}; median of {args.repeats}\n"
    )
    print("| precision | pass | transformers ms | lean ms | lean / transformers |\n|---|---|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
