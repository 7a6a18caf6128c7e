"""``s2fast generate``: one image or video per prompt with the chosen method, written as it finishes.

Per prompt i (stem ``NNNNN-words-of-the-prompt``): ``stem.png`` (a video: ``stem.mp4`` and its still
``stem.png``, a strip of frames; with ``--compare``: ``stem-cfg.*``, ``stem-<method>.*`` and ``stem-compare.*``,
CFG left, labelled) and ``stem.json``, the prompt's record (seed, per-step and total times, S² masks), written last:
a prompt is done when its record exists and matches the run's settings, which is what makes ``--prompts``
resumable and lets a rerun with other settings refuse to mix them in one folder. ``run.json`` (settings, versions,
device, every record) is rewritten by the main process at the end, and after a failure.

Everything that can be known before the weights load is checked first: the prompts file, the input files, the
model's class and options (model_index.json), class names, the video extra, and whether ``--out`` can be written.

Under ``accelerate launch`` / ``torchrun`` the pending prompts are split between the processes (contiguous slices,
each prompt in exactly one), and every file is created exclusively: a second writer would fail, not overwrite.

:func:`sample` is the sampling step on its own (a loaded pipeline, a prompt, the options; the methods from the same
noise, with per-step times and masks); :func:`compare` calls it for CFG and one method, for programs such as a UI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from tqdm.auto import tqdm

from . import media, outputs
from .errors import UserError
from .families import ModelInfo, family_named, family_of
from .methods import METHODS, method_label, settings_of_method
from .models import inspect_model, load_pipeline, resolve_device, resolve_dtype, sibling
from .runtime import Processes, StepClock

SETTINGS = ("model", "method", "compare", "omega", "drop_ratio", "steps", "guidance", "guidance_2", "seed",
            "negative_prompt", "height", "width", "frames", "fps", "image", "mask", "video", "strength", "dtype",
            "offload", "cache", "correction_every")


@dataclass
class Job:
    index: int
    prompt: str
    seed: int
    stem: str

    def files(self, methods: List[str], compare: bool, video: bool) -> Dict[str, str]:
        """Output name by key: a method's picture (a video's MP4), ``<method>-still`` for a video's still, and
        ``compare`` (``compare-still``) under --compare."""
        keys = [*methods, "compare"] if compare else methods[:1]
        files = {}
        for key in keys:
            base = self.stem if not compare else f"{self.stem}-{key}"
            files[key] = f"{base}.mp4" if video else f"{base}.png"
            if video:
                files[f"{key}-still"] = f"{base}.png"
        return files


@dataclass
class Sample:
    """One method's output for one prompt."""

    method: str
    output: Any                    # a PIL image, or a video's frames (a list of PIL images)
    step_times_s: List[float]      # per denoising step; the first includes the call's set-up
    total_time_s: float            # the whole call (encoding, steps, decoding)
    trace: Optional[List]          # the blocks each step's sub-network dropped; None for stock CFG
    steps: Optional[List] = None   # per step [blocks, correction] (s2fast.trace_steps); None for stock CFG


