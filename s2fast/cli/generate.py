"""``s2fast generate``: one image per prompt with the chosen method, written as it finishes.

Per prompt i (stem ``NNNNN-words-of-the-prompt``): ``stem.png`` (with ``--compare``: ``stem-cfg.png``,
``stem-<method>.png`` and ``stem-compare.png``, CFG left) and ``stem.json``, the prompt's record (seed, per-step
and total times, S² masks), written last: a prompt is done when its record exists and matches the run's settings,
which is what makes ``--prompts`` resumable and lets a rerun with other settings refuse to mix them in one folder.
``run.json`` (settings, versions, device, every record) is rewritten by the main process at the end.

Under ``accelerate launch`` / ``torchrun`` the pending prompts are split between the processes (contiguous slices,
each prompt in exactly one), and every file is created exclusively: a second writer would fail, not overwrite.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from tqdm.auto import tqdm

from .errors import UserError
from .models import family_of, load_pipeline, resolve_device, resolve_dtype, sibling
from .runtime import Processes, device_record, versions
from .sampling import attach, sample_methods

SETTINGS = ("model", "method", "compare", "omega", "drop_ratio", "skip_blocks", "skip_scale", "steps", "guidance", "seed",
            "negative_prompt", "height", "width", "frames", "dtype", "offload")


@dataclass
class Job:
    index: int
    prompt: str
    seed: int
    stem: str

    def files(self, methods: List[str], compare: bool) -> Dict[str, str]:
        if not compare:
            return {methods[0]: f"{self.stem}.png"}
        return {**{m: f"{self.stem}-{m}.png" for m in methods}, "compare": f"{self.stem}-compare.png"}


def read_prompts(args) -> List[str]:
    if args.prompts is None:
        if not args.prompt.strip():
            raise UserError("--prompt is empty")
        return [args.prompt]
    try:
        with open(args.prompts, encoding="utf-8") as f:
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
    prompts = read_prompts(args)
    processes = Processes(args.device)
    if args.parallel == "branch" and processes.count not in (2, 3):
        raise UserError(f"--parallel branch shares every step between 2 or 3 processes (torchrun --nproc_per_node 2 "
                        f"or 3); this run has {processes.count}")
    device = resolve_device(processes.device(args.device))
    dtype = resolve_dtype(args.dtype, device)
    with processes.main_first():
        pipe = load_pipeline(args.model, dtype)
    family = prepare(pipe, args, device)

    settings = {name: getattr(args, name) for name in SETTINGS}
    settings["skip_blocks"] = list(args.skip_blocks)  # as JSON stores it: a resumed run compares equal
    settings.update(guidance=family.guidance(pipe, args), steps=family.steps(pipe, args), pipeline=type(pipe).__name__,
                    dtype=str(dtype).replace("torch.", ""))  # the values used, not "auto" or "the pipeline's"
    jobs = [Job(i, p, args.seed + i, f"{i:05d}-{_slug(p)}") for i, p in enumerate(prompts)]
    for job in jobs:  # every prompt's conditioning checked before anything runs (a bad class name fails at once)
        family.condition(pipe, job.prompt)
    methods = ["cfg", args.method] if args.compare else [args.method]
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {args.out}: {e.strerror or e}") from None
    pending = [job for job in jobs if not _done(args.out, job, settings)]
    processes.barrier()  # every process has listed what is done before any writes
    mine = pending if args.parallel == "branch" else processes.split(pending)
    if processes.is_main and len(pending) < len(jobs):
        print(f"s2fast: {len(jobs) - len(pending)} of {len(jobs)} prompts already done in {args.out}; skipping them")

    pipes = method_pipelines(pipe, methods, args)
    try:
        with tqdm(total=len(mine), desc=f"generate ({args.method}{', compare' if args.compare else ''})",
                  unit="prompt", disable=not processes.is_main) as bar:
            for job in mine:
                _generate(pipes, family, args, job, methods, settings, device, processes)
                bar.update()
    except BaseException:
        if processes.count == 1:  # a partial batch keeps what finished, and run.json lists it
            _write_run_json(args, jobs, settings, device, dtype, processes)
        raise
    processes.barrier()
    if processes.is_main:
        _write_run_json(args, jobs, settings, device, dtype, processes)
        print(f"s2fast: {args.out} holds the images of {len(jobs)} prompt{'s' if len(jobs) > 1 else ''} and run.json")


def prepare(pipe, args, device: torch.device):
    """Check the options against ``pipe``'s family, put it on ``device`` (or under offload), quiet its progress bar
    and turn autograd off; returns the family (generate and bench share this set-up)."""
    family = family_of(pipe)
    family.check_options(pipe, args)
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
        with open(path) as f:
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


def _generate(pipes: Dict, family, args, job: Job, methods: List[str], settings: Dict, device, processes) -> None:
    files = job.files(methods, args.compare)
    writes = args.parallel != "branch" or processes.is_main  # branch: every process computes, the main one writes
    leftovers = [*files.values(), f"{job.stem}.json"] if writes else []  # of an earlier attempt that did not finish
    for name in leftovers:
        _remove(os.path.join(args.out, name))
    kwargs = family.call_kwargs(pipes[methods[-1]], args, job.prompt)
    runs = sample_methods(pipes, methods, args, kwargs, job.seed, device,
                          where=f"prompt {job.index} ({job.stem}); earlier outputs are kept")
    images = {m: run.output.images[0] for m, run in runs.items()}
    if not writes:
        return
    for method in methods:
        _save_png(images[method], os.path.join(args.out, files[method]))
    if args.compare:
        _save_png(side_by_side([images[m] for m in methods]), os.path.join(args.out, files["compare"]))
    record = {"index": job.index, "prompt": job.prompt, "seed": job.seed, "files": files, "settings": settings,
              "runs": {m: run.record() for m, run in runs.items()}, "process": processes.index, "device": str(device),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_exclusive(os.path.join(args.out, f"{job.stem}.json"), json.dumps(record, indent=1).encode())


def side_by_side(images, gap: int = 4):
    """The images in a row (CFG first), on a white background, ``gap`` pixels apart."""
    from PIL import Image

    images = [im.convert("RGB") for im in images]
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    canvas = Image.new("RGB", (width, max(im.height for im in images)), "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width + gap
    return canvas


def _save_png(image, path: str) -> None:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    _write_exclusive(path, buffer.getvalue())


def _write_exclusive(path: str, data: bytes) -> None:
    """Write ``data`` to ``path``, which must not exist: written to a temporary name, then linked into place
    (atomic, and a second writer of the same path fails instead of overwriting)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.link(tmp, path)
    except FileExistsError:
        raise UserError(f"{path} was written by another process of this run (prompts overlap)") from None
    except OSError as e:  # a full disk, a folder that vanished
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        _remove(tmp)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_run_json(args, jobs: List[Job], settings: Dict, device, dtype, processes) -> None:
    records = []
    for job in jobs:
        try:
            with open(os.path.join(args.out, f"{job.stem}.json")) as f:
                records.append(json.load(f))
        except (OSError, ValueError):
            pass  # not finished (a process failed): run.json lists what is there
    run = {"settings": {k: v for k, v in settings.items()}, "prompts": len(jobs), "finished": len(records),
           "versions": versions(), "device": device_record(device, dtype, processes),
           "total_time_s": sum(r["total_time_s"] for rec in records for r in rec["runs"].values()),
           "images": records}
    path = os.path.join(args.out, "run.json")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(run, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)
