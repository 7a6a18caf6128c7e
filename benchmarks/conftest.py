"""Benchmarks are not tests: run them with `make bench` (pytest-benchmark).

Each benchmark times *interleaved* rounds (s2fast/timing.py says why): every round runs each case once, in a
shuffled order, and the ratio of a case to its baseline is the median over rounds of (case time / baseline time in
the same round). pytest-benchmark's own table shows the time of a whole round;
the terminal summary below shows the per-case medians and ratios, and writes them to .benchmarks/<name>.json.
"""

import json
import os
import platform
from pathlib import Path

import pytest
import torch

from s2fast.timing import InterleavedRounds

RESULTS = {}  # group -> {"baseline": case, "cases": {case: {...}}}
# extra per-case numbers the summary prints; "floor_ratio" (the block-row floor over CFG) fills the floor columns
_MORE = ("speedup", "GB/s", "of_copy", "copy_GB/s", "peak_MiB", "reserved_MiB", "graph_pool_MiB", "static_MiB",
         "MiB_each", "call_floor", "joined", "ratio_lo", "ratio_hi")


def environment():
    import diffusers

    return {
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def _version(package):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


@pytest.fixture
def interleaved(benchmark):
    """interleaved(group, cases, baseline, rounds, extra, self_timed): time ``cases`` ({name: zero-argument
    callable}) in shuffled interleaved rounds under pytest-benchmark; returns {name: {"median_s", "ratio"}}, the
    same dict the summary prints (add keys to it to print them). ``self_timed``: the cases return the seconds they
    measured themselves (CUDA events); otherwise the wall clock times them and their return values are ignored."""

    def run(group, cases, baseline, rounds, extra=None, self_timed=False):
        timer = InterleavedRounds({name: fn if self_timed else _wall_clock(fn) for name, fn in cases.items()})
        timer.run_round(record=False)  # warm-up: first-call allocations stay out of the numbers
        benchmark.group = group
        benchmark.pedantic(timer.run_round, rounds=rounds, iterations=1)
        summary = {
            name: {"median_s": timer.median(name), "ratio": timer.ratio(name, baseline),
                   "ratio_lo": min(timer.ratios(name, baseline)), "ratio_hi": max(timer.ratios(name, baseline)),
                   **(extra or {}).get(name, {})}
            for name in cases
        }
        benchmark.extra_info.update(environment(), cases=summary, rounds=rounds)
        RESULTS[group] = {"baseline": baseline, "rounds": rounds, "cases": summary}
        return summary

    return run


def _wall_clock(fn):
    # The cases return predictions; the timer reads a case's return value as its own measurement, so drop it.
    def case():
        fn()

    return case


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("s2fast: interleaved medians and ratios (same run)")
    env = environment()
    tr.write_line(", ".join(f"{k} {v}" for k, v in env.items()))
    for line in summary_lines(RESULTS):
        tr.write_line(line)
    out = Path(os.environ.get("S2FAST_BENCH_DIR", ".benchmarks"))
    out.mkdir(exist_ok=True)
    path = out / "s2fast_results.json"
    path.write_text(json.dumps({"environment": env, "results": RESULTS}, indent=2))
    tr.write_line(f"\nwritten to {path}")


def summary_lines(results):
    """The summary table of ``results`` (group -> {"baseline", "rounds", "cases"}), one string per line."""
    lines = []
    for group, result in results.items():
        lines.append(f"\n[{group}] {result['rounds']} rounds, ratio to {result['baseline']}")
        lines.append(f"{'case':<30}{'ms':>10}{'ratio':>9}{'floor':>8}{'vs floor':>10}  more")
        for case, r in result["cases"].items():
            floor = r.get("floor_ratio")
            over = f"{r['ratio'] / floor:>10.3f}" if floor else f"{'':>10}"
            floor_text = f"{floor:>8.3f}" if floor else f"{'':>8}"
            more = "  ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k in _MORE
                             or k == "resident")
            lines.append(f"{case:<30}{r['median_s'] * 1e3:>10.4g}{r['ratio']:>9.3f}{floor_text}{over}  {more}")
    return lines
