"""Run diffusers' fast pipeline tests three ways (stock, ω = 0, ω = 0.25), one junit file each, then compare.

    PYTHONPATH=evaluation python -m diffusers_suite.run --tests /tmp/diffusers-tests --out /tmp/suite-out

``--tests`` is a folder holding diffusers' ``tests/`` (extracted from a diffusers checkout, outside this
repository); the files run are FILES below (the supported pipelines' test files) unless ``--files`` names others.
Each way runs in its own pytest process from that folder, single-threaded (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .compare import compare, render

# The test files of the pipeline classes s2fast supports (s2fast/adapters/__init__.py), under tests/pipelines/.
FILES = (
    "stable_diffusion_3/test_pipeline_stable_diffusion_3.py",
    "stable_diffusion_3/test_pipeline_stable_diffusion_3_img2img.py",
    "stable_diffusion_3/test_pipeline_stable_diffusion_3_inpaint.py",
    "flux/test_pipeline_flux.py",
    "flux/test_pipeline_flux_img2img.py",
    "flux/test_pipeline_flux_inpaint.py",
    "flux/test_pipeline_flux_fill.py",
    "flux/test_pipeline_flux_kontext.py",
    "flux2/test_pipeline_flux2.py",
    "flux2/test_pipeline_flux2_klein.py",
    "wan/test_wan.py",
    "wan/test_wan_22.py",
    "wan/test_wan_22_image_to_video.py",
    "wan/test_wan_image_to_video.py",
    "wan/test_wan_video_to_video.py",
    "qwenimage/test_qwenimage.py",
    "qwenimage/test_qwenimage_edit_plus.py",
    "z_image/test_z_image.py",
    "dit/test_dit.py",
)
WAYS = (("stock", None), ("omega0", "0"), ("omega0.25", "0.25"))


def run_way(tests: Path, files, out: Path, name: str, omega, extra_path: str) -> dict:
    here = Path(__file__).resolve().parents[2]  # the repository root: its s2fast and evaluation/ win
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(here), str(here / "evaluation"), extra_path) if p))
    env.pop("S2FAST_SUITE_OMEGA", None)
    cmd = [sys.executable, "-m", "pytest", "-p", "diffusers_suite.plugin", "-p", "no:cacheprovider", "-q",
           f"--junitxml={out / (name + '.xml')}", *[f"tests/pipelines/{f}" for f in files]]
    if omega is not None:
        cmd.append(f"--s2fast-omega={omega}")
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        rc = subprocess.call(cmd, cwd=tests, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = round(time.perf_counter() - start, 1)
    summary = [line.strip() for line in open(out / f"{name}.log") if line.startswith("s2fast suite:")]
    return {"way": name, "omega": omega, "returncode": rc, "seconds": seconds, "wrapped": summary[-1:] or None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=Path, required=True, help="folder holding diffusers' tests/")
    parser.add_argument("--out", type=Path, required=True, help="folder for the junit files, logs and report")
    parser.add_argument("--files", nargs="*", default=list(FILES), help="test files under tests/pipelines/")
    parser.add_argument("--ways", nargs="*", default=[w for w, _ in WAYS], choices=[w for w, _ in WAYS])
    parser.add_argument("--extra-path", default=os.environ.get("S2FAST_SUITE_EXTRA_PATH", ""),
                        help="a folder added to PYTHONPATH: diffusers' test dependencies (parameterized, "
                             "requests_mock) where the environment lacks them")
    args = parser.parse_args(argv)
    if not (args.tests / "tests" / "pipelines").is_dir():
        parser.error(f"--tests {args.tests}: no tests/pipelines/ in it")
    args.out.mkdir(parents=True, exist_ok=True)
    timings = []
    for name, omega in WAYS:
        if name in args.ways:
            timings.append(run_way(args.tests, args.files, args.out, name, omega, args.extra_path))
            print(json.dumps(timings[-1]), flush=True)
    (args.out / "timings.json").write_text(json.dumps(timings, indent=1))
    report = render(compare(args.out))
    (args.out / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
