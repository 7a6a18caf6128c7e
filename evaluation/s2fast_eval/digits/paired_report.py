"""Every setting of one frontier folder against CFG, seed by seed and image by image: ``paired.md`` and
``paired.json`` (``python -m s2fast_eval.digits.frontier paired --out DIR``).

Reads the ``<family>.json`` files ``run`` wrote (every version: each row keeps its per-seed metrics and the seeds
are in its meta) and, where present, the ``<family>.npz`` beside them (per-image judge features, written by runs
since the paired statistics exist): without them only the per-seed table is made. The statistics are
s2fast_eval.digits.paired's.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Dict, List

import numpy as np
import torch

from s2fast.digits.classifier import features_of, load_judge

from ..quality.metrics import gaussian_stats, rms_coordinate
from .data import heldout_halves, load_mnist, split
from .frontier_report import LABELS, label, load, method_of
from .paired import PooledImages, bootstrap, mean_se, on_curve, seed_differences

# the per-seed metrics compared, with their display scale and the sample count they are measured at
PER_SEED_KEYS = (("accuracy", 100.0), ("frechet", 1.0), ("frechet_heldout", 1.0), ("kid_heldout", 1000.0))
POOLED_KEYS = (("frechet_heldout", 1.0), ("kid", 1000.0), ("frechet", 1.0))


def _method(row: dict) -> str:
    return method_of(row)


def _label(method: str) -> str:
    return label(method)


def collect(data: Dict[str, dict]):
    """(cfg, rows): cfg is λ → seed → metrics (the unguided model as λ = 1), rows every other guided setting with
    its ``by_seed`` metrics."""
    cfg: Dict[float, Dict[int, dict]] = {}
    rows = []
    for record in data.values():
        if "rows" not in record:
            continue
        seeds = record["meta"]["seeds"]
        for row in record["rows"]:
            by_seed = dict(zip(seeds, row["per_seed"]))
            if row["family"] == "none":
                cfg.setdefault(1.0, {}).update(by_seed)
            elif row["family"] == "cfg":
                cfg.setdefault(float(row["lam"]), {}).update(by_seed)
            else:
                rows.append(dict(row, by_seed=by_seed))
    return cfg, rows


def _pm(stat, scale: float, digits: int = 1) -> str:
    mean, se, n = stat
    if mean is None:
        return "–"
    se_text = f" ± {scale * se:.{digits}f}" if se is not None else ""
    return f"{scale * mean:+.{digits}f}{se_text} ({n})"


def per_seed_section(cfg, rows) -> (List[str], list):
    lines = ["## Per seed: Δ = setting − CFG on the same seed, mean ± standard error (number of seeds)", "",
             "At the same λ, and at matched accuracy (CFG's value read off that seed's own CFG λ curve at the "
             "setting's accuracy on that seed; seeds outside the curve's span are left out, so n can be smaller). "
             "Fréchet (train) is the judge's Fréchet distance against its 4500 training images at one seed's sample "
             "count; KID ×10³ and Fréchet (held-out) compare with the 250 reference held-out digits. Negative Δ: "
             "better than CFG (for accuracy: lower).", "",
             "| method | setting | Δ accuracy pts, same λ | Δ Fréchet (train), same λ | per seed | "
             "Δ Fréchet (train), matched acc. | Δ KID ×10³, same λ | Δ KID ×10³, matched acc. |",
             "|---|---|---|---|---|---|---|---|"]
    records = []
    for row in sorted(rows, key=lambda r: (list(LABELS).index(method_of(r)) if method_of(r) in LABELS else 99,
                                           r["name"])):
        lam = float(row["lam"])
        stats = {}
        for key, _ in PER_SEED_KEYS:
            stats[f"{key}_same_lambda"] = seed_differences(row["by_seed"], cfg, key, lam=lam)
            if key != "accuracy":
                stats[f"{key}_matched"] = seed_differences(row["by_seed"], cfg, key)
        summary = {k: mean_se(list(v.values())) for k, v in stats.items()}
        each = stats["frechet_same_lambda"]
        lines.append(f"| {_label(_method(row))} | {row['name']} | {_pm(summary['accuracy_same_lambda'], 100)} | "
                     f"{_pm(summary['frechet_same_lambda'], 1)} | {', '.join(f'{v:+.1f}' for v in each.values())} | "
                     f"{_pm(summary['frechet_matched'], 1)} | {_pm(summary['kid_heldout_same_lambda'], 1000, 2)} | "
                     f"{_pm(summary['kid_heldout_matched'], 1000, 2)} |")
        records.append({"name": row["name"], "method": _method(row), "lam": lam,
                        "per_seed": {k: {str(s): v for s, v in d.items()} for k, d in stats.items()},
                        "summary": {k: dict(zip(("mean", "se", "n"), v)) for k, v in summary.items()}})
    return lines, records


def load_images(folder: str) -> Dict[str, dict]:
    """name → {"features", "predicted", "seeds", "labels"} from every ``<family>.npz``."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.npz"))):
        with np.load(path) as z:
            for i, name in enumerate(z["names"]):
                out[str(name)] = {"features": torch.from_numpy(z["features"][i].astype(np.float32)),
                                  "predicted": torch.from_numpy(z["predicted"][i].astype(np.int64)),
                                  "seeds": [int(s) for s in z["seeds"]],
                                  "labels": torch.from_numpy(z["labels"].astype(np.int64))}
    return out


