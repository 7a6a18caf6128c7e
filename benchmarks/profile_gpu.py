"""Profile one pipeline call on any NVIDIA GPU (H20, A100, H100, H200): NVML samples during the run and
torch.profiler's top kernels, written as a markdown table and a JSON file.

    .venv/bin/python benchmarks/profile_gpu.py --model sd3-medium --method s2 --out profile/
    .venv/bin/python benchmarks/profile_gpu.py --model tiny --device cpu     # the same report without a GPU

NVML (pip install nvidia-ml-py, the `profiling` extra) is sampled every --interval seconds in a thread: GPU name,
driver, memory used, power, SM clock and utilisation. Without NVML or a GPU the report says so and keeps the rest.
Random weights: the architecture, not the weights, sets the time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from typing import Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


class NvmlSampler:
    """Samples NVML in a background thread between start() and stop(); ``reason`` says why there are none."""

    def __init__(self, device_index: int = 0, interval: float = 0.05):
        self.interval, self.samples, self.info, self.reason = interval, [], {}, None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            name = pynvml.nvmlDeviceGetName(self._handle)
            driver = pynvml.nvmlSystemGetDriverVersion()
            self.info = {"gpu": name.decode() if isinstance(name, bytes) else name,
                         "driver": driver.decode() if isinstance(driver, bytes) else driver,
                         "memory_total_MiB": pynvml.nvmlDeviceGetMemoryInfo(self._handle).total / 2**20}
        except Exception as e:  # no nvidia-ml-py, no driver, no GPU: report without NVML
            self._nvml, self.reason = None, f"NVML unavailable ({type(e).__name__}: {e})"

    def _sample(self) -> Dict[str, float]:
        n, h = self._nvml, self._handle
        util = n.nvmlDeviceGetUtilizationRates(h)
        return {"t": time.perf_counter(), "memory_used_MiB": n.nvmlDeviceGetMemoryInfo(h).used / 2**20,
                "power_W": n.nvmlDeviceGetPowerUsage(h) / 1e3, "sm_clock_MHz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
                "gpu_util_pct": util.gpu, "mem_util_pct": util.memory}

    def _loop(self):
        while not self._stop.is_set():
            self.samples.append(self._sample())
            self._stop.wait(self.interval)

    def start(self):
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> Dict[str, Dict[str, float]]:
        keys = [k for k in (self.samples[0] if self.samples else {}) if k != "t"]
        return {k: {"median": statistics.median(s[k] for s in self.samples), "max": max(s[k] for s in self.samples)}
                for k in keys}


def build(model: str, device: str):
    sys.path.insert(0, HERE)
    from s2fast import tiny

    if model == "tiny":
        shape, dtype = tiny.SD3Shape(), torch.float32
        pipe = tiny.sd3_pipeline(shape, with_vae=False)
    elif model.startswith("wan"):
        return _build_wan(model, device)
    else:
        from test_gpu_pipelines import FLUX_DEV, SD3_MEDIUM

        shape, dtype = (SD3_MEDIUM if model == "sd3-medium" else FLUX_DEV), torch.bfloat16
        torch.set_default_device(device)
        try:
            build_fn = tiny.sd3_pipeline if model == "sd3-medium" else tiny.flux_pipeline
            pipe = build_fn(shape, dtype=dtype, with_vae=False)
        finally:
            torch.set_default_device(None)
    pipe.to(device)
    scale = "true_cfg_scale" if model == "flux-dev" else "guidance_scale"
    kw = {k: v.to(device) for k, v in tiny.embeddings(shape, dtype=dtype).items()}
    kw.update(tiny.image_size(pipe, shape), output_type="latent", **{scale: 5.0})
    return pipe, kw


def _build_wan(model: str, device: str):
    """A WanPipeline with a random Wan 2.1 transformer: the 1.3B at 480p or the 14B at 720p, 81 frames, bf16
    (shapes in test_gpu_pipelines.WAN_SHAPES); "wan-tiny" is a tiny fp32 one, for a CPU run."""
    from s2fast import tiny

    if model == "wan-tiny":
        shape, dtype = tiny.WanShape(), torch.float32
    else:
        from test_gpu_pipelines import WAN_SHAPES

        shape = WAN_SHAPES["wan2.1-1.3b-480p" if model == "wan2.1-1.3b" else "wan2.1-14b-720p"]
        dtype = torch.bfloat16
    torch.set_default_device(device)
    try:
        pipe = tiny.wan_pipeline(shape, dtype=dtype, with_vae=False)
    finally:
        torch.set_default_device(None)
    pipe.to(device)
    kw = {k: v.to(device) for k, v in tiny.wan_embeddings(shape, dtype=dtype).items()}
    kw.update(tiny.wan_video_size(pipe, shape), output_type="latent", guidance_scale=5.0)
    return pipe, kw


def top_kernels(prof, device: str, n: int) -> List[Dict[str, float]]:
    attr = "device_time_total" if device == "cuda" else "cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, attr, 0.0), reverse=True)
    total = sum(getattr(e, attr, 0.0) for e in rows if not e.key.startswith("ProfilerStep")) or 1.0
    return [{"name": e.key, "calls": e.count, "total_ms": getattr(e, attr) / 1e3, "share_pct": 100 * getattr(e, attr) / total}
            for e in rows[:n]]


def markdown(report: Dict) -> str:
    lines = [f"# Profile: {report['model']}, {report['method']}, {report['steps']} steps on {report['device']}", "",
             f"wall time {report['wall_s']:.3f} s; torch {report['torch']}", ""]
    if report["nvml"]["reason"]:
        lines += [report["nvml"]["reason"], ""]
    else:
        lines += ["| GPU | driver | memory total MiB |", "|---|---|---|",
                  f"| {report['nvml']['gpu']} | {report['nvml']['driver']} | {report['nvml']['memory_total_MiB']:.0f} |", "",
                  "| NVML sample | median | max |", "|---|---|---|",
                  *(f"| {k} | {v['median']:.1f} | {v['max']:.1f} |" for k, v in report["nvml"]["summary"].items()), ""]
    lines += ["| kernel / op | calls | total ms | share % |", "|---|---|---|---|",
              *(f"| `{r['name'][:80]}` | {r['calls']} | {r['total_ms']:.2f} | {r['share_pct']:.1f} |" for r in report["top"])]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("tiny", "sd3-medium", "flux-dev", "wan-tiny", "wan2.1-1.3b", "wan2.1-14b"),
                   default="sd3-medium")
    p.add_argument("--method", choices=("stock-cfg", "cfg", "s2"), default="s2")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--top", type=int, default=15, help="kernels in the table (default 15)")
    p.add_argument("--interval", type=float, default=0.05, help="NVML sampling period, s (default 0.05)")
    p.add_argument("--out", default="profile", help="folder for profile.md and profile.json")
    args = p.parse_args(argv)
    if args.steps < 1 or args.top < 1 or args.interval <= 0:
        p.error("--steps and --top must be at least 1, --interval > 0")
    import s2fast

    torch.set_grad_enabled(False)
    pipe, kw = build(args.model, args.device)
    if args.method != "stock-cfg":
        s2fast.wrap(pipe, s2fast.S2Config(omega=0.0 if args.method == "cfg" else 0.25, seed=0))
    pipe(**kw, num_inference_steps=2)  # warm-up (and graph capture): not profiled
    sampler = NvmlSampler(torch.device(args.device).index or 0, args.interval) if args.device.startswith("cuda") else None
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    if sampler:
        sampler.start()
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        pipe(**kw, num_inference_steps=args.steps)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    if sampler:
        sampler.stop()
    nvml = {"reason": "not a CUDA device: no NVML samples"} if sampler is None else \
        {"reason": sampler.reason, **sampler.info, "summary": sampler.summary(), "samples": len(sampler.samples)}
    report = {"model": args.model, "method": args.method, "steps": args.steps, "device": args.device, "wall_s": wall,
              "torch": torch.__version__, "nvml": nvml, "top": top_kernels(prof, args.device.split(":")[0], args.top),
              "graphs": s2fast.graph_stats(pipe), "masks": [list(m) for m in s2fast.trace(pipe)] if args.method == "s2" else None}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "profile.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "profile.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
