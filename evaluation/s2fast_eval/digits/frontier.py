"""Guidance frontiers on one digits checkpoint: Fréchet distance against accuracy (and improved precision/recall)
for CFG over a fine λ grid, S² (λ, ω, interval in steps or in noise levels), naive S², a fixed skip (SLG), SGG and
AutoGuidance, each over several seeds with common random numbers.

    python -m s2fast_eval.digits.frontier run --checkpoint C --families cfg,s2 --out DIR   # writes DIR/<family>.json
    python -m s2fast_eval.digits.frontier report --out DIR                              # DIR/results.md + frontier.png

    python -m s2fast_eval.digits.frontier paired --out DIR                              # DIR/paired.{md,json}

Split by family so that every command fits the time budget; ``report`` merges whatever families ``run`` wrote, and
``paired`` compares every setting with CFG seed by seed and image by image (s2fast_eval.digits.paired). Every method
samples from the same initial noise for a given seed; S² masks come from the same seed.

Metrics, per seed (in ``<family>.json``: the mean, the range and the standard error over seeds, and every seed's
values) and per image (``<family>.npz`` beside it: the judge's features in float16 and its predicted class, so that
``paired`` recomputes every metric on pooled or resampled images):

- accuracy: the judge reads the requested class;
- ``frechet``: Fréchet distance in the judge's features against the 4500 training images (the generator's and the
  judge's own training set: kept for comparison with the earlier tables, not a held-out measure);
- ``frechet_heldout`` and ``kid_heldout``: Fréchet distance and KID (unbiased, polynomial kernel, both sets
  divided by the reference's RMS coordinate) against the reference half of the 500 held-out digits (the first 25
  of each class), which neither model trained on;
- precision/recall: improved k-NN (k = 3) against a fixed, class-balanced set of training images of the same size
  as one seed's samples.

The real-data floor: ``floor.json`` scores held-out digits like samples at the same count for the training-set
metrics (sets of ``--samples`` drawn from all 500, as before), and for the held-out metrics the other half of the
held-out digits (the last 25 of each class, 250 images) against the reference half, so no image is on both sides.

Methods that are one family's config plus some keyword arguments (say an S2Config option) need no code:
``run --families s2 --config-kwargs '{"name": value}' --tag _name`` passes them to every setting's S2Config /
SGGConfig, names the settings ``s2[name=value] λ=… ω=…`` and gives them their own frontier in the reports.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm.auto import tqdm

import s2fast
from s2fast.config import S2Config
from s2fast.digits.classifier import DigitJudge, features_of, load_judge
from s2fast.digits.pipeline import DigitsFlowPipeline, balanced_labels, load_default_pipeline
from s2fast.sgg import SGGConfig

from ..quality.metrics import frechet_distance, gaussian_stats, kid, precision_recall, rms_coordinate
from .autoguidance import autoguided
from .data import heldout_halves, load_mnist, split
from .frontier_report import checkpoints_table, report
from .paired_report import paired_report

FAMILIES = ("none", "cfg", "s2", "naive", "slg", "sgg", "auto")
CENTRAL_80 = (0.1, 0.9)  # the paper's central 80 % of noise levels: σ runs from 1 to 0 in flow matching
PR_K = 3
KWARG_FAMILIES = ("s2", "naive", "slg", "sgg")  # the families whose settings are an S2Config or SGGConfig
COMMAND = "PYTHONPATH=evaluation python -m s2fast_eval.digits.frontier"  # from the repository root


@dataclass(frozen=True)
class Setting:
    """One point of a frontier. family: none (cond only), cfg, s2 (Eq. 4; ``sigma_interval`` None = every step),
    naive (Eq. 3, N = 4), slg (CFG + s (D_c − D_skip) at every step, block ``block``), sgg (CFG in the first half of
    the steps, skip-layer guidance with scale s in the second), auto (AutoGuidance against the weak checkpoint)."""

    family: str
    lam: float = 1.0
    omega: float = 0.0                # S²'s ω, or the skip scale s of slg / sgg
    sigma_interval: Optional[tuple] = None
    block: int = 3
    extra: Tuple[Tuple[str, object], ...] = ()  # more S2Config / SGGConfig keyword arguments, sorted by name

    @property
    def method(self) -> str:
        """The family, with the extra config arguments if any: ``s2[name=value]``."""
        if not self.extra:
            return self.family
        return f"{self.family}[{','.join(f'{k}={v}' for k, v in self.extra)}]"

    @property
    def name(self) -> str:
        if self.family == "none":
            return "none"
        if self.family in ("cfg", "auto"):
            return f"{self.family} λ={self.lam:g}"
        where = "" if self.sigma_interval is None else f" σ∈[{self.sigma_interval[0]:g},{self.sigma_interval[1]:g}]"
        return f"{self.method} λ={self.lam:g} ω={self.omega:g}{where}"

    def config(self, seed: int):
        extra = dict(self.extra)
        if self.family == "s2":
            return S2Config(**{"omega": self.omega, "seed": seed, "sigma_interval": self.sigma_interval, **extra})
        if self.family == "naive":
            return S2Config(**{"omega": self.omega, "seed": seed, "num_masks": 4, **extra})
        if self.family == "slg":
            return SGGConfig(**{"cfg_window": (0.0, 1.0), "skip_window": (0.0, 1.0), "skip_blocks": (self.block,),
                                "skip_scale": self.omega, **extra})
        if self.family == "sgg":
            return SGGConfig(**{"cfg_window": (0.0, 0.5), "skip_window": (0.5, 1.0), "skip_blocks": (self.block,),
                                "skip_scale": self.omega, **extra})
        return None


def settings(family: str, lams: Sequence[float], omegas: Sequence[float], skip_scales: Sequence[float],
             family_lams: Sequence[float], s2_intervals: Sequence[Optional[tuple]] = (None, CENTRAL_80),
             config_kwargs: Optional[dict] = None) -> List[Setting]:
    """The grid of one family: CFG and AutoGuidance over ``lams``; the others over ``family_lams``; S² at each of
    ``s2_intervals`` (None: every step). ``config_kwargs`` go to every setting's config (KWARG_FAMILIES only)."""
    # JSON has lists where the configs take tuples (block indices, windows)
    extra = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in (config_kwargs or {}).items()))
    if extra and family not in KWARG_FAMILIES:
        raise ValueError(f"config kwargs apply to {', '.join(KWARG_FAMILIES)} only, not {family}")
    if family == "none":
        return [Setting("none")]
    if family in ("cfg", "auto"):
        return [Setting(family, lam) for lam in lams]
    if family == "s2":
        return [Setting("s2", lam, w, where, extra=extra) for lam in family_lams for w in omegas
                for where in s2_intervals]
    if family == "naive":
        return [Setting("naive", lam, w, extra=extra) for lam in family_lams for w in omegas]
    return [Setting(family, lam, s, extra=extra) for lam in family_lams for s in skip_scales]


