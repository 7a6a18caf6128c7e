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
         "MiB_each", "call_floor", "joined", "ratio_lo", "ratio_hi", "aten_ops", "py_calls", "py_c_calls",
         "block_rows", "cached_steps", "mean_abs_diff")


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


@pytest.fixture
def two_call_step(interleaved):
    """two_call_step(group, model, adapter, rows, subnets, rounds, finish): the per-step cases of a family whose loop
    calls the transformer twice a step (cond, then uncond, batch B each: Wan, Qwen-Image), timed side by side with
    their block-row floors. ``rows`` holds the [uncond, cond] branches; ``finish(c, u, subs)`` turns the predictions
    into the step's D (Eq. 4, then whatever the pipeline does to it)."""
    from s2fast.engine import EngineOptions, block_rows, predict
    from s2fast.reference import skipping

    def forward(model, inputs):
        return model(**inputs, return_dict=False)[0]

    def stock_cfg(model, adapter, rows, subnets, finish):
        c = forward(model, rows.branch(1))  # the pipeline's loop: cond, then uncond
        return finish(c, forward(model, rows.branch(0)), [])

    def naive(model, adapter, rows, subnets, finish):
        c, u = forward(model, rows.branch(1)), forward(model, rows.branch(0))
        subs = []
        for mask in subnets:
            with skipping(adapter, adapter.blocks(model), mask):
                subs.append(forward(model, rows.branch(1)))
        return finish(c, u, subs)

    def s2fast(options=None, with_subnets=True):
        def case(model, adapter, rows, subnets, finish):
            preds = predict(adapter, model, rows, subnets if with_subnets else [], options or EngineOptions())
            return finish(preds[1], preds[0], preds[2:])
        return case

    def run(group, model, adapter, rows, subnets, rounds, finish):
        layers = len(adapter.blocks(model))
        cases = {  # name: (case, block-row count of the case)
            "cfg-stock": (stock_cfg, 2 * layers),
            "cfg-s2fast": (s2fast(with_subnets=False), 2 * layers),
            "s2-naive-three-pass": (naive, block_rows(layers, 2, subnets, reuse_prefix=False)),
            "s2-s2fast-separate": (s2fast(), block_rows(layers, 2, subnets)),
            "s2-s2fast-join": (s2fast(EngineOptions(fork_mode="join")), block_rows(layers, 2, subnets)),
        }
        timed = {name: (lambda fn=fn: fn(model, adapter, rows, subnets, finish)) for name, (fn, _) in cases.items()}
        floors = {name: {"floor_ratio": count / (2 * layers)} for name, (_, count) in cases.items()}
        return interleaved(group, timed, "cfg-stock", rounds, floors)

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
