"""Everything a GPU session measures, in one invocation with a time budget (default 9 minutes):

    .venv/bin/python benchmarks/gpu_suite.py --out gpu-suite/            # --budget 540, --only, --skip, --list

Steps, in order: the environment (versions, nvidia-smi), the gpu-marked tests, the CUDA extension's build and its
tests, the fused-step benchmark, the SD3-medium step against its block-row floor, SD3-medium and Flux-dev end to
end (1024², 28 steps, bf16), the Wan 2.1 steps against their floor, the Qwen-Image and Flux.2-dev steps (1024²)
against theirs, the fork modes by image size (SD3-medium at 512² and 1024², Flux-dev at 512²), cached S²
(BlockCache) on Wan 2.1 1.3B and Flux-dev end to end, branch parallelism over nccl (one rank per GPU; listed as not
run on a machine with fewer than 3 GPUs), and the profile script. Each
step runs in a process of its own, with a timeout that never passes the budget; a step that would start with less
time left than it needs is not started. Results are written after every step, so a run that is stopped still leaves
them: suite.json (every step: status, seconds, return code, its log file, the benchmark results it wrote) and
suite.md (the same as tables), with the steps not run and why. Without a GPU the GPU steps are listed as not run
and the CPU-capable ones (the environment, the profile script on the tiny model) run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's python runs every step: its pytest, its pip
RESERVE_S = 5.0  # kept for writing the results after the last step


@dataclass
class Step:
    name: str
    command: List[str]
    needs_gpu: bool
    min_s: float            # not started with less time left than this
    timeout_s: float        # at most this long, and never past the budget
    env: Dict[str, str] = field(default_factory=dict)
    results: Optional[str] = None  # a JSON file the step writes (relative to the output folder)
    after: Optional[str] = None    # runs only if this step succeeded
    without_gpu_only: bool = False  # the CPU stand-in of a GPU step: not worth GPU time
    min_gpus: int = 1               # a GPU step that needs several devices (one rank per GPU)


def _pytest(*args: str) -> List[str]:
    # the venv's pytest script, not `python -m pytest`: that would put the repository root on sys.path, where
    # kernels/ would be importable as a top-level "kernels" (a name diffusers probes for)
    return [str(BIN / "pytest"), "-p", "no:cacheprovider", *args]


def default_steps(out: Path, arch: str = "9.0") -> List[Step]:
    bench = lambda name: {"S2FAST_BENCH_DIR": str(out / name)}  # noqa: E731 (benchmarks/conftest.py writes there)
    results = "s2fast_results.json"
    return [
        Step("gpu-tests", _pytest("-q", "-m", "gpu", "tests/", f"--junitxml={out / 'gpu-tests.xml'}"), True, 60, 180),
        Step("build-extension", [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-q",
                                 "-e", "."], True, 60, 240, {"S2FAST_BUILD_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch}),
        Step("extension-tests", _pytest("-q", "tests/test_flow_step_gpu.py"), True, 20, 90, after="build-extension"),
        Step("fused-step", _pytest("-q", "benchmarks/test_fused_step.py", "--benchmark-only"), True, 30, 150,
             bench("fused-step"), f"fused-step/{results}"),
        Step("sd3-step", _pytest("-q", "-s", "benchmarks/test_gpu_pipelines.py", "-k", "step_vs_floor_sd3",
                                 "--benchmark-only"), True, 60, 180, bench("sd3-step"), f"sd3-step/{results}"),
        Step("sd3-end-to-end", _pytest("-q", "-s", "benchmarks/test_gpu_pipelines.py", "-k", "end_to_end and sd3",
                                       "--benchmark-only"), True, 90, 300, bench("sd3-e2e"), f"sd3-e2e/{results}"),
        Step("flux-end-to-end", _pytest("-q", "-s", "benchmarks/test_gpu_pipelines.py", "-k", "end_to_end and flux",
                                        "--benchmark-only"), True, 120, 400, bench("flux-e2e"), f"flux-e2e/{results}"),
        Step("wan-step", _pytest("-q", "-s", "benchmarks/test_gpu_pipelines.py", "-k", "step_vs_floor_wan",
                                 "--benchmark-only"), True, 90, 300, bench("wan-step"), f"wan-step/{results}"),
        Step("families-step", _pytest("-q", "-s", "benchmarks/test_gpu_pipelines.py", "-k", "step_vs_floor_families",
                                      "--benchmark-only"), True, 120, 360, bench("families-step"),
             f"families-step/{results}"),
        Step("fork-modes", _pytest("-q", "-s", "benchmarks/test_gpu_pipelines.py", "-k", "fork_modes_by_image_size",
                                   "--benchmark-only"), True, 90, 300, bench("fork-modes"), f"fork-modes/{results}"),
        Step("cached-s2", _pytest("-q", "-s", "benchmarks/test_gpu_step_cache.py", "--benchmark-only"), True, 150,
             420, bench("cached-s2"), f"cached-s2/{results}"),
        # branch parallelism over nccl, one rank per GPU: 1-, 2- and 3-rank cases of an SD3-medium 1024² step
        Step("branch-parallel-nccl", _pytest("-q", "-s", "benchmarks/test_branch_parallel_cost.py", "--benchmark-only"),
             True, 90, 300, {"S2FAST_BRANCH_BACKEND": "nccl", **bench("branch-parallel")},
             f"branch-parallel/{results}", min_gpus=3),
        Step("profile-sd3", [sys.executable, "benchmarks/profile_gpu.py", "--model", "sd3-medium", "--steps", "10",
                             "--out", str(out / "profile-sd3")], True, 45, 150, results="profile-sd3/profile.json"),
        Step("profile-tiny-cpu", [sys.executable, "benchmarks/profile_gpu.py", "--model", "tiny", "--device", "cpu",
                                  "--steps", "2", "--top", "5", "--out", str(out / "profile-tiny-cpu")], False, 10, 120,
             results="profile-tiny-cpu/profile.json", without_gpu_only=True),
    ]


# Shapes a GPU session should measure that this repository does not have yet: listed as not run, never dropped.
NOT_IN_REPOSITORY: Dict[str, str] = {}


def environment(has_gpu: bool) -> Dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    for package in ("torch", "diffusers", "triton", "transformers", "s2fast"):
        try:
            from importlib.metadata import version

            info[package] = version(package)
        except Exception as e:  # not installed
            info[package] = f"not installed ({type(e).__name__})"
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        if has_gpu:
            props = torch.cuda.get_device_properties(0)
            info["gpu"] = props.name
            info["capability"] = f"{props.major}.{props.minor}"
            info["gpu_memory_GiB"] = round(props.total_memory / 2**30, 1)
    except Exception as e:
        info["torch_error"] = f"{type(e).__name__}: {e}"
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                        timeout=10).stdout.strip() or None
    except Exception:
        info["commit"] = None
    smi = shutil.which("nvidia-smi")
    if smi is None:
        info["nvidia_smi"] = "nvidia-smi not found"
    else:
        r = subprocess.run([smi], capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = r.stdout if r.returncode == 0 else f"nvidia-smi failed ({r.returncode}): {r.stderr}"
    return info


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def _gpu_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _cuda_arch() -> str:
    try:
        import torch

        major, minor = torch.cuda.get_device_capability(0)
        return f"{major}.{minor}"
    except Exception:
        return "9.0"


def run_step(step: Step, out: Path, timeout: float) -> Dict:
    """Run one step in its own process group; kill the whole group at the timeout."""
    log = out / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **step.env)
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else ("skipped" if rc == 5 else "failed")  # pytest: 5 = nothing collected
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, status = proc.wait(), "timed_out"
        except KeyboardInterrupt:  # the suite is stopped: so is its step
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    record = {"name": step.name, "status": status, "rc": rc, "wall_s": round(time.monotonic() - start, 2),
              "timeout_s": round(timeout, 1), "command": " ".join(step.command), "log": str(log.relative_to(out))}
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    record["tail"] = tail
    if step.results and (out / step.results).exists():
        try:
            record["results"] = json.loads((out / step.results).read_text())
        except ValueError as e:
            record["results_error"] = str(e)
    return record


def run_suite(steps: List[Step], out: Path, budget_s: float, has_gpu: bool, gpu_count: Optional[int] = None) -> Dict:
    """Run ``steps`` within ``budget_s``; ``gpu_count``: the CUDA devices (default: 1 where ``has_gpu``)."""
    gpu_count = (1 if has_gpu else 0) if gpu_count is None else gpu_count
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    report = {"budget_s": budget_s, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "environment": environment(has_gpu), "steps": [], "not_run": []}
    report["not_run"] += [{"name": k, "reason": v} for k, v in NOT_IN_REPOSITORY.items()]
    write(report, out)
    done = {}
    try:
        for step in steps:
            left = deadline - time.monotonic() - RESERVE_S
            reason = None
            if step.needs_gpu and not has_gpu:
                reason = "needs a CUDA device"
            elif step.needs_gpu and gpu_count < step.min_gpus:
                reason = f"needs {step.min_gpus} CUDA devices (one rank per GPU), this machine has {gpu_count}"
            elif step.without_gpu_only and has_gpu:
                reason = "the CPU stand-in of a GPU step, not run where a GPU is"
            elif step.after and done.get(step.after) != "ok":
                reason = f"needs {step.after}, which did not succeed"
            elif left < step.min_s:
                reason = f"budget: {max(left, 0):.0f} s left, needs at least {step.min_s:.0f} s"
            if reason:
                report["not_run"].append({"name": step.name, "reason": reason})
            else:
                record = run_step(step, out, min(step.timeout_s, left))
                done[step.name] = record["status"]
                report["steps"].append(record)
            write(report, out)
    except KeyboardInterrupt:  # stopped from outside: what ran is written, the rest is listed
        ran = {s["name"] for s in report["steps"]} | {s["name"] for s in report["not_run"]}
        report["not_run"] += [{"name": s.name, "reason": "the suite was interrupted"} for s in steps if s.name not in ran]
        write(report, out)
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    write(report, out)
    return report


def write(report: Dict, out: Path) -> None:
    (out / "suite.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "suite.md").write_text(markdown(report))


def _benchmark_tables(results: Dict) -> List[str]:
    """The tables of a benchmarks/conftest.py results file."""
    lines = []
    for group, result in results.get("results", {}).items():
        lines += ["", f"**{group}** ({result['rounds']} rounds, ratio to {result['baseline']})", "",
                  "| case | ms | ratio | floor | vs floor | more |", "|---|---|---|---|---|---|"]
        for case, r in result["cases"].items():
            floor = r.get("floor_ratio")
            floor_text = f"{floor:.3f}" if floor else ""
            over = f"{r['ratio'] / floor:.3f}" if floor else ""
            more = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                             if k not in ("median_s", "ratio", "floor_ratio"))
            lines.append(f"| {case} | {r['median_s'] * 1e3:.4g} | {r['ratio']:.3f} | {floor_text} | {over} | {more} |")
    return lines


def markdown(report: Dict) -> str:
    env = report["environment"]
    lines = [f"# GPU suite, {report['started']}", "", f"budget {report['budget_s']:.0f} s", "",
             "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in env.items() if k != "nvidia_smi"), "",
             "```", str(env.get("nvidia_smi", "")).strip(), "```", "",
             "| step | status | s | rc | log |", "|---|---|---|---|---|",
             *(f"| {s['name']} | {s['status']} | {s['wall_s']} | {s['rc']} | {s['log']} |" for s in report["steps"])]
    if report["not_run"]:
        lines += ["", "Not run:", "", *(f"- {s['name']}: {s['reason']}" for s in report["not_run"])]
    for step in report["steps"]:
        results = step.get("results")
        if isinstance(results, dict) and "results" in results:
            lines += ["", f"## {step['name']}", *_benchmark_tables(results)]
        elif isinstance(results, dict) and "top" in results:
            lines += ["", f"## {step['name']}", "", f"wall {results['wall_s']:.3f} s, graphs {results.get('graphs')}"]
    if "finished" in report:
        lines += ["", f"finished {report['finished']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole suite (default 540)")
    p.add_argument("--out", default="gpu-suite", help="output folder (default gpu-suite/)")
    p.add_argument("--only", default="", help="comma-separated step names to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated step names not to run")
    p.add_argument("--list", action="store_true", help="list the steps and exit")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error("--budget must be positive")
    out = Path(args.out).resolve()
    has_gpu = _gpu_available()
    steps = default_steps(out, _cuda_arch() if has_gpu else "9.0")
    names = {s.name for s in steps}
    only = [n for n in args.only.split(",") if n]
    skip = [n for n in args.skip.split(",") if n]
    unknown = [n for n in only + skip if n not in names]
    if unknown:
        p.error(f"unknown steps {unknown}; the steps are {sorted(names)}")
    if args.list:
        for s in steps:
            print(f"{s.name:<20} {'GPU' if s.needs_gpu else 'CPU'}  ≤ {s.timeout_s:.0f} s  {' '.join(s.command)}")
        return {}
    steps = [s for s in steps if (not only or s.name in only) and s.name not in skip]
    # stopped by a timeout (SIGTERM) or Ctrl-C: write what ran and list the rest
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    report = run_suite(steps, out, args.budget, has_gpu, _gpu_count() if has_gpu else 0)
    print(markdown(report))
    print(f"written to {out / 'suite.json'} and {out / 'suite.md'}")
    return report


if __name__ == "__main__":
    main()