class Scorer:
    """Accuracy and Fréchet distance (the judge's, against its training images), Fréchet and KID against held-out
    digits, improved precision/recall against a real reference set."""

    def __init__(self, judge: DigitJudge, samples: int, seed: int = 1234):
        (train_x, train_y), (held_x, held_y) = split(*load_mnist())
        self.judge = judge
        self.reference = features_of(judge.model, _balanced_subset(train_x, train_y, samples, seed))[0]
        self.held_out = (held_x, held_y)
        ref, rest = heldout_halves(held_y)
        self.heldout_reference = features_of(judge.model, held_x[ref])[0]
        self.kid_scale = rms_coordinate(self.heldout_reference)  # both sides of every KID are divided by it
        self.heldout_stats = gaussian_stats(self.heldout_reference)
        self.heldout_floor_set = (held_x[rest], held_y[rest])

    def measure(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(features, predicted class) per image."""
        feats, logits = features_of(self.judge.model, images)
        return feats, logits.argmax(1)

    def score_features(self, feats: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        mean, cov = gaussian_stats(feats)
        return {"accuracy": float((predicted == labels).double().mean()),
                "frechet": frechet_distance(mean, cov, self.judge.ref_mean, self.judge.ref_cov),
                "frechet_heldout": frechet_distance(mean, cov, *self.heldout_stats),
                "kid_heldout": kid(feats / self.kid_scale, self.heldout_reference / self.kid_scale),
                **precision_recall(feats, self.reference, PR_K)}

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        return self.score_features(*self.measure(images), labels)

    def heldout_floor(self) -> Dict[str, float]:
        """The held-out half that is not the reference, against the reference half (250 against 250 images)."""
        x, y = self.heldout_floor_set
        feats, predicted = self.measure(x)
        mean, cov = gaussian_stats(feats)
        return {"n": len(x), "accuracy": float((predicted == y).double().mean()),
                "frechet_heldout": frechet_distance(mean, cov, *self.heldout_stats),
                "kid_heldout": kid(feats / self.kid_scale, self.heldout_reference / self.kid_scale)}

    def real_floor(self, samples: int, sets: int) -> List[Dict[str, float]]:
        """Held-out real digits scored like samples: ``sets`` class-balanced sets of ``samples`` images, as disjoint
        as the 500 held-out images allow (consecutive windows per class, wrapping round)."""
        x, y = self.held_out
        per_class = samples // 10
        out = []
        for s in range(sets):
            idx = []
            for c in range(10):
                rows = torch.nonzero(y == c).flatten()
                idx += [rows[(s * per_class + j) % len(rows)] for j in range(per_class)]
            idx = torch.stack(idx)
            feats, predicted = self.measure(x[idx])
            mean, cov = gaussian_stats(feats)
            out.append({"accuracy": float((predicted == y[idx]).double().mean()),
                        "frechet": frechet_distance(mean, cov, self.judge.ref_mean, self.judge.ref_cov),
                        **precision_recall(feats, self.reference, PR_K)})
        return out


def _balanced_subset(x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = [torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[: n // 10]] for c in range(10)]
    return x[torch.cat(idx)]


@torch.no_grad()
def generate(pipe: DigitsFlowPipeline, setting: Setting, labels: torch.Tensor, seed: int, steps: int,
             weak: Optional[torch.nn.Module]) -> torch.Tensor:
    """Images in [-1, 1] for ``labels``; one generator per call seeded with ``seed`` (the same noise per method)."""
    config = setting.config(seed)
    generator = torch.Generator().manual_seed(seed)
    s2fast.wrap(pipe, config) if config is not None else s2fast.unwrap(pipe)
    try:
        if setting.family == "auto":
            with autoguided(pipe, weak):
                images = pipe(labels, guidance_scale=setting.lam, generator=generator, num_inference_steps=steps,
                              output_type="pt").images
        else:
            images = pipe(labels, guidance_scale=setting.lam, generator=generator, num_inference_steps=steps,
                          output_type="pt").images
    finally:
        s2fast.unwrap(pipe)
    return images * 2 - 1


def summarise(per_seed: List[Dict[str, float]]) -> Dict[str, float]:
    """Mean over seeds, the range (``_spread``: max − min) and the standard error of the mean (``_se``: sample
    standard deviation / √n, None for one seed)."""
    out = {}
    n = len(per_seed)
    for key in per_seed[0]:
        values = [s[key] for s in per_seed]
        mean = sum(values) / n
        out[key] = mean
        out[key + "_spread"] = max(values) - min(values)
        out[key + "_se"] = (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5 if n > 1 else None
    return out


def save_images(path: str, names: List[str], seeds: List[int], labels: torch.Tensor,
                per_image: List[List[Tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """Every image's judge features (float16: the paired statistics need their spread, not their last digits) and
    predicted class, as arrays ``features`` (setting, seed, image, feature) and ``predicted`` (setting, seed,
    image), with the settings' names, the seeds and the requested labels."""
    np.savez_compressed(path, names=np.array(names), seeds=np.array(seeds), labels=labels.numpy().astype(np.int8),
                        features=np.stack([np.stack([f.numpy() for f, _ in row]) for row in per_image]).astype(np.float16),
                        predicted=np.stack([np.stack([p.numpy() for _, p in row]) for row in per_image]).astype(np.int8))


def run(args) -> None:
    pipe = load_default_pipeline(args.checkpoint)
    weak = load_default_pipeline(args.weak).transformer if args.weak else None
    if "auto" in args.families and weak is None:
        raise SystemExit("--families auto needs --weak (an earlier checkpoint)")
    judge = load_judge()
    scorer = Scorer(judge, args.samples)
    labels = balanced_labels(args.samples)
    os.makedirs(args.out, exist_ok=True)
    meta = {"checkpoint": args.checkpoint, "weak": args.weak, "samples": args.samples, "seeds": args.seeds,
            "steps": args.steps, "step": _training_step(args.checkpoint),
            "weak_step": _training_step(args.weak) if args.weak else None,
            "device": f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
                      f"{torch.get_num_threads()} threads"}
    if args.floor:
        rows = scorer.real_floor(args.samples, len(args.seeds))
        with open(os.path.join(args.out, "floor.json"), "w") as f:
            json.dump({"meta": meta, "per_set": rows, **summarise(rows), "heldout": scorer.heldout_floor()}, f,
                      indent=1)
    for family in args.families:
        grid = settings(family, args.lams, args.omegas, args.skip_scales, args.family_lams, args.s2_intervals,
                        args.config_kwargs if family in KWARG_FAMILIES else None)
        start, rows, images = time.perf_counter(), [], []
        for setting in tqdm(grid, desc=f"{family} ({os.path.basename(args.checkpoint.rstrip('/'))})", unit="setting"):
            per_seed, per_image, t0 = [], [], time.perf_counter()
            for seed in args.seeds:
                measured = scorer.measure(generate(pipe, setting, labels, seed, args.steps, weak))
                per_image.append(measured)
                per_seed.append(scorer.score_features(*measured, labels))
            images.append(per_image)
            rows.append({**asdict(setting), "extra": dict(setting.extra), "method": setting.method,
                         "name": setting.name, "seconds": round(time.perf_counter() - t0, 1),
                         "per_seed": per_seed, **summarise(per_seed)})
            save_images(os.path.join(args.out, f"{family}{args.tag}.npz"), [r["name"] for r in rows], args.seeds,
                        labels, images)
            # written after every setting, so a run stopped early keeps the settings it finished
            record = {"meta": {**meta, "family": family, "seconds": round(time.perf_counter() - start, 1),
                               "settings_planned": len(grid),
                               "command": f"{COMMAND} " + " ".join(args.argv)}, "rows": rows}
            name = f"{family}{args.tag}.json"
            with open(os.path.join(args.out, name), "w") as f:
                json.dump(record, f, indent=1)
        print(f"{family}: {len(rows)} settings in {record['meta']['seconds']:.0f} s -> {args.out}/{name}")


def _training_step(path: str) -> Optional[int]:
    try:
        with open(os.path.join(path, "training.json")) as f:
            record = json.load(f)
    except OSError:
        return None
    return record.get("step", record.get("args", {}).get("steps"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m s2fast_eval.digits.frontier", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    floats = lambda s: [float(v) for v in s.split(",") if v]  # noqa: E731
    r = sub.add_parser("run", help="sample and score some families on one checkpoint")
    r.add_argument("--checkpoint", required=True, help="a trained digits pipeline folder")
    r.add_argument("--weak", default=None, help="AutoGuidance's weak model: an earlier checkpoint's folder")
    r.add_argument("--families", default="none,cfg", help=f"comma-separated from {','.join(FAMILIES)}")
    r.add_argument("--out", required=True, help="folder for <family>.json")
    r.add_argument("--samples", type=int, default=200, help="samples per seed, a multiple of 10 (default 200)")
    r.add_argument("--seeds", default="0,1", help="comma-separated sampling seeds (default 0,1)")
    r.add_argument("--steps", type=int, default=16, help="Euler steps (default 16)")
    r.add_argument("--lams", type=floats, default=[1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0],
                   help="λ grid of CFG and AutoGuidance (default 1.25 to 3 by 0.25)")
    r.add_argument("--family-lams", type=floats, default=[1.5, 2.0], help="λ of S², naive, SLG, SGG (default 1.5,2)")
    r.add_argument("--omegas", type=floats, default=[0.1, 0.25, 0.5], help="S² / naive ω (default 0.1,0.25,0.5)")
    r.add_argument("--skip-scales", type=floats, default=[0.5, 1.0, 2.0], help="SLG / SGG scale s (default 0.5,1,2)")
    r.add_argument("--s2-intervals", default="full,central80",
                   help="S²'s placements: full (every step), central80 (σ in [0.1, 0.9]); default both")
    r.add_argument("--tag", default="", help="suffix of the output file names (<family><tag>.json), to split a family")
    r.add_argument("--config-kwargs", default="{}",
                   help="a JSON object of more S2Config / SGGConfig keyword arguments for every setting of the "
                        f"families {','.join(KWARG_FAMILIES)} (a new method: give it its own --tag)")
    r.add_argument("--floor", action="store_true", help="also score held-out real digits (floor.json)")
    rep = sub.add_parser("report", help="merge the families of one folder into results.md and frontier.png")
    rep.add_argument("--out", required=True)
    pair = sub.add_parser("paired", help="every setting against CFG, seed by seed and image by image: paired.md")
    pair.add_argument("--out", required=True)
    pair.add_argument("--bootstrap", type=int, default=1000, help="image resamples (default 1000; 0: none)")
    summ = sub.add_parser("checkpoints", help="unguided against CFG for every step_* folder under --out")
    summ.add_argument("--out", required=True)
    args = p.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]
    if args.command == "run":
        args.families = [f for f in args.families.split(",") if f]
        unknown = set(args.families) - set(FAMILIES)
        if unknown or not args.families:
            p.error(f"--families: unknown or empty {sorted(unknown)}; choose from {','.join(FAMILIES)}")
        try:
            args.seeds = [int(s) for s in args.seeds.split(",")]
            balanced_labels(args.samples)
        except ValueError as e:
            p.error(str(e))
        if args.steps < 1:
            p.error("--steps must be at least 1")
        places = {"full": None, "central80": CENTRAL_80}
        chosen = [v for v in args.s2_intervals.split(",") if v]
        if not chosen or set(chosen) - set(places):
            p.error("--s2-intervals: choose from full,central80")
        args.s2_intervals = [places[v] for v in chosen]
        try:
            args.config_kwargs = json.loads(args.config_kwargs)
            if not isinstance(args.config_kwargs, dict):
                raise ValueError("not a JSON object")
            if args.config_kwargs:
                for family in set(args.families) & set(KWARG_FAMILIES):  # a bad name fails here, before sampling
                    settings(family, [], [0.5], [0.5], [2.0], args.s2_intervals, args.config_kwargs)[0].config(0)
        except (ValueError, TypeError) as e:
            p.error(f"--config-kwargs {args.config_kwargs!r}: {e}")
        if args.config_kwargs and not set(args.families) & set(KWARG_FAMILIES):
            p.error(f"--config-kwargs applies to the families {','.join(KWARG_FAMILIES)}; none was chosen")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "run":
        run(args)
    elif args.command == "report":
        report(args.out)
    elif args.command == "paired":
        paired_report(args.out, bootstrap=args.bootstrap)
    else:

        text = checkpoints_table(args.out)
        with open(os.path.join(args.out, "checkpoints.md"), "w") as f:
            f.write(text)
        print(text)


if __name__ == "__main__":
    main()
