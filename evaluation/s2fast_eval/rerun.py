"""Rerun the quality claims' commands two at a time, time each one, and check the results against committed ones.

    PYTHONPATH=evaluation .venv/bin/python -m s2fast_eval.rerun --root /tmp/quality [--only step_300] [--check]

Every table that README.md and benchmarks/quality/README.md quote from the paired digits frontiers (checkpoints at
training steps 300, 450 and 900, 8 seeds × 200 samples) and the toy premise test comes from the commands in
:data:`COMMANDS`. ``--root`` is where their output folders go (``ROOT/digits/paired/step_N``,
``ROOT/toys/alignment``…): the default is a scratch folder, so a rerun never overwrites the committed results
unless it is pointed at benchmarks/quality. Each command runs with one torch thread (OMP_NUM_THREADS=1, as every
recorded run did; the results do not depend on it) and ``--jobs`` of them at once; then ``paired`` and ``report``
run per checkpoint. ``ROOT/times.md`` lists each command with its wall time and CPU time. ``--check`` compares every
per-seed number and every saved feature of the rerun with the committed folder beside it and names any that differ.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

COMMITTED = Path("benchmarks/quality")
FRONTIER = "s2fast_eval.digits.frontier"
SEEDS = "0,1,2,3,4,5,6,7"


@dataclass(frozen=True)
class Command:
    folder: str            # the output folder, relative to the root (and to benchmarks/quality when committed)
    module: str
    args: Tuple[str, ...]  # everything but the output folder (and, for frontiers, checkpoint / samples / seeds / steps)

    def argv(self, root: Path) -> List[str]:
        out = str(root / self.folder)
        if self.module != FRONTIER:
            return ["-m", self.module, "--out", out, *self.args]
        step = Path(self.folder).name
        return ["-m", FRONTIER, "run", "--checkpoint", str(COMMITTED / "digits/checkpoints" / step), "--out", out,
                "--samples", "200", "--seeds", SEEDS, "--steps", "16", *self.args]


def _shown(argv: Sequence[str]) -> str:
    """A command line as a reader would type it (from the repository root, PYTHONPATH=evaluation)."""
    return "python " + shlex.join(argv)


def _frontier(step: int, flags: str) -> Command:
    return Command(f"digits/paired/step_{step}", FRONTIER, tuple(shlex.split(flags)))


_PAST = "--s2-intervals full"
# The order is the longest first, so that two workers finish close together.
COMMANDS: Tuple[Command, ...] = (
    _frontier(450, "--families none,cfg --lams 1.5,2,2.5,3,3.5,4 --floor"),
    _frontier(300, "--families none,cfg --lams 1.5,2,2.5,3 --floor"),
    _frontier(900, "--families none,cfg --lams 1.5,2,3 --floor"),
    Command("toys/alignment", "s2fast_eval.quality.toy_alignment", ("--mixture", "2d")),
    _frontier(450, f"--families s2 --family-lams 3,4 --omegas 0.25,0.5 {_PAST} --tag _past"),
    _frontier(450, "--families slg --family-lams 3,4 --skip-scales 0.25,0.5 --tag _past"),
    _frontier(450, "--families sgg --family-lams 3,4 --skip-scales 0.25,0.5 --tag _past"),
    _frontier(900, f"--families s2,slg --family-lams 2.5 --omegas 0.25,0.5 --skip-scales 0.25,0.5 {_PAST} --tag _past25"),
    _frontier(300, f"--families s2,slg,sgg --family-lams 3 --omegas 0.5 --skip-scales 0.5 {_PAST} --tag _past"),
    _frontier(300, f"--families s2,slg,sgg --family-lams 3 --omegas 0.25 --skip-scales 0.25 {_PAST} --tag _past2"),
    _frontier(300, "--families naive --family-lams 1.5 --omegas 0.5"),
    _frontier(450, "--families naive --family-lams 1.5 --omegas 0.5"),
    _frontier(900, "--families cfg --lams 1.75,2.25,2.5 --tag _fine"),
    _frontier(900, "--families sgg --family-lams 2,2.5 --skip-scales 0.25,0.5 --tag _past2"),
    _frontier(300, f"--families s2 --family-lams 4 --omegas 0.25,0.5 {_PAST} --tag _past4"),
    _frontier(300, "--families slg --family-lams 4 --skip-scales 0.25,0.5 --tag _past4"),
    _frontier(300, "--families sgg --family-lams 4 --skip-scales 0.25,0.5 --tag _past4"),
    _frontier(900, f"--families s2,slg --family-lams 2 --omegas 0.5 --skip-scales 0.5 {_PAST} --tag _past"),
    _frontier(900, f"--families s2,slg --family-lams 2 --omegas 0.25 --skip-scales 0.25 {_PAST} --tag _past2"),
    Command("toys/alignment_1d", "s2fast_eval.quality.toy_alignment", ("--mixture", "1d")),
    _frontier(300, "--families cfg --lams 3.5,4 --tag _hi"),
    _frontier(300, f"--families s2 --family-lams 1.5 --omegas 0.5 {_PAST}"),
    _frontier(450, f"--families s2 --family-lams 1.5 --omegas 0.5 {_PAST}"),
    _frontier(900, f"--families s2 --family-lams 1.5 --omegas 0.5 {_PAST}"),
    _frontier(300, "--families s2 --family-lams 1.5 --omegas 0.5 --s2-intervals central80 --tag _central80"),
    _frontier(450, "--families s2 --family-lams 1.5 --omegas 0.5 --s2-intervals central80 --tag _central80"),
)


# glibc's malloc returns every large block (over 128 kB by default) to the kernel when it is freed and maps it
# again at the next allocation, so each step's activations cost page faults: a fifth of a frontier's CPU time was
# system time. Raising the thresholds keeps the blocks in the process; the results are the same bit for bit (the
# arithmetic does not change), and a digits setting took about 0.82 of the CPU time (benchmarks/quality/README.md,
# "Rerunning the paired set"). --malloc-default switches it off, to measure it.
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20),
                 "MALLOC_TOP_PAD_": str(64 << 20)}


def _run(argv: Sequence[str], log: Path, malloc_tuning: bool = True) -> Dict:
    """One command in its own process; wall time, and CPU time (user + sys) from the kernel's accounting of it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": "evaluation", **(MALLOC_TUNING if malloc_tuning else {})}
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    return {"command": _shown(argv), "returncode": proc.returncode,
            "wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "log": str(log)}


def run(commands: Sequence[Command], root: Path, jobs: int, malloc_tuning: bool = True) -> List[Dict]:
    """The commands ``jobs`` at a time in the given order, then ``paired`` and ``report`` per frontier folder."""
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(jobs) as pool, tqdm(total=len(commands), desc="quality commands", unit="cmd") as bar:
        futures = [pool.submit(_run, c.argv(root), logs / f"{i:02d}_{Path(c.folder).name}.log", malloc_tuning)
                   for i, c in enumerate(commands)]
        records = []
        for f in futures:
            records.append(f.result())
            bar.update(1)
    for folder in sorted({c.folder for c in commands if c.module == FRONTIER}):
        out, name = str(root / folder), Path(folder).name
        records.append(_run(["-m", FRONTIER, "paired", "--out", out, "--bootstrap", "400"], logs / f"paired_{name}.log",
                            malloc_tuning))
        records.append(_run(["-m", FRONTIER, "report", "--out", out], logs / f"report_{name}.log", malloc_tuning))
    return records


def times_markdown(records: Sequence[Dict], jobs: int, wall_s: float) -> str:
    lines = [f"{len(records)} commands, {jobs} at a time, one torch thread each: {wall_s / 60:.1f} min in all "
             f"(CPU {sum(r['cpu_s'] for r in records) / 60:.1f} min).", "",
             "| command | exit | wall min | CPU min |", "|---|---|---|---|"]
    for r in records:
        lines.append(f"| `{r['command']}` | {r['returncode']} | {r['wall_s'] / 60:.1f} | {r['cpu_s'] / 60:.1f} |")
    return "\n".join(lines) + "\n"


# --- checking a rerun against the committed results ---------------------------------------------------------------
_VOLATILE = {"seconds", "train_seconds", "meta", "args"}  # times, and records of the command (its --out differs)


def _differences(a, b, path: str, rtol: float) -> List[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - _VOLATILE
        return [d for k in sorted(keys, key=str) for d in _differences(a.get(k), b.get(k), f"{path}.{k}", rtol)]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} entries against {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]", rtol)]
    if isinstance(a, float) and isinstance(b, float):
        same = (a != a and b != b) or abs(a - b) <= rtol * max(abs(a), abs(b))
        return [] if same else [f"{path}: {a!r} against {b!r}"]
    return [] if a == b else [f"{path}: {a!r} against {b!r}"]


def compare_folders(rerun: Path, committed: Path, rtol: float = 0.0) -> List[str]:
    """Every JSON number (times and command records aside) and every saved array of ``rerun`` against the
    same-named file in ``committed``; a file the committed folder lacks is reported too."""
    problems = []
    for path in sorted(rerun.glob("*.json")):
        ref = committed / path.name
        if not ref.exists():
            problems.append(f"{ref}: not committed")
            continue
        problems += _differences(json.loads(path.read_text()), json.loads(ref.read_text()), path.name, rtol)
    for path in sorted(rerun.glob("*.npz")):
        ref = committed / path.name
        if not ref.exists():
            problems.append(f"{ref}: not committed")
            continue
        with np.load(path) as a, np.load(ref) as b:
            for key in sorted(set(a.files) | set(b.files)):
                if key not in a.files or key not in b.files or not np.array_equal(a[key], b[key]):
                    problems.append(f"{path.name}[{key}] differs")
    return problems


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m s2fast_eval.rerun", description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="/tmp/s2fast-quality-rerun",
                   help="where the output folders go (default: a scratch folder; benchmarks/quality overwrites the "
                        "committed results)")
    p.add_argument("--jobs", type=int, default=2, help="commands at once (default 2: one per core of a 2-core machine)")
    p.add_argument("--only", default="", help="comma-separated output folder names to rerun (e.g. step_300,alignment)")
    p.add_argument("--check", action="store_true", help="compare the results with benchmarks/quality's afterwards")
    p.add_argument("--rtol", type=float, default=0.0,
                   help="relative tolerance of --check (default 0: one torch thread on the same torch reproduces "
                        "every number bit for bit; another CPU or torch version may sum in another order)")
    p.add_argument("--malloc-default", action="store_true",
                   help="leave glibc's malloc thresholds at their defaults (slower by about a fifth; same results)")
    p.add_argument("--list", action="store_true", help="print the commands and stop")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    names = {Path(c.folder).name for c in COMMANDS}
    args.only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(args.only) - names)
    if unknown:
        p.error(f"--only names no output folder: {', '.join(unknown)} (the folders: {', '.join(sorted(names))})")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    root = Path(args.root)
    if root.resolve() == COMMITTED.resolve() and args.check:
        raise SystemExit("--check compares a rerun with benchmarks/quality: give --root another folder")
    commands = [c for c in COMMANDS if not args.only or Path(c.folder).name in args.only]
    if args.list:
        print("\n".join(_shown(c.argv(root)) for c in commands))
        return
    start = time.perf_counter()
    records = run(commands, root, args.jobs, malloc_tuning=not args.malloc_default)
    (root / "times.md").write_text(times_markdown(records, args.jobs, time.perf_counter() - start))
    (root / "times.json").write_text(json.dumps(records, indent=1))
    failed = [r for r in records if r["returncode"] != 0]
    print((root / "times.md").read_text())
    if args.check:
        for folder in sorted({c.folder for c in commands}):
            problems = compare_folders(root / folder, COMMITTED / folder, args.rtol)
            print(f"{folder}: " + ("the same as committed" if not problems else f"{len(problems)} differences"))
            for line in problems[:20]:
                print("   ", line)
            failed += problems
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
