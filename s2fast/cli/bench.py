"""``s2fast bench``: what S² costs on the user's model and device.

Times four ways of sampling the same prompt from the same noise: stock CFG (the pipeline as diffusers ships it),
s2fast CFG (wrapped with ω = 0: s2fast's path, no sub-network), naive three-pass S² (one more stock forward per
step on the cond rows with the masked blocks skipped, s2fast/reference.py) and s2fast S² (same masks), and s2fast
SGG (``--skip-blocks``, ``--skip-scale``) where the model has the blocks it skips. The cases
run in interleaved rounds in a shuffled order (s2fast/timing.py), a case's time is the median step of its call
(the first step, which pays the call's set-up, left out), and a ratio is the median over rounds of the ratio within
a round. The block-row floor is the block calls per step the masks drawn require, relative to CFG's; with the
share of a CFG step spent in the blocks it gives the lowest ratio the work allows, and a ratio below it, or rounds
that spread by more than 20 %, are flagged as untrustworthy. On CUDA devices it reports each case's peak memory,
and with nvidia-ml-py installed (the ``profiling`` extra) the GPU's mean power, SM clock and utilisation.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import threading
from typing import Dict, List, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

import s2fast
from s2fast.engine import block_rows
from s2fast.reference import wrap_three_pass
from s2fast.timing import InterleavedRounds, block_share, step_floor, timing_warning

from . import media
from .errors import UserError
from .families import family_named
from .methods import s2_config, sgg_config, skip_blocks
from .models import inspect_model, load_pipeline, resolve_device, resolve_dtype, sibling
from .runtime import StepClock, device_record, versions

BASELINE = "stock CFG"


def sgg_missing(args, num_blocks: int) -> Optional[str]:
    """Why bench times no SGG case on a model of ``num_blocks`` blocks, or None where it does."""
    blocks = skip_blocks(args, num_blocks)
    if max(blocks) < num_blocks and len(blocks) < num_blocks:
        return None
    return (f"s2fast SGG not timed: --skip-blocks {','.join(map(str, blocks))} names blocks the model's {num_blocks} "
            f"(0..{num_blocks - 1}) do not have or all of them")


def cases(pipe, args, num_blocks: Optional[int] = None) -> Dict[str, tuple]:
    """The compared cases: name -> (the pipeline it calls, its set-up). One more method is one more entry.

    Stock CFG calls a sibling pipeline over the same models (a pipeline that is not wrapped gets the stock
    forward), so the s2fast cases are never unwrapped between rounds: unwrap releases the block graphs, and every
    round would capture them anew. Re-wrapping with another config keeps them. Under model offload (no graphs,
    hooks owned by ``pipe``) stock CFG unwraps ``pipe`` instead."""
    config = s2_config(args)
    stock = pipe if args.offload else sibling(pipe)
    return {
        BASELINE: (stock, lambda: s2fast.unwrap(pipe) if args.offload else None),
        "s2fast CFG": (pipe, lambda: s2fast.wrap(pipe, dataclasses.replace(config, omega=0.0))),  # no sub-network
        "naive three-pass S²": (pipe, lambda: wrap_three_pass(pipe, config)),
        "s2fast S²": (pipe, lambda: s2fast.wrap(pipe, config)),
        # SGG where its skip blocks exist in this model (sgg_missing says why not)
        **({"s2fast SGG": (pipe, lambda: s2fast.wrap(pipe, sgg_config(args, num_blocks)))}
           if num_blocks is not None and sgg_missing(args, num_blocks) is None else {}),
    }


def sgg_floor(args, num_blocks: int) -> float:
    """SGG's block rows per sample relative to CFG's: the cond rows at every step, the uncond rows inside its CFG
    window, and the skip rows from their fork (the first skipped block) where skip guidance applies."""
    from s2fast import plan

    steps = plan.guidance_steps(sgg_config(args, num_blocks), args.steps, num_blocks)
    rows = sum((2 if g.uncond else 1) * num_blocks + sum(num_blocks - min(m) - len(m) for m in g.subnets) for g in steps)
    return rows / (2 * num_blocks * args.steps)


class GpuSampler:
    """Mean power (W), SM clock (MHz) and utilisation (%) of a CUDA device over a call, sampled every 20 ms in a
    thread through NVML (nvidia-ml-py). ``available`` is False without NVML or a GPU; it then records nothing."""

    def __init__(self, device: torch.device):
        self.available = False
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
            self.available = True
        except Exception:  # nvidia-ml-py missing, or NVML cannot reach the driver: report without it
            return

    def __enter__(self):
        self.samples: List[tuple] = []
        self._stop = threading.Event()
        if self.available:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        nv = self._nvml
        while not self._stop.wait(0.02):
            self.samples.append((nv.nvmlDeviceGetPowerUsage(self._handle) / 1e3,
                                 nv.nvmlDeviceGetClockInfo(self._handle, nv.NVML_CLOCK_SM),
                                 nv.nvmlDeviceGetUtilizationRates(self._handle).gpu))

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()

    def means(self) -> Optional[Dict[str, float]]:
        if not self.samples:
            return None
        power, clock, util = zip(*self.samples)
        return {"power_w": statistics.fmean(power), "sm_clock_mhz": statistics.fmean(clock),
                "utilisation_pct": statistics.fmean(util)}


def run(args) -> Dict:
    if args.steps < 3:
        raise UserError("--steps must be at least 3 for bench (a case's time is its median step after the first)")
    media.check_input_files(args)
    info = inspect_model(args.model)  # every check that needs no weights, before they load
    family = family_named(info.class_name)
    family.check_options(info, args)
    prompt = args.prompt if args.prompt is not None else family.default_prompt
    family.condition(info, prompt)
    inputs = media.read_inputs(args, family)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    pipe = load_pipeline(info, dtype)
    from .generate import prepare

    prepare(pipe, args, device)
    kwargs = family.call_kwargs(pipe, args, prompt, inputs)
    from s2fast.adapters import adapter_for

    blocks = adapter_for(pipe).blocks(pipe.transformer)
    setups = cases(pipe, args, len(blocks))
    sampler = GpuSampler(device)
    peaks: Dict[str, float] = {}
    gpu: Dict[str, List[Dict]] = {name: [] for name in setups}
    outputs: Dict[str, np.ndarray] = {}
    traces: Dict[str, tuple] = {}

    def call(target, steps, extra=None):
        generator = torch.Generator(device="cpu").manual_seed(args.seed)
        try:
            result = target(**dict(kwargs, num_inference_steps=steps), generator=generator, output_type="np",
                            **(extra or {}))
            return np.asarray(result.frames if family.video else result.images)
        except torch.OutOfMemoryError:
            raise UserError(f"out of memory on {device} (try --offload model, a smaller --height/--width or "
                            "--dtype bf16)") from None
        except (ValueError, TypeError) as e:
            raise UserError(f"{type(pipe).__name__} refused the options: {str(e).strip().splitlines()[0]}") from None

    def timed(name):
        target, setup = setups[name]

        def case():
            setup()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            clock = StepClock(target, device)
            with sampler, clock as timing:
                outputs[name] = call(target, args.steps, extra=timing)
            if device.type == "cuda" and name != BASELINE:  # stock's is its clean first call's (below)
                peaks[name] = max(peaks.get(name, 0), torch.cuda.max_memory_allocated(device))
            if sampler.means():
                gpu[name].append(sampler.means())
            traces[name] = s2fast.trace(target) if s2fast.config_of(target) is not None else ()
            bar.update()
            return statistics.median(clock.step_times[1:])
        return case

    timer = InterleavedRounds({name: timed(name) for name in setups}, seed=args.seed)
    with tqdm(total=len(setups) * args.rounds, desc="bench", unit="call") as bar:
        stock = setups[BASELINE][0]
        s2fast.unwrap(pipe)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        call(stock, 2)  # warm-up of stock CFG, and its peak memory with nothing of s2fast's allocated
        if device.type == "cuda":
            peaks[BASELINE] = torch.cuda.max_memory_allocated(device)
        share = block_share(blocks, lambda: call(stock, min(args.steps, 5)))
        for name, (target, setup) in setups.items():  # warm-up: lazy imports, first-call allocations, block graphs
            if name != BASELINE:
                setup()
                call(target, 2)
        for _ in range(args.rounds):
            timer.run_round()
    s2fast.unwrap(pipe)
    if traces["naive three-pass S²"] != traces["s2fast S²"]:
        raise RuntimeError("s2fast bench: the two S² cases drew different masks")
    num_blocks = len(blocks)
    step_masks = [(m,) if m else () for m in traces["s2fast S²"]]
    cfg_rows = 2 * num_blocks * args.steps
    floors = {BASELINE: 1.0, "s2fast CFG": 1.0,
              "naive three-pass S²": sum(block_rows(num_blocks, 2, s, reuse_prefix=False) for s in step_masks) / cfg_rows,
              "s2fast S²": sum(block_rows(num_blocks, 2, s) for s in step_masks) / cfg_rows}
    if "s2fast SGG" in setups:
        floors["s2fast SGG"] = sgg_floor(args, num_blocks)
    rows = {}
    for name in setups:
        ratios = timer.ratios(name, BASELINE)
        rows[name] = {
            "ms_per_step": 1e3 * timer.median(name), "ratio": statistics.median(ratios), "ratios": ratios,
            "block_row_floor": floors[name], "step_floor": step_floor(floors[name], share),
            "peak_memory_mib": peaks[name] / 2 ** 20 if name in peaks else None,  # max_memory_allocated
            "gpu": _mean_dicts(gpu[name]),
            # s2fast CFG does the blocks' work of stock CFG and may save elsewhere (the fused step): only the
            # spread can make its ratio untrustworthy, not a ratio below 1
            "warning": None if name == BASELINE else timing_warning(
                ratios, step_floor(floors[name], share) if floors[name] > 1 else None),
        }
    result = {
        "model": args.model, "pipeline": type(pipe).__name__, "prompt": prompt, "steps": args.steps,
        "rounds": args.rounds, "guidance": family.guidance(pipe, args), "omega": args.omega,
        "drop_ratio": args.drop_ratio, "seed": args.seed, "blocks": num_blocks, "block_share": share,
        "masks": [list(m) for m in traces["s2fast S²"]], "cases": rows, "sgg_missing": sgg_missing(args, num_blocks),
        "s2_difference": float(np.abs(outputs["s2fast S²"] - outputs["naive three-pass S²"]).max()),
        "s2_effect": float(np.abs(outputs["s2fast S²"] - outputs[BASELINE]).max()),
        "versions": versions(), "device": device_record(device, dtype, _One()),
    }
    print(format_table(result))
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, ensure_ascii=False)
        except OSError as e:
            raise UserError(f"cannot write --json {args.json}: {e.strerror or e}") from None
    return result


class _One:  # device_record's process count outside a launcher
    count = 1


def _mean_dicts(dicts: List[Dict[str, float]]) -> Optional[Dict[str, float]]:
    if not dicts:
        return None
    return {k: statistics.fmean(d[k] for d in dicts) for k in dicts[0]}


def format_table(r: Dict) -> str:
    d = r["device"]
    has_gpu = any(c["gpu"] for c in r["cases"].values())
    head = f"{'case':<22}{'ms/step':>10}{'vs CFG':>9}{'(range over rounds)':>21}{'block-row floor':>17}{'peak MiB':>10}"
    if has_gpu:
        head += f"{'W':>7}{'SM MHz':>8}{'util %':>8}"
    lines = [
        f"s2fast bench: {r['model']} ({r['pipeline']}, {r['blocks']} blocks) on {d['device']} ({d['name']}), "
        f"{d['dtype']}",
        f"{r['steps']} steps, λ={r['guidance']:g}, ω={r['omega']:g}, drop ratio {r['drop_ratio']:g}, seed {r['seed']}, "
        f"{r['rounds']} interleaved rounds; prompt {r['prompt']!r}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items() if v),
        "",
        head,
    ]
    for name, c in r["cases"].items():
        peak = "—" if c["peak_memory_mib"] is None else f"{c['peak_memory_mib']:.0f}"
        spread = f"({min(c['ratios']):.2f}–{max(c['ratios']):.2f})"
        line = f"{name:<22}{c['ms_per_step']:>10.1f}{c['ratio']:>9.3f}{spread:>21}{c['block_row_floor']:>17.3f}{peak:>10}"
        if has_gpu:
            g = c["gpu"] or {}
            line += "".join(f"{g[k]:>{w}.0f}" if k in g else f"{'—':>{w}}"
                            for k, w in (("power_w", 7), ("sm_clock_mhz", 8), ("utilisation_pct", 8)))
        lines.append(line)
    lines += [
        "columns: ms/step = the case's median step over all its calls; vs CFG = the median over rounds of the case's "
        "step time ÷ stock CFG's in the same round, with its range (load that changes between rounds moves the "
        "ms/step medians apart but cancels within a round: the two columns need not agree); block-row floor = the "
        "block calls per step the case needs ÷ CFG's",
        *([f"  {r['sgg_missing']}"] if r.get("sgg_missing") else []),
        f"the blocks take {100 * r['block_share']:.0f} % of a stock CFG step: the lowest ratio a floor f allows is "
        f"1 + (f − 1) · {r['block_share']:.2f}",
        *(f"  !! {name}: this ratio is {c['warning']}" for name, c in r["cases"].items() if c["warning"]),
        f"masks dropped per step: {[tuple(m) for m in r['masks']]}",
        f"largest |s2fast S² − naive S²| over the images: {r['s2_difference']:.3g} (batch-size rounding; S² moved "
        f"them by up to {r['s2_effect']:.3g} from CFG)",
    ]
    return "\n".join(lines)
