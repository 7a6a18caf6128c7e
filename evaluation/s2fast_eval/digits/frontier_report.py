"""Merge one checkpoint's frontier runs (``<family>.json`` and ``floor.json``) into results.md and frontier.png.

A method's frontier is its Pareto set over its settings: no other setting of the same method has both a higher mean
accuracy and a lower mean Fréchet distance (CFG and AutoGuidance are drawn along λ instead). A setting is compared
with CFG at matched accuracy: CFG's Fréchet distance at the setting's accuracy, linear between CFG's λ grid points.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Optional, Sequence

from ..quality.lineplot import charts_png

LABELS = {"none": "none", "cfg": "CFG", "s2": "S² (all steps)", "s2σ": "S² (σ in [0.1, 0.9])", "naive": "naive S² N=4",
          "slg": "SLG (fixed skip)", "sgg": "SGG", "auto": "AutoGuidance"}


def load(folder: str) -> Dict[str, dict]:
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if name == "paired":  # the paired report's own output, not a run
            continue
        with open(path) as f:
            out[name] = json.load(f)
    return out


def method_of(row: dict) -> str:
    """The frontier a setting belongs to: S² splits by interval (every step, or the central 80 % in σ), and a
    family run with extra config arguments (``run --config-kwargs``) is a method of its own, ``family[k=v]``."""
    base = row.get("method") or row["family"]
    if row["family"] == "s2" and row.get("sigma_interval"):
        return base.replace("s2", "s2σ", 1)
    return base


def label(method: str) -> str:
    """The display name: LABELS' for the built-in methods, with any extra config arguments after it."""
    base = method.split("[")[0]
    return LABELS.get(base, base) + method[len(base):]


def methods_in_order(methods: Dict[str, list]) -> List[str]:
    """The built-in methods in LABELS' order, then the others (config-kwargs methods) by name."""
    return [k for k in LABELS if k in methods] + sorted(k for k in methods if k not in LABELS)


def pareto(rows: Sequence[dict]) -> List[dict]:
    """Settings no other setting beats on both mean accuracy (higher) and mean Fréchet (lower), by accuracy."""
    front = [r for r in rows if not any(o["accuracy"] >= r["accuracy"] and o["frechet"] <= r["frechet"] and
                                        (o["accuracy"] > r["accuracy"] or o["frechet"] < r["frechet"]) for o in rows)]
    return sorted(front, key=lambda r: r["accuracy"])


def best_at(rows: Sequence[dict], target: float) -> Optional[dict]:
    """The lowest mean Fréchet among settings whose mean accuracy is at least ``target``."""
    ok = [r for r in rows if r["accuracy"] >= target - 1e-12]
    return min(ok, key=lambda r: r["frechet"]) if ok else None


def cfg_at(cfg_rows: Sequence[dict], accuracy: float) -> Optional[float]:
    """CFG's Fréchet distance at ``accuracy``, read off CFG's λ curve (its settings in λ order, λ = 1 being the
    unguided model), linear between neighbouring λ; None outside the accuracies the curve spans. (The λ curve, not
    the Pareto set: where more guidance improves both accuracy and Fréchet, the Pareto set is one point.)"""
    curve = sorted(cfg_rows, key=lambda r: r["lam"])
    for a, b in zip(curve, curve[1:]):
        lo, hi = sorted((a["accuracy"], b["accuracy"]))
        if lo <= accuracy <= hi:
            if hi == lo:
                return min(a["frechet"], b["frechet"])
            t = (accuracy - a["accuracy"]) / (b["accuracy"] - a["accuracy"])
            return a["frechet"] + t * (b["frechet"] - a["frechet"])
    return None


def by_method(data: Dict[str, dict]) -> Dict[str, List[dict]]:
    methods: Dict[str, List[dict]] = {}
    none = data.get("none", {}).get("rows", [])
    for name, record in data.items():
        if name == "floor":
            continue
        for row in record["rows"]:
            methods.setdefault(method_of(row), []).append(row)
    # λ = 1 is the unguided model for every guided family: its frontier starts there
    for key, rows in methods.items():
        if key != "none":
            rows.extend(dict(r, family=key) for r in none)
    return methods


def standard_error(row: dict, key: str) -> Optional[float]:
    """The standard error over seeds (sample standard deviation / √n) from the row's per-seed values (``per_seed``,
    or a floor's ``per_set``); None with fewer than two."""
    values = [s[key] for s in row.get("per_seed", row.get("per_set", [])) if key in s]
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5