def read_prompts(args) -> List[str]:
    if args.prompts is None:
        if not args.prompt.strip():
            raise UserError("--prompt is empty")
        return [args.prompt]
    try:
        # utf-8-sig: a byte-order mark (as some editors write) is not part of the first prompt
        with open(args.prompts, encoding="utf-8-sig") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise UserError(f"cannot read --prompts {args.prompts}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"--prompts {args.prompts} is not UTF-8 text") from None
    if not prompts:
        raise UserError(f"--prompts {args.prompts} holds no prompt (one per line)")
    return prompts


def _slug(prompt: str) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return words[:40].rstrip("-") or "prompt"


def run(args) -> None:
    # --- what can be checked before any weights load
    prompts = read_prompts(args)
    media.check_input_files(args)
    info = inspect_model(args.model)
    family = family_named(info.class_name)
    family.check_options(info, args)
    jobs = [Job(i, p, args.seed + i, f"{i:05d}-{_slug(p)}") for i, p in enumerate(prompts)]
    for job in jobs:  # every prompt's conditioning (a bad class name fails at once)
        family.condition(info, job.prompt)
    if family.video:
        media.require_video_extra()
    inputs = media.read_inputs(args, family)
    created = not os.path.exists(args.out)
    outputs.check_writable(args.out)
    try:
        _run(args, info, family, jobs, inputs)
    except BaseException:
        if created:  # a run that failed before writing anything leaves no empty folder behind
            outputs.remove_if_empty(args.out)
        raise


def _run(args, info: ModelInfo, family, jobs: List[Job], inputs: Dict) -> None:
    processes = Processes(args.device)
    if args.parallel == "branch" and processes.count not in (2, 3):
        raise UserError(f"--parallel branch shares every step between 2 or 3 processes (torchrun --nproc_per_node 2 "
                        f"or 3); this run has {processes.count}")
    device = resolve_device(processes.device(args.device))
    dtype = resolve_dtype(args.dtype, device)
    with processes.main_first():
        pipe = load_pipeline(info, dtype)
    prepare(pipe, args, device)
    for job in jobs:  # again with what loading revealed (a hub model's number of classes)
        family.condition(ModelInfo.of_pipeline(args.model, pipe), job.prompt)

    settings = run_settings(pipe, family, args, info, dtype)
    methods = ["cfg", args.method] if args.compare else [args.method]
    pending = [job for job in jobs if not _done(args.out, job, settings)]
    processes.barrier()  # every process has listed what is done before any writes
    mine = pending if args.parallel == "branch" else processes.split(pending)
    if processes.is_main and len(pending) < len(jobs):
        print(f"s2fast: {len(jobs) - len(pending)} of {len(jobs)} prompts already done in {args.out}; skipping them")

    pipes = method_pipelines(pipe, methods, args)
    stems = [job.stem for job in jobs]
    try:
        with tqdm(total=len(mine), desc=f"generate ({args.method}{', compare' if args.compare else ''})",
                  unit="prompt", disable=not processes.is_main) as bar:
            for job in mine:
                _generate(pipes, family, args, job, settings, device, processes, inputs)
                bar.update()
    except BaseException:
        if processes.count == 1:  # a partial batch keeps what finished, and run.json lists it
            try:
                outputs.write_run_json(args.out, stems, settings, device, dtype, processes)
            except UserError:
                pass  # the error that ended the run is the one line to show; the records are on disk
        raise
    processes.barrier()
    if processes.is_main:
        outputs.write_run_json(args.out, stems, settings, device, dtype, processes)
        what = "videos" if family.video else "images"
        print(f"s2fast: {args.out} holds the {what} of {len(jobs)} prompt{'s' if len(jobs) > 1 else ''} and run.json")


def run_settings(pipe, family, args, info: ModelInfo, dtype) -> Dict:
    """The settings as used (not "auto" or "the pipeline's"): a resumed run compares them with each record's.
    SGG's skip blocks and scale appear only where the method is SGG."""
    settings = {name: getattr(args, name, None) for name in SETTINGS}
    settings.update(settings_of_method(args, pipe))
    settings.update(guidance=family.guidance(pipe, args), steps=family.steps(pipe, args), pipeline=type(pipe).__name__,
                    dtype=str(dtype).replace("torch.", ""), fps=family.fps(info, args))
    return json.loads(json.dumps(settings))  # as JSON stores it (tuples as lists): a resumed run compares equal


def prepare(pipe, args, device: torch.device):
    """Check the options against the loaded ``pipe`` (they were checked from its model_index.json already), put it
    on ``device`` (or under offload), quiet its progress bar and turn autograd off; returns the family (generate
    and bench share this set-up)."""
    family = family_of(pipe)
    family.check_options(ModelInfo.of_pipeline(args.model, pipe), args)
    place(pipe, device, args.offload)
    pipe.set_progress_bar_config(disable=True)
    torch.set_grad_enabled(False)
    return family


def place(pipe, device: torch.device, offload: Optional[str]) -> None:
    if offload == "model":
        try:
            pipe.enable_model_cpu_offload(device=device)
        except (ImportError, ValueError, RuntimeError) as e:
            raise UserError(f"--offload model: {str(e).splitlines()[0]}") from None
    else:
        pipe.to(device)


def _done(out: str, job: Job, settings: Dict) -> bool:
    path = os.path.join(out, f"{job.stem}.json")
    if not os.path.exists(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False  # unreadable: redo it
    if record.get("settings") != settings or record.get("prompt") != job.prompt:
        raise UserError(f"{out} already holds {job.stem}.json from other settings or another prompt; "
                        "use another --out (or delete it) to sample with these")
    return all(os.path.exists(os.path.join(out, f)) for f in record["files"].values())


def method_pipelines(pipe, methods: List[str], args) -> Dict:
    """One pipeline per method, each set up once: the last method on ``pipe``, the others on siblings sharing its
    models (so an S² pipeline is never unwrapped between prompts, which would release its block graphs). Under
    model offload (whose hooks belong to ``pipe``, and which uses no block graphs) every method shares ``pipe`` and
    is attached before each call."""
    if args.offload:
        return {m: pipe for m in methods}
    pipes = {m: (pipe if m == methods[-1] else sibling(pipe)) for m in methods}
    for m, p in pipes.items():
        attach(m, p, args)
    return pipes


def attach(method: str, pipe, args) -> None:
    """Set ``pipe`` up for ``method``; a config the model cannot serve (SGG's blocks beyond its depth) is one line."""
    try:
        METHODS[method].attach(pipe, args)
    except ValueError as e:
        raise UserError(f"--method {method}: {str(e).strip().splitlines()[0]}") from None


def sample(pipes: Dict, family, args, prompt: str, seed: int, device, inputs: Optional[Dict] = None,
           where: str = "") -> Dict[str, Sample]:
    """Each method of ``pipes`` (method name -> pipeline set up by ``method_pipelines``) on ``prompt`` from the
    same noise (``seed``), in order; ``inputs``: the images, mask or video (media.read_inputs). ``where`` names the
    prompt in an out-of-memory message."""
    import s2fast

    methods = list(pipes)
    kwargs = family.call_kwargs(pipes[methods[-1]], args, prompt, inputs)
    samples = {}
    for method in methods:
        pipe = pipes[method]
        if args.offload:  # one pipeline for every method (see method_pipelines): set it up for this one
            attach(method, pipe, args)
        clock = StepClock(pipe, device)
        generator = torch.Generator(device="cpu").manual_seed(seed)  # the same noise for every method
        try:
            with clock as timing:
                result = pipe(**kwargs, generator=generator, output_type="pil", **timing)
        except torch.OutOfMemoryError:
            raise UserError(f"out of memory on {device}{where}; earlier outputs are kept (try --offload model, a "
                            "smaller --height/--width or --dtype bf16)") from None
        except (ValueError, TypeError) as e:  # the pipeline's own refusal of an option value
            raise UserError(f"{type(pipe).__name__} refused the options: {str(e).strip().splitlines()[0]}") from None
        wrapped = s2fast.config_of(pipe) is not None
        trace = s2fast.trace(pipe) if wrapped else None
        steps = [None if r is None else [r.blocks, r.correction] for r in s2fast.trace_steps(pipe)] if wrapped else None
        output = result.frames[0] if family.video else result.images[0]
        samples[method] = Sample(method, output, clock.step_times, clock.total,
                                 None if trace is None else [_jsonable(m) for m in trace], steps)
    return samples


def options(**overrides) -> argparse.Namespace:
    """``generate``'s options with their defaults (as the parser gives them), ``overrides`` applied:
    ``options(model="digits", omega=0.5, steps=10)``. Unknown names raise TypeError."""
    from . import build_parser

    args = build_parser().subcommands["generate"].parse_args(["MODEL", "--prompt", "-", "--out", "-"])
    for name, value in overrides.items():
        if not hasattr(args, name):
            raise TypeError(f"options: generate has no option {name!r}")
        setattr(args, name, value)
    return args


def compare(pipe, prompt: str, *, method: str = "s2", seed: int = 0, device=None, inputs: Optional[Dict] = None,
            **overrides) -> Dict[str, Sample]:
    """CFG and ``method`` sampled from the same noise on a loaded ``pipe`` (any pipeline the command serves, on its
    device): {"cfg": Sample, method: Sample}, the path ``generate --compare`` takes. ``overrides`` are generate's
    options by their Python names (omega, drop_ratio, skip_blocks, skip_scale, steps, guidance, height, ...).
    ``pipe`` is left wrapped for ``method``; CFG runs on a sibling pipeline over the same models."""
    if method == "cfg" or method not in METHODS:
        raise UserError(f"compare: method must be one of {', '.join(m for m in METHODS if m != 'cfg')}, got {method!r}")
    args = options(method=method, compare=True, seed=seed, **overrides)
    family = prepare_checked(pipe, args)
    device = device or pipe.device
    return sample(method_pipelines(pipe, ["cfg", method], args), family, args, prompt, seed, torch.device(device),
                  inputs)


def prepare_checked(pipe, args):
    """The family of a loaded ``pipe`` with ``args`` checked against it (no placement: the caller's pipe stays)."""
    family = family_of(pipe)
    family.check_options(ModelInfo.of_pipeline(args.model, pipe), args)
    torch.set_grad_enabled(False)
    return family


def _generate(pipes: Dict, family, args, job: Job, settings: Dict, device, processes, inputs: Dict) -> None:
    methods = list(pipes)
    files = job.files(methods, args.compare, family.video)
    writes = args.parallel != "branch" or processes.is_main  # branch: every process computes, the main one writes
    for name in [*files.values(), f"{job.stem}.json"] if writes else []:  # leftovers of an unfinished attempt
        outputs.remove(os.path.join(args.out, name))
    samples = sample(pipes, family, args, job.prompt, job.seed, device, inputs, where=f" at prompt {job.index} "
                     f"({job.stem})")
    if not writes:
        return
    labels = [method_label(m, args) for m in methods]
    path = lambda key: os.path.join(args.out, files[key])  # noqa: E731
    fps = settings["fps"]
    for m in methods[:1] if not args.compare else methods:
        _write_output(samples[m].output, path, m, family.video, fps)
    if args.compare:
        if family.video:
            both = media.video_side_by_side([samples[m].output for m in methods], labels)
        else:
            both = media.side_by_side([samples[m].output for m in methods], labels)
        _write_output(both, path, "compare", family.video, fps, labels=labels,
                      stills=[samples[m].output for m in methods])
    record = {"index": job.index, "prompt": job.prompt, "seed": job.seed, "files": files, "settings": settings,
              "runs": {m: {"total_time_s": s.total_time_s, "step_times_s": s.step_times_s, "trace": s.trace,
                  "steps": s.steps}
                       for m, s in samples.items()},
              "process": processes.index, "device": str(device),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    outputs.write_exclusive(os.path.join(args.out, f"{job.stem}.json"), json.dumps(record, indent=1).encode())


def _write_output(output, path, key: str, video: bool, fps, labels=None, stills=None) -> None:
    """A picture as PNG; a video as MP4 and its still beside it (for the compare video: the methods' stills side
    by side, labelled)."""
    if not video:
        outputs.write_exclusive(path(key), media.png_bytes(output))
        return
    target = path(key)
    outputs.write_exclusive(target, media.mp4_bytes(output, fps, f"{target}.{os.getpid()}.encoding.mp4"))
    still = media.still(output) if stills is None else media.side_by_side([media.still(s) for s in stills], labels)
    outputs.write_exclusive(path(f"{key}-still"), media.png_bytes(still))


def _jsonable(mask):
    return [_jsonable(m) for m in mask] if isinstance(mask, (tuple, list)) else int(mask)
