"""Log-prob kernels side by side: time and peak memory of forward + backward.

Computes per-token log-probs (and the entropy, detached, as the trainer logs it) of N tokens
from the last hidden states ``[N, H]`` and an LM head ``[V, H]``, then backpropagates
``sum(g * logp)`` to the hidden states and the weight. Paths:

- ``torch``: the naive reference (``hidden @ W.T`` -> fp32 log-softmax, gather, entropy);
- ``chunked``: ``coderlplus.kernels`` fused linear path in plain torch;
- ``triton``: the same with Triton row kernels (CUDA only).

CPU: every sample runs in a fresh child process (so its peak RSS is its own), paths alternate,
median of ``--reps``. CUDA: in process, CUDA events, ``torch.cuda.max_memory_allocated``.
Reports ratios to the torch path and writes ``results-<device>.csv`` next to this file.

    python experiments/bench_kernels/run.py --device cpu                       # Qwen2.5-0.5B sizes
    python experiments/bench_kernels/run.py --device cuda --dtype bfloat16 --paths torch,chunked,triton
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _inputs(args, device):
    import torch

    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    hidden = (torch.randn(args.n, args.h, generator=g, device=device) * 1.0).to(dtype).requires_grad_(True)
    weight = (torch.randn(args.v, args.h, generator=g, device=device) * args.h**-0.5).to(dtype)
    weight.requires_grad_(True)
    tokens = torch.randint(0, args.v, (args.n,), generator=g, device=device)
    grad = torch.randn(args.n, generator=g, device=device)
    return hidden, weight, tokens, grad


def _step(path, hidden, weight, tokens, grad, chunk):
    from coderlplus.kernels import logprobs_from_hidden

    logp, entropy = logprobs_from_hidden(hidden, weight, tokens, path, with_entropy=True, chunk=chunk)
    entropy = entropy.detach()  # logged, not trained (the trainer's default)
    (logp * grad).sum().backward()
    return logp.detach(), hidden.grad, weight.grad


def child(args) -> None:
    """One CPU sample: allocate inputs, fwd+bwd once, print time and peak RSS above the inputs."""
    import torch

    torch.set_num_threads(args.threads)
    hidden, weight, tokens, grad = _inputs(args, "cpu")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    _step(args.child, hidden, weight, tokens, grad, args.chunk)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base  # KiB on Linux
    print(json.dumps({"s": dt, "peak_mb": peak / 1024}))


def bench_cpu(args, paths):
    samples = {p: [] for p in paths}
    for _ in range(args.reps):
        for p in paths:  # alternate paths so drift hits all alike
            cmd = [sys.executable, __file__, "--child", p, *sys.argv[1:]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            samples[p].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {
        p: {
            "s": statistics.median(x["s"] for x in v),
            "peak_mb": max(x["peak_mb"] for x in v),
            "n": len(v),
        }
        for p, v in samples.items()
    }


def bench_cuda(args, paths):
    import torch

    res = {}
    hidden, weight, tokens, grad = _inputs(args, "cuda")
    ref = None
    for p in paths:
        times = []
        for i in range(args.warmup + args.reps):
            hidden.grad = weight.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = _step(p, hidden, weight, tokens, grad, args.chunk)
            end.record()
            torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(start.elapsed_time(end) / 1000)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        if ref is None:
            ref = [t.float() for t in out]
        err = [float((a.float() - b).norm() / b.norm()) for a, b in zip(out, ref)]
        res[p] = {"s": statistics.median(times), "peak_mb": peak, "n": len(times), "rel_err_vs_first": err}
        del out
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--h", type=int, default=896)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--paths", default="torch,chunked")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    paths = args.paths.split(",")
    res = (bench_cpu if args.device == "cpu" else bench_cuda)(args, paths)
    base = res[paths[0]]
    machine = platform.processor() or platform.machine()
    if args.device == "cuda":
        import torch

        machine = torch.cuda.get_device_name()
    print(f"# {args.device} ({machine}), {args.dtype}, N={args.n} H={args.h} V={args.v} chunk={args.chunk}")
    print("| path | median s | time vs torch | peak MB | memory vs torch |")
    print("| --- | --- | --- | --- | --- |")
    rows = []
    for p in paths:
        r = res[p]
        t_ratio, m_ratio = r["s"] / base["s"], r["peak_mb"] / base["peak_mb"]
        print(f"| {p} | {r['s']:.3f} | {t_ratio:.2f}x | {r['peak_mb']:.0f} | {m_ratio:.1%} |")
        rows.append({"path": p, **{k: v for k, v in r.items() if k != "rel_err_vs_first"}, "time_ratio": t_ratio,
                     "mem_ratio": m_ratio, "rel_err": r.get("rel_err_vs_first", "")})  # fmt: skip
    out = Path(os.environ.get("OUT", HERE)) / f"results-{args.device}-{args.dtype}-chunk{args.chunk}.csv"
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