def references():
    """The pooled metrics' references: the judge's training-image Gaussian, and the held-out reference half (its
    Gaussian and its features, for KID, with the scale KID divides both sets by, as in the frontier runs)."""
    judge = load_judge()
    _, (held_x, held_y) = split(*load_mnist())
    ref = features_of(judge.model, held_x[heldout_halves(held_y)[0]])[0]
    return {"frechet": (judge.ref_mean, judge.ref_cov), "frechet_heldout": gaussian_stats(ref)}, ref, \
        rms_coordinate(ref)


def pooled_section(images: Dict[str, dict], cfg_names: Dict[float, str], rows, draws: int):
    """Pooled metrics and paired-bootstrap intervals over the seeds every setting with images shares."""
    if not images or 1.0 not in cfg_names:
        return ["## Pooled images", "", "No per-image features in this folder (runs from before they were saved), "
                "or no unguided run: per-seed statistics only.", ""], {}
    seeds = sorted(set.intersection(*(set(v["seeds"]) for v in images.values())))
    labels = next(iter(images.values()))["labels"]
    if any(not torch.equal(v["labels"], labels) for v in images.values()):
        raise ValueError("the .npz files of this folder were sampled for different labels: not paired")
    refs, kid_ref, scale = references()
    pooled = {}
    for name, v in images.items():
        keep = [v["seeds"].index(s) for s in seeds]
        feats = v["features"][keep].reshape(-1, v["features"].shape[-1])
        correct = (v["predicted"][keep] == labels).reshape(-1)
        pooled[name] = PooledImages(feats, correct, refs, kid_ref, kid_scale=scale)
    n = len(seeds) * len(labels)
    cells = (torch.arange(len(seeds)).unsqueeze(1) * 10 + labels.unsqueeze(0)).reshape(-1)
    cfg_curve = {lam: name for lam, name in cfg_names.items() if name in pooled}
    methods = [r for r in rows if r["name"] in pooled]

    def curve_value(metrics, key, accuracy):
        return on_curve([(lam, metrics[nm]["accuracy"], metrics[nm][key]) for lam, nm in cfg_curve.items()], accuracy)

    stats = {}
    for r in methods:
        name, lam = r["name"], float(r["lam"])
        same = cfg_curve.get(lam)
        for key, _ in POOLED_KEYS + (("accuracy", 100.0),):
            stats[(name, key, "value")] = lambda m, name=name, key=key: m[name][key]
            if same:
                stats[(name, key, "same")] = lambda m, name=name, key=key, same=same: m[name][key] - m[same][key]
            if key != "accuracy":
                def matched(m, name=name, key=key):
                    c = curve_value(m, key, m[name]["accuracy"])
                    return None if c is None else m[name][key] - c
                stats[(name, key, "matched")] = matched
    by_method: Dict[str, List[str]] = {}
    for r in methods:
        by_method.setdefault(_method(r), []).append(r["name"])
    guided_cfg = [nm for lam, nm in cfg_curve.items() if lam != 1.0]
    for key, _ in POOLED_KEYS if guided_cfg else ():
        stats[("cfg best", key, "value")] = lambda m, key=key: min(m[nm][key] for nm in guided_cfg)
        for method, names in by_method.items():
            stats[(method, key, "best")] = lambda m, key=key, names=names: \
                min(m[nm][key] for nm in names) - min(m[nm][key] for nm in guided_cfg)
    flat = {"|".join(k): f for k, f in stats.items()}
    result = bootstrap(pooled, cells, flat, draws)

    def ci(k, scale, digits=1):
        r = result.get("|".join(k))
        if r is None or r["value"] is None:
            return "–"
        interval = f" [{scale * r['low']:+.{digits}f}, {scale * r['high']:+.{digits}f}]" if r["low"] is not None else ""
        partial = f" ({r['defined']}/{r['draws']} draws)" if r["defined"] < r["draws"] else ""
        return f"{scale * r['value']:+.{digits}f}{interval}{partial}"

    def val(k, scale, digits=1):
        r = result.get("|".join(k))
        return "–" if r is None else f"{scale * r['value']:.{digits}f}"

    cfg_values = {lam: pooled[nm].metrics() for lam, nm in sorted(cfg_curve.items())}
    lines = [f"## Pooled images: n = {n} per setting ({len(seeds)} seeds × {len(labels)}), paired bootstrap "
             f"({draws} draws)", "",
             "Every seed's images together; Fréchet (held-out) and KID ×10³ (unbiased, polynomial kernel) against "
             "the 250 reference held-out digits, Fréchet (train) against the judge's 4500 training images. Δ = "
             "setting − CFG on the same images, with its 95 % paired-bootstrap interval (images resampled within "
             "each seed × class cell, the same draw for every setting); matched accuracy: CFG's pooled λ curve at "
             "the setting's pooled accuracy (draws where the curve does not reach it are left out, and counted).", "",
             "CFG's curve (λ = 1 is the unguided model):", "",
             "| λ | accuracy % | Fréchet (held-out) | KID ×10³ | Fréchet (train) |", "|---|---|---|---|---|"]
    for lam, m in cfg_values.items():
        lines.append(f"| {lam:g} | {100 * m['accuracy']:.1f} | {m['frechet_heldout']:.1f} | {1000 * m['kid']:.2f} | "
                     f"{m['frechet']:.1f} |")
    lines += ["", "| method | setting | accuracy % | Δ accuracy pts, same λ | Fréchet (held-out) | Δ same λ | "
              "Δ matched acc. | KID ×10³ | Δ same λ | Δ matched acc. | Fréchet (train) | Δ same λ | Δ matched acc. |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in methods:
        nm = r["name"]
        lines.append(f"| {_label(_method(r))} | {nm} | {val((nm, 'accuracy', 'value'), 100)} | "
                     f"{ci((nm, 'accuracy', 'same'), 100)} | " +
                     " | ".join(f"{val((nm, key, 'value'), s, 2 if key == 'kid' else 1)} | "
                                f"{ci((nm, key, 'same'), s, 2 if key == 'kid' else 1)} | "
                                f"{ci((nm, key, 'matched'), s, 2 if key == 'kid' else 1)}"
                                for key, s in POOLED_KEYS) + " |")
    lines += ["", "### Best score against CFG's best", "",
              "Each method's lowest value over the settings run here minus CFG's lowest over its λ grid (λ > 1), "
              "recomputed on every draw. A method with more settings gets more chances at a low value, so a small "
              "negative Δ is weak evidence.", "",
              "| method | settings | Fréchet (held-out) Δ best | KID ×10³ Δ best | Fréchet (train) Δ best |",
              "|---|---|---|---|---|",
              f"| CFG (its best value) | λ ∈ {{{', '.join(f'{lam:g}' for lam in sorted(cfg_curve) if lam != 1.0)}}} | "
              f"{val(('cfg best', 'frechet_heldout', 'value'), 1)} | {val(('cfg best', 'kid', 'value'), 1000, 2)} | "
              f"{val(('cfg best', 'frechet', 'value'), 1)} |"]
    for method, names in by_method.items():
        lines.append(f"| {_label(method)} | {len(names)} | {ci((method, 'frechet_heldout', 'best'), 1)} | "
                     f"{ci((method, 'kid', 'best'), 1000, 2)} | {ci((method, 'frechet', 'best'), 1)} |")
    lines.append("")
    return lines, {"n": n, "seeds": seeds, "draws": draws, "statistics": result,
                   "cfg": {str(k): v for k, v in cfg_values.items()}}


def paired_report(folder: str, bootstrap: int = 1000) -> str:
    data = load(folder)
    cfg, rows = collect(data)
    if not cfg or not rows:
        raise SystemExit(f"{folder} needs CFG (or unguided) runs and at least one other method's")
    meta = next(r["meta"] for k, r in data.items() if k != "floor" and "rows" in r)
    per_seed_lines, per_seed_records = per_seed_section(cfg, rows)
    cfg_names = {}
    for record in data.values():
        for row in record.get("rows", []):
            if row["family"] in ("none", "cfg"):
                cfg_names[1.0 if row["family"] == "none" else float(row["lam"])] = row["name"]
    pooled_lines, pooled_record = pooled_section(load_images(folder), cfg_names, rows, bootstrap)
    lines = [f"# Paired statistics against CFG: digits checkpoint at training step {meta['step']}", "",
             f"{meta['samples']} samples per seed, {meta['steps']} Euler steps, the same initial noise (and S² "
             "masks) per seed for every setting. Made by `PYTHONPATH=evaluation python -m "
             f"s2fast_eval.digits.frontier paired --out {folder} --bootstrap {bootstrap}` from the runs listed in "
             "results.md / the JSON files' meta.", ""]
    floor = data.get("floor", {}).get("heldout")
    if floor:
        lines += [f"Real-data floor of the held-out metrics: the other {floor['n']} held-out digits against the "
                  f"reference half score Fréchet (held-out) {floor['frechet_heldout']:.1f}, KID ×10³ "
                  f"{1000 * floor['kid_heldout']:.2f} (n = {floor['n']}).", ""]
    text = "\n".join(lines + per_seed_lines + [""] + pooled_lines) + "\n"
    with open(os.path.join(folder, "paired.md"), "w") as f:
        f.write(text)
    with open(os.path.join(folder, "paired.json"), "w") as f:
        json.dump({"per_seed": per_seed_records, "pooled": pooled_record}, f, indent=1)
    print(text)
    return text