def _fmt(row: dict, key: str, scale: float = 1.0, digits: int = 2) -> str:
    """mean ± standard error over seeds (mean ± range, marked so, for rows without per-seed values)."""
    if key not in row:
        return "–"
    se = standard_error(row, key)
    if se is not None:
        return f"{scale * row[key]:.{digits}f} ± {scale * se:.{digits}f}"
    if row.get(key + "_spread") is not None:
        return f"{scale * row[key]:.{digits}f} (range {scale * row[key + '_spread']:.{digits}f})"
    return f"{scale * row[key]:.{digits}f}"


def markdown(data: Dict[str, dict], folder: str) -> str:
    methods = by_method(data)
    meta = next(r["meta"] for k, r in data.items() if k != "floor")
    lines = [f"# Guidance frontiers: digits checkpoint at training step {meta['step']}", "",
             f"{meta['samples']} samples per seed × seeds {meta['seeds']}, {meta['steps']} Euler steps; AutoGuidance's "
             f"weak model: the checkpoint at step {meta['weak_step']}. Mean over seeds ± standard error over seeds "
             f"(n = {len(meta['seeds'])}; method-against-CFG differences with paired statistics: paired.md, where "
             "present). Accuracy: "
             "the judge reads the requested class; Fréchet: in the judge's features against the 4500 training "
             f"images; precision/recall: improved k-NN (k = 3) against {meta['samples']} real training digits. "
             f"{meta['device']}; the machine was shared with other jobs (times are loaded wall times).", "",
             "Commands and their run times:", ""]
    commands: Dict[str, List[str]] = {}
    for name, record in data.items():
        if name != "floor":
            planned = record["meta"].get("settings_planned")
            stopped = f", stopped after {len(record['rows'])} of {planned} settings" if planned and \
                len(record["rows"]) < planned else ""
            commands.setdefault(record["meta"]["command"], []).append(
                f"{name} {record['meta']['seconds'] / 60:.1f} min{stopped}")
    for command, parts in commands.items():
        lines.append(f"- `{command}` ({', '.join(parts)})")
    lines.append("")
    if "floor" in data:
        f = data["floor"]
        lines += [f"Real held-out digits at the same count (the floor): accuracy {_fmt(f, 'accuracy', 100, 1)} %, "
                  f"Fréchet {_fmt(f, 'frechet')}, precision {_fmt(f, 'precision')}, recall {_fmt(f, 'recall')}.", ""]
    cfg = methods.get("cfg", [])
    none = methods.get("none", [])
    if cfg and none:
        best = min(cfg, key=lambda r: r["frechet"])
        lines += [f"Unguided: Fréchet {_fmt(none[0], 'frechet')}, accuracy {_fmt(none[0], 'accuracy', 100, 1)} %. "
                  f"CFG's best Fréchet: {_fmt(best, 'frechet')} at λ = {best['lam']:g} "
                  f"(accuracy {_fmt(best, 'accuracy', 100, 1)} %).", ""]
        lines += ["## Each method against CFG at the same accuracy", "",
                  "For every setting, CFG's Fréchet distance at that setting's accuracy, read off CFG's λ curve "
                  "(linear between its λ grid points, λ = 1 being the unguided model); Δ = setting − CFG there, "
                  "negative = better than CFG. Per method, the setting with the most negative Δ (the most "
                  "negative of several is biased towards luck: paired.md gives each setting's paired statistic). "
                  "Settings outside the accuracies CFG's grid spans have no Δ.", "",
                  "| method | setting | accuracy % | Fréchet | CFG at that accuracy | Δ | precision | recall |",
                  "|---|---|---|---|---|---|---|---|"]
        for key in methods_in_order(methods):
            if key in ("none", "cfg"):
                continue
            scored = [(r, cfg_at(cfg, r["accuracy"])) for r in methods[key] if r["name"] != "none"]
            scored = [(r, c) for r, c in scored if c is not None]
            if not scored:
                lines.append(f"| {label(key)} | outside CFG's accuracy range | | | | | | |")
                continue
            r, c = min(scored, key=lambda rc: rc[0]["frechet"] - rc[1])
            lines.append(f"| {label(key)} | {r['name']} | {_fmt(r, 'accuracy', 100, 1)} | {_fmt(r, 'frechet')} | "
                         f"{c:.2f} | {r['frechet'] - c:+.2f} | {_fmt(r, 'precision')} | {_fmt(r, 'recall')} |")
        lines.append("")
        lines.append("")
    lines += ["## Every setting", "",
              "| method | setting | accuracy % | Fréchet | Δ vs CFG at that accuracy | KID ×10³ (held-out) | "
              "precision | recall | time s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key in methods_in_order(methods):
        for r in methods[key]:
            if key != "none" and r["name"] == "none":
                continue
            c = cfg_at(cfg, r["accuracy"]) if cfg and key not in ("none", "cfg") else None
            delta = f"{r['frechet'] - c:+.2f}" if c is not None else "–"
            lines.append(f"| {label(key)} | {r['name']} | {_fmt(r, 'accuracy', 100, 1)} | {_fmt(r, 'frechet')} | "
                         f"{delta} | {_fmt(r, 'kid_heldout', 1000, 2)} | {_fmt(r, 'precision')} | "
                         f"{_fmt(r, 'recall')} | {r['seconds']:.0f} |")
    lines += ["", "Plot: [frontier.png](frontier.png) (a line per method: CFG and AutoGuidance along λ, the "
                  "others through their Pareto set; hollow dots: the other settings; triangle: the real-data floor)."]
    return "\n".join(lines) + "\n"


def plot(data: Dict[str, dict], path: str) -> None:
    methods = by_method(data)
    acc_series, pr_series = {}, {}
    for key in methods_in_order(methods):
        if key == "none":
            continue
        rows = methods[key]
        front = sorted(rows, key=lambda r: r["lam"]) if key in ("cfg", "auto") else pareto(rows)
        acc_series[label(key)] = ([(100 * r["accuracy"], r["frechet"]) for r in front],
                                   [(100 * r["accuracy"], r["frechet"]) for r in rows if r not in front])
        pr_series[label(key)] = ([], [(r["recall"], r["precision"]) for r in rows])  # points only: no order to join
    marks = {}
    if "floor" in data:
        f = data["floor"]
        marks["real"] = (100 * f["accuracy"], f["frechet"])
    meta = next(r["meta"] for k, r in data.items() if k != "floor")
    panels = [dict(title=f"step {meta['step']}: Fréchet vs accuracy (lower right is better)", xlabel="accuracy %",
                   ylabel="Fréchet", series=acc_series, marks=marks),
              dict(title="precision vs recall, every setting", xlabel="recall", ylabel="precision",
                   series=pr_series,
                   marks={"real": (data["floor"]["recall"], data["floor"]["precision"])} if "floor" in data else {})]
    charts_png(panels, path)


def report(folder: str) -> None:
    data = load(folder)
    if not any(k != "floor" for k in data):
        raise SystemExit(f"no <family>.json in {folder}: run `PYTHONPATH=evaluation python -m s2fast_eval.digits.frontier "
                         "run` first")
    text = markdown(data, folder)
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(text)
    plot(data, os.path.join(folder, "frontier.png"))
    print(text)
    print(f"wrote {folder}/results.md and frontier.png")


def checkpoints_table(root: str) -> str:
    """Unguided against CFG for every checkpoint folder under ``root`` (each a frontier run's output)."""
    lines = ["| checkpoint (training step) | seeds × samples | unguided accuracy % | unguided Fréchet | best CFG λ | "
             "CFG accuracy % | CFG Fréchet | CFG better by (Fréchet) |", "|---|---|---|---|---|---|---|---|"]
    for folder in sorted(glob.glob(os.path.join(root, "step_*")), key=lambda p: int(p.rsplit("_", 1)[1])):
        data = load(folder)
        if "none" not in data or not any(k.startswith("cfg") for k in data):
            continue
        none = data["none"]["rows"][0]
        cfg = [r for k, d in data.items() if k.startswith("cfg") for r in d["rows"]]
        best = min(cfg, key=lambda r: r["frechet"])
        meta = data["none"]["meta"]
        tried = ", ".join(f"{r['lam']:g}" for r in sorted(cfg, key=lambda r: r["lam"]))
        lines.append(f"| {meta['step']} | {len(meta['seeds'])} × {meta['samples']} | {_fmt(none, 'accuracy', 100, 1)} | "
                     f"{_fmt(none, 'frechet', 1, 1)} | {best['lam']:g} (of {tried}) | "
                     f"{_fmt(best, 'accuracy', 100, 1)} | {_fmt(best, 'frechet', 1, 1)} | "
                     f"{none['frechet'] - best['frechet']:+.1f} |")
    return "\n".join(lines) + "\n"
