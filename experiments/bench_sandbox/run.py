"""Sandbox throughput: our warm server pool (bwrap / rlimit) vs a fresh interpreter per program.

Measures, in one run and side by side:

(a) executions/second of ``run_many`` on a trivial program (``print(sum(range(100)))``);
(b) test executions/second checking TinyCode reference solutions against their tests
    (every one must pass): ``check_many`` for the pools (by default a program's stdin
    tests share one child, ``pool-bwrap-per-test`` forks one per test), one fresh
    interpreter per (program, test) for the baseline;
(c) the overhead of ``trace_many`` over ``run_many`` on the TinyCode runs of (b).

Executors:

* ``pool-bwrap``: ``Sandbox(isolation="bwrap", require_isolation=True)`` (the default);
* ``pool-bwrap-pyloop``: ``pool-bwrap`` with ``native=False`` (the servers' Python fork loop
  instead of ``forkrun.c``: the A/B of that change);
* ``pool-rlimit``: ``Sandbox(isolation="rlimit")``;
* ``baseline``: the approach of the official CodeRL+ code: every program is written to a
  file and run by a fresh ``subprocess.run([sys.executable, file], input=stdin,
  capture_output=True, timeout=...)``, with as many parallel workers (threads) as the pools.

Every executor is started and warmed up before timing; the order of the executors rotates
from one repeat to the next, and the tables report the median over the repeats.

    .venv/bin/python experiments/bench_sandbox/run.py            # ~1.5-2 min on 2 cores
    .venv/bin/python experiments/bench_sandbox/run.py --quick    # smoke test, a few seconds
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before anything imports a numeric library

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from coderlplus.execution import ExecResult, Sandbox, judge, program_for_test
from coderlplus.execution.isolation import bwrap_version, find_bwrap
from coderlplus.tasks.tinycode import generate_split

HERE = Path(__file__).resolve().parent
TRIVIAL = "print(sum(range(100)))"
TRIVIAL_OUT = "4950"
EXECUTORS = ("baseline", "pool-bwrap", "pool-bwrap-pyloop", "pool-bwrap-per-test", "pool-rlimit")
WORKLOAD_EXECUTORS = {  # a per-test pool runs trivial programs exactly as pool-bwrap does
    "trivial": ("baseline", "pool-bwrap", "pool-bwrap-pyloop", "pool-rlimit"),
    "tinycode": EXECUTORS,
}

Item = tuple[str, str]  # (program, stdin)


# ----------------------------------------------------------------------------- executors


class Baseline:
    """One fresh ``sys.executable`` process per program, ``workers`` at a time."""

    name = "baseline"

    def __init__(self, workers: int, timeout_s: float):
        self.timeout_s = timeout_s
        self.dir = tempfile.TemporaryDirectory(prefix="bench-sandbox-baseline-")
        self.threads = ThreadPoolExecutor(max_workers=workers)

    def _run_one(self, index: int, code: str, stdin: str) -> ExecResult:
        path = os.path.join(self.dir.name, f"prog_{index}.py")
        with open(path, "w") as f:
            f.write(code)
        t0 = time.perf_counter()
        try:
            p = subprocess.run(
                [sys.executable, path],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                cwd=self.dir.name,
            )
            status = "ok" if p.returncode == 0 else "error"
            result = ExecResult(status, p.stdout, p.stderr, time.perf_counter() - t0, p.returncode)
        except subprocess.TimeoutExpired:
            result = ExecResult("timeout", "", "", time.perf_counter() - t0, None)
        finally:
            os.remove(path)
        return result

    def run_many(self, items: Sequence[Item]) -> list[ExecResult]:
        return list(self.threads.map(self._run_one, range(len(items)), *zip(*items)))

    def check_many(self, checks: Sequence[tuple[str, list[dict]]]) -> list[list[str]]:
        """Statuses of every test of every program: one fresh interpreter per (program, test)."""
        items, _ = tinycode_jobs(checks)
        results = iter(self.run_many(items))
        return [[judge(test, next(results)) for test in tests] for _, tests in checks]

    def close(self) -> None:
        self.threads.shutdown()
        self.dir.cleanup()


class Pool:
    """Our :class:`Sandbox`, with one isolation mode."""

    def __init__(
        self, isolation: str, workers: int, timeout_s: float, batch_tests: bool = True, native: bool = True
    ):
        self.name = f"pool-{isolation}" + ("" if batch_tests else "-per-test") + ("" if native else "-pyloop")
        t0 = time.perf_counter()
        self.sandbox = Sandbox(
            timeout_s=timeout_s,
            memory_mb=512,
            workers=workers,
            isolation=isolation,
            require_isolation=True,
            batch_tests=batch_tests,
            native=native,
        )
        if native and not self.sandbox.native:
            print(f"note: {self.name} runs the Python fork loop (forkrun.c could not be built)")
        self.startup_s = time.perf_counter() - t0

    def run_many(self, items: Sequence[Item]) -> list[ExecResult]:
        return self.sandbox.run_many(items)

    def check_many(self, checks: Sequence[tuple[str, list[dict]]]) -> list[list[str]]:
        return [c.statuses for c in self.sandbox.check_many(checks)]

    def close(self) -> None:
        self.sandbox.close()


# ----------------------------------------------------------------------------- workloads


def tinycode_checks(n_tasks: int) -> list[tuple[str, list[dict]]]:
    """(reference solution, its tests) of ``n_tasks`` TinyCode train problems."""
    return [(row["solution"], row["tests"]) for row in generate_split("train", n_tasks, seed=0)]


def tinycode_jobs(checks: Sequence[tuple[str, list[dict]]]) -> tuple[list[Item], list[dict]]:
    """(program, stdin) of every (program, test) pair, and the tests."""
    pairs = [(code, test) for code, tests in checks for test in tests]
    return [program_for_test(code, test) for code, test in pairs], [test for _, test in pairs]


def n_failed(results: Sequence[ExecResult], tests: Sequence[dict]) -> int:
    return sum(judge(test, r) != "pass" for test, r in zip(tests, results))


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ----------------------------------------------------------------------------- reporting


def machine_facts() -> dict[str, str]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    bwrap = find_bwrap()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=HERE,
            timeout=10,
        ).stdout.strip()
        commit = (commit + (" (+ uncommitted changes)" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "CPU": cpu,
        "cores (usable / online)": f"{usable} / {os.cpu_count()}",
        "Python": f"{platform.python_version()} ({sys.executable})",
        "kernel": f"{platform.system()} {platform.release()}",
        "bwrap": f"{bwrap} {'.'.join(map(str, bwrap_version(bwrap)))}" if bwrap else "not found",
        "commit": commit,
    }


def fmt_seconds(times: list[float]) -> str:
    med = statistics.median(times)
    return f"{med:.2f}" if len(times) == 1 else f"{med:.2f} ({min(times):.2f}–{max(times):.2f})"


def throughput_table(times: dict[tuple[str, str], list[float]], sizes: dict[str, int]) -> str:
    """exec/s and speed-up from the medians; "best runs" compares the fastest repeat of each
    executor (less sensitive to other load on a shared machine)."""
    rows = [
        "| executor | workload | programs | seconds (median; min–max) | exec/s "
        "| speed-up vs baseline | speed-up, best runs |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for workload, n in sizes.items():
        base = times["baseline", workload]
        for name in WORKLOAD_EXECUTORS[workload]:
            ts = times[name, workload]
            med = statistics.median(ts)
            rows.append(
                f"| {name} | {workload} | {n} | {fmt_seconds(ts)} | {n / med:,.0f} "
                f"| {statistics.median(base) / med:.1f}× | {min(base) / min(ts):.1f}× |"
            )
    return "\n".join(rows)


def trace_table(trace_times: dict[tuple[str, str], list[float]], n: int) -> str:
    rows = [
        "| executor | programs | run_many s | trace_many s | trace / run |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("pool-bwrap", "pool-rlimit"):
        run_s = statistics.median(trace_times[name, "run"])
        trace_s = statistics.median(trace_times[name, "trace"])
        rows.append(f"| {name} | {n} | {run_s:.2f} | {trace_s:.2f} | {trace_s / run_s:.2f}× |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-trivial", type=int, default=1000, help="trivial programs per repeat")
    ap.add_argument("--n-tasks", type=int, default=100, help="TinyCode problems (4 tests each)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None, help="parallel workers (default: usable CPUs)")
    ap.add_argument("--timeout", type=float, default=2.0, help="per-program wall-clock limit, seconds")
    ap.add_argument("--out", default=None, help=f"results file (default {HERE / 'results.md'}; '' for none)")
    ap.add_argument("--quick", action="store_true", help="small numbers for a smoke test; writes no file")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_trivial, args.n_tasks, args.repeats = 60, 10, 1
    if args.out is None:
        args.out = "" if args.quick else str(HERE / "results.md")
    workers = args.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)

    trivial = [(TRIVIAL, "")] * args.n_trivial
    checks = tinycode_checks(args.n_tasks)
    tasks, tests = tinycode_jobs(checks)
    print(
        f"{args.n_trivial} trivial programs, {len(tasks)} TinyCode (program, test) pairs "
        f"({args.n_tasks} problems), {workers} workers, {args.repeats} repeat(s)",
        flush=True,
    )

    executors = {
        "baseline": Baseline(workers, args.timeout),
        "pool-bwrap": Pool("bwrap", workers, args.timeout),
        "pool-bwrap-pyloop": Pool("bwrap", workers, args.timeout, native=False),
        "pool-bwrap-per-test": Pool("bwrap", workers, args.timeout, batch_tests=False),
        "pool-rlimit": Pool("rlimit", workers, args.timeout),
    }
    failures: list[str] = []
    try:
        warm = trivial[: 4 * workers] + tasks[: 4 * workers]
        for ex in executors.values():
            ex.run_many(warm)
            ex.check_many(checks[: 4 * workers])
            if isinstance(ex, Pool):
                ex.sandbox.trace_many(warm)

        times: dict[tuple[str, str], list[float]] = {}
        trace_times: dict[tuple[str, str], list[float]] = {}
        for rep in range(args.repeats):
            order = EXECUTORS[rep % len(EXECUTORS) :] + EXECUTORS[: rep % len(EXECUTORS)]
            for name in order:
                ex = executors[name]
                if name in WORKLOAD_EXECUTORS["trivial"]:
                    dt, results = timed(lambda ex=ex: ex.run_many(trivial))
                    times.setdefault((name, "trivial"), []).append(dt)
                    bad = sum(r.status != "ok" or r.stdout.strip() != TRIVIAL_OUT for r in results)
                    if bad:
                        failures.append(f"{name}: {bad} trivial programs failed, e.g. {results[0]!r:.300}")

                dt, statuses = timed(lambda ex=ex: ex.check_many(checks))
                times.setdefault((name, "tinycode"), []).append(dt)
                if n_fail := sum(s != "pass" for row in statuses for s in row):
                    failures.append(f"{name}: {n_fail}/{len(tasks)} TinyCode tests did not pass")

                if name in (
                    "pool-bwrap",
                    "pool-rlimit",
                ):  # (c): trace_many vs run_many, alternating which goes first
                    pair = [("run", ex.sandbox.run_many), ("trace", ex.sandbox.trace_many)]
                    for kind, fn in pair if rep % 2 else pair[::-1]:
                        dt, results = timed(lambda fn=fn: fn(tasks))
                        trace_times.setdefault((name, kind), []).append(dt)
                        if n_fail := n_failed(results, tests):
                            failures.append(f"{name} {kind}_many: {n_fail}/{len(tasks)} tests did not pass")
                        if kind == "trace" and not all(r.variables for r in results):
                            failures.append(f"{name} trace_many: some traces have no variables")
            print(f"repeat {rep + 1}/{args.repeats} done", flush=True)
        startup = {name: ex.startup_s for name, ex in executors.items() if isinstance(ex, Pool)}
    finally:
        for ex in executors.values():
            ex.close()

    facts = machine_facts()
    sizes = {"trivial": args.n_trivial, "tinycode": len(tasks)}
    report = "\n".join(
        [
            "## Throughput (a, b)",
            "",
            throughput_table(times, sizes),
            "",
            "## trace_many overhead on the TinyCode runs (c)",
            "",
            trace_table(trace_times, len(tasks)),
            "",
            "Pool start-up (not timed above): "
            + ", ".join(f"{name} {s:.2f} s" for name, s in startup.items())
            + f"; {workers} workers, timeout {args.timeout:g} s, memory 512 MB, "
            + f"median of {args.repeats} repeat(s), executor order rotated per repeat.",
            "",
            "## Machine",
            "",
            *(f"- {key}: {value}" for key, value in facts.items()),
            f"- OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        ]
    )
    command = "python experiments/bench_sandbox/run.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    print()
    print(report)
    if args.out:
        Path(args.out).write_text(f"# Sandbox throughput\n\nCommand: `{command.strip()}`\n\n{report}\n")
        print(f"\nwrote {args.out}")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
