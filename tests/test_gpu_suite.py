"""benchmarks/gpu_suite.py without a GPU: it runs its CPU-capable parts, lists the GPU steps as not run, keeps to
its budget (a step past it is killed, one that cannot fit is not started) and writes JSON and markdown."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _sleeper(suite, name, seconds, min_s=0.0, timeout_s=60.0):
    return suite.Step(name, [sys.executable, "-c", f"import time; time.sleep({seconds})"], False, min_s, timeout_s)


def test_cpu_parts_run_and_gpu_steps_are_listed_as_not_run(suite, tmp_path):
    steps = [s for s in suite.default_steps(tmp_path) if s.needs_gpu] + [_sleeper(suite, "cpu-step", 0)]
    report = suite.run_suite(steps, tmp_path, budget_s=60, has_gpu=False)
    saved = json.loads((tmp_path / "suite.json").read_text())
    assert saved["environment"]["torch"] and saved["environment"]["nvidia_smi"]
    assert [s["name"] for s in saved["steps"]] == ["cpu-step"] and saved["steps"][0]["status"] == "ok"
    not_run = {s["name"]: s["reason"] for s in saved["not_run"]}
    assert not_run["gpu-tests"] == "needs a CUDA device" and not_run["wan-step"] == "needs a CUDA device"
    assert all(not_run[s.name] == "needs a CUDA device" for s in steps if s.needs_gpu)
    md = (tmp_path / "suite.md").read_text()
    assert "| cpu-step | ok |" in md and "- gpu-tests: needs a CUDA device" in md and report["finished"]


def test_a_step_that_needs_more_gpus_than_the_machine_has_is_listed_with_the_reason(suite, tmp_path):
    step = next(s for s in suite.default_steps(tmp_path) if s.name == "branch-parallel-nccl")
    assert step.min_gpus == 3 and step.env["S2FAST_BRANCH_BACKEND"] == "nccl"
    report = suite.run_suite([step], tmp_path, budget_s=60, has_gpu=True, gpu_count=1)
    assert report["steps"] == []
    assert report["not_run"][-1] == {"name": "branch-parallel-nccl",
                                     "reason": "needs 3 CUDA devices (one rank per GPU), this machine has 1"}


def test_the_budget_kills_a_long_step_and_skips_what_cannot_fit(suite, tmp_path):
    steps = [_sleeper(suite, "long", 60), _sleeper(suite, "needs-more", 0, min_s=30)]
    report = suite.run_suite(steps, tmp_path, budget_s=suite.RESERVE_S + 2, has_gpu=False)
    long = report["steps"][0]
    assert long["status"] == "timed_out" and long["wall_s"] < 10
    assert report["not_run"][-1]["name"] == "needs-more" and report["not_run"][-1]["reason"].startswith("budget")


def test_benchmark_results_become_tables(suite):
    results = {"results": {"g": {"baseline": "a", "rounds": 3, "cases": {
        "a": {"median_s": 0.01, "ratio": 1.0}, "b": {"median_s": 0.013, "ratio": 1.3, "floor_ratio": 1.25,
                                                  "peak_MiB": 10.0}}}}}
    lines = suite._benchmark_tables(results)
    assert "| b | 13 | 1.300 | 1.250 | 1.040 | peak_MiB 10 |" in lines


def test_the_profile_step_runs_on_the_cpu(suite, tmp_path):
    step = next(s for s in suite.default_steps(tmp_path) if s.name == "profile-tiny-cpu")
    report = suite.run_suite([step], tmp_path, budget_s=120, has_gpu=False)
    assert report["steps"][0]["status"] == "ok", (tmp_path / report["steps"][0]["log"]).read_text()[-2000:]
    assert report["steps"][0]["results"]["model"] == "tiny"


def test_the_summary_fills_the_floor_columns():
    """The benchmarks write "floor_ratio" and the summary reads it (it once read a key nobody wrote)."""
    spec = importlib.util.spec_from_file_location("bench_conftest", SCRIPT.parent / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    lines = conftest.summary_lines({"g": {"baseline": "a", "rounds": 3, "cases": {
        "s2": {"median_s": 0.013, "ratio": 1.3, "floor_ratio": 1.25, "reserved_MiB": 12.0}}}})
    row = next(line for line in lines if line.startswith("s2"))
    assert "1.250" in row and "1.040" in row and "reserved_MiB 12" in row
    gpu_bench = (SCRIPT.parent / "test_gpu_pipelines.py").read_text()
    assert '["floor"]' not in gpu_bench and '["floor_ratio"]' in gpu_bench


def test_the_stock_baseline_is_stock_after_a_compiled_case():
    """benchmarks/test_gpu_pipelines.py: the compiled case leaves compiled blocks on the shared transformer while
    its wrap lasts; the stock case's setup (a re-wrap without compile_blocks) gives them back, and its check
    refuses to time anything compiled."""
    spec = importlib.util.spec_from_file_location("gpu_pipelines", SCRIPT.parent / "test_gpu_pipelines.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import s2fast
    from s2fast import S2Config, tiny

    pipe = tiny.sd3_pipeline(tiny.SD3Shape(), with_vae=False)
    s2fast.wrap(pipe, S2Config(omega=0.25, compile_blocks="eager"))  # nn.Module.compile: nothing traced yet
    try:
        with pytest.raises(AssertionError, match="compiled modules"):
            bench.assert_stock(pipe.transformer)
        s2fast.wrap(pipe, S2Config(omega=0.25))  # the stock case's setup
        bench.assert_stock(pipe.transformer)
    finally:
        s2fast.unwrap(pipe)
