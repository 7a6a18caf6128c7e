"""The report of s2fast_eval.digits.cache_quality: ``DIR/results.md`` and ``DIR/results.json`` from the run files
``DIR/*.json`` (``python -m s2fast_eval.digits.cache_quality report --out DIR``).

Every setting with its block-rows per sample beside its metrics (mean ± standard error over seeds), then paired
differences per seed against reference curves: CFG (the unwrapped pipeline over its λ grid) and CFG + cache at each
threshold (BlockCache at ω = 0 over its λ grid); both curves start at the unguided model (λ = 1). Δ at matched
accuracy reads the reference's value off that seed's own curve at the setting's accuracy on that seed
(s2fast_eval.digits.paired.seed_differences); seeds whose curve does not span the accuracy are left out, so n can
be smaller than the seeds run.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Dict, List, Optional

from .paired import mean_se, seed_differences

METRICS = (("accuracy", 100.0, 1, "accuracy %"), ("frechet", 1.0, 1, "Fréchet (train)"),
           ("frechet_heldout", 1.0, 1, "Fréchet (held-out)"), ("kid_heldout", 1000.0, 2, "KID ×10³"))
DELTAS = (("frechet", 1.0, 1, "Δ Fréchet (train)"), ("frechet_heldout", 1.0, 1, "Δ Fréchet (held-out)"),
          ("kid_heldout", 1000.0, 2, "Δ KID ×10³"))


def load_rows(folder: str) -> (List[dict], List[dict]):
    """(rows, metas) of every run file in ``folder``; each row gets ``by_seed`` (seed → metrics). ValueError for a
    row whose counted block-rows differ from the cost model's on some seed."""
    rows, metas = [], []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        if os.path.basename(path) in ("results.json", "fbc_check.json", "paired.json"):  # not runs
            continue
        with open(path) as f:
            record = json.load(f)
        metas.append(dict(record["meta"], file=os.path.basename(path)))
        for row in record["rows"]:
            for seed, values in zip(record["meta"]["seeds"], row["per_seed"]):
                if values["block_rows"] != values["model_block_rows"]:
                    raise ValueError(f"{path}: {row['name']} seed {seed}: counted {values['block_rows']} block-rows "
                                     f"per sample, the cost model {values['model_block_rows']}")
            rows.append(dict(row, by_seed=dict(zip(record["meta"]["seeds"], row["per_seed"]))))
    return rows, metas


def curves(rows: List[dict]) -> Dict[str, Dict[float, dict]]:
    """Reference name → λ → seed → metrics: "CFG", and "CFG + cache t=…" per threshold; the unguided row is λ = 1
    of each."""
    none = [r for r in rows if r["method"] == "none"]
    out: Dict[str, Dict[float, dict]] = {"CFG": {}}
    for r in rows:
        if r["method"] == "cfg":
            out["CFG"][r["lam"]] = r["by_seed"]
        elif r["method"] == "cfgcache":
            out.setdefault(f"CFG + cache t={r['threshold']:g}", {})[r["lam"]] = r["by_seed"]
    for curve in out.values():
        if none:
            curve[1.0] = none[0]["by_seed"]
    return {k: v for k, v in out.items() if len(v) > 1}


def _pm(mean: Optional[float], se: Optional[float], scale: float, digits: int, n: Optional[int] = None) -> str:
    if mean is None:
        return "–"
    text = f"{scale * mean:.{digits}f}" + (f" ± {scale * se:.{digits}f}" if se is not None else "")
    return text + (f" ({n})" if n is not None else "")


def _signed(stat, scale: float, digits: int) -> str:
    mean, se, n = stat
    if mean is None:
        return "–"
    return f"{scale * mean:+.{digits}f}" + (f" ± {scale * se:.{digits}f}" if se is not None else "") + f" ({n})"


def _rows_text(row: dict) -> str:
    values = sorted({v["block_rows"] for v in row["by_seed"].values()})
    mean = sum(v["block_rows"] for v in row["by_seed"].values()) / len(row["by_seed"])
    return f"{mean:.1f}" if len(values) == 1 else f"{mean:.1f} ({values[0]:g}–{values[-1]:g})"


def comparisons(rows: List[dict]) -> List[dict]:
    """Every non-CFG setting against every reference curve: Δ per seed at matched accuracy (and at the same λ where
    the curve has it), as mean, SE and n, with both sides' block-rows."""
    refs = curves(rows)
    out = []
    for row in rows:
        if row["method"] in ("none", "cfg"):
            continue
        for ref_name, curve in refs.items():
            if row["method"] == "cfgcache" and ref_name != "CFG":
                continue  # a cached CFG point is itself on its own curve
            entry = {"setting": row["name"], "reference": ref_name, "block_rows": row["block_rows"],
                     "reference_block_rows": {lam: sum(v["block_rows"] for v in by_seed.values()) / len(by_seed)
                                              for lam, by_seed in sorted(curve.items())}}
            for key, *_ in DELTAS:
                entry[key + "_matched"] = mean_se(list(seed_differences(row["by_seed"], curve, key).values()))
                same = seed_differences(row["by_seed"], curve, key, lam=row["lam"]) if row["lam"] in curve else {}
                entry[key + "_same_lam"] = mean_se(list(same.values()))
            entry["accuracy_same_lam"] = mean_se(list(
                seed_differences(row["by_seed"], curve, "accuracy", lam=row["lam"]).values())) \
                if row["lam"] in curve else (None, None, 0)
            out.append(entry)
    return out


def own_costs(rows: List[dict]) -> List[tuple]:
    """(setting, the same method uncached at the same λ and ω): CFG + cache against CFG, S² + cache and S² reuse
    against S²."""
    plain = {("cfg" if r["method"] == "cfg" else "s2", r["lam"], r["omega"]): r for r in rows
             if r["method"] in ("cfg", "s2")}
    out = []
    for r in rows:
        base = {"cfgcache": "cfg", "s2cache": "s2", "s2reuse": "s2"}.get(r["method"])
        if base and (base, r["lam"], r["omega"]) in plain:
            out.append((r, plain[(base, r["lam"], r["omega"])]))
    return out


def write_report(folder: str) -> str:
    rows, metas = load_rows(folder)
    order = {m: i for i, m in enumerate(("none", "cfg", "cfgcache", "s2", "s2cache", "s2reuse"))}
    rows.sort(key=lambda r: (order[r["method"]], r.get("threshold") or 0, r.get("every", 1), r["lam"]))
    meta = metas[0]
    lines = [f"# S² with step caching against CFG with the same cache: {meta['checkpoint']}", "",
             f"{meta['samples']} samples per seed × seeds {meta['seeds']}, {meta['steps']} Euler steps, S²'s ω = "
             f"{meta['omega']:g}; {meta['device']}, the machine shared with other jobs (times are loaded wall "
             "times). Mean ± standard error over seeds. Block-rows per sample: rows through each transformer block, "
             "counted by a hook and equal to the cost model (s2fast.engine.block_rows / cached_block_rows, from "
             "s2fast.trace_steps) on every seed; CFG without a cache runs 2 × 6 blocks × steps. A range in brackets: "
             "the cache cached different steps on different seeds.", "", "Commands and their run times:", ""]
    for m in metas:
        lines.append(f"- `{m['command']}` ({m['seconds'] / 60:.1f} min)")
    lines += ["", "## Every setting", "",
              "| setting | block-rows / sample | cached steps | reused corrections | " +
              " | ".join(t for *_, t in METRICS) + " | time s |",
              "|---|---|---|---|" + "---|" * len(METRICS) + "---|"]
    for r in rows:
        cells = [_pm(r[k], r[k + "_se"], s, d) for k, s, d, _ in METRICS]
        lines.append(f"| {r['name']} | {_rows_text(r)} | {r['cached_steps']:.1f} | {r['reused_corrections']:.1f} | "
                     + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    comps = comparisons(rows)
    lines += ["", "## Paired differences: setting − reference, per seed, mean ± standard error (seeds)", "",
              "Negative: better than the reference. Matched accuracy: the reference's value on that seed's own λ "
              "curve at the setting's accuracy on that seed (linear between λ points, λ = 1 the unguided model). "
              "Same λ: the reference at the setting's λ, where its grid has it. Reference block-rows: per λ of its "
              "grid (mean over seeds).", "",
              "| setting | block-rows | reference | reference block-rows (λ: rows) | " +
              " | ".join(f"{t}, matched acc." for *_, t in DELTAS) + " | Δ accuracy pts, same λ | " +
              " | ".join(f"{t}, same λ" for *_, t in DELTAS[:1]) + " |",
              "|---|---|---|---|" + "---|" * (len(DELTAS) + 2)]
    for c in comps:
        refs = ", ".join(f"{lam:g}: {v:.0f}" for lam, v in c["reference_block_rows"].items())
        lines.append(f"| {c['setting']} | {c['block_rows']:.1f} | {c['reference']} | {refs} | " +
                     " | ".join(_signed(c[k + '_matched'], s, d) for k, s, d, _ in DELTAS) + " | " +
                     _signed(c["accuracy_same_lam"], 100.0, 1) + " | " +
                     " | ".join(_signed(c[k + '_same_lam'], s, d) for k, s, d, _ in DELTAS[:1]) + " |")
    lines += ["", "## What the cache (or the reuse) costs each method: setting − the same method uncached, same λ", "",
              "Per seed, mean ± standard error (seeds). Accuracy in points.", "",
              "| setting | uncached | block-rows | Δ accuracy pts | " + " | ".join(t for *_, t in DELTAS) + " |",
              "|---|---|---|---|" + "---|" * len(DELTAS)]
    for row, base in own_costs(rows):
        def diff(key, row=row, base=base):
            return mean_se([row["by_seed"][s][key] - base["by_seed"][s][key]
                            for s in row["by_seed"] if s in base["by_seed"]])

        lines.append(f"| {row['name']} | {base['name']} | {row['block_rows']:.1f} / {base['block_rows']:.1f} | "
                     + _signed(diff("accuracy"), 100.0, 1) + " | "
                     + " | ".join(_signed(diff(k), s, d) for k, s, d, _ in DELTAS) + " |")
    check = os.path.join(folder, "fbc_check.json")
    if os.path.exists(check):
        with open(check) as f:
            fbc = json.load(f)
        lines += ["", "## diffusers' FirstBlockCache beside BlockCache at ω = 0", "",
                  f"λ = {fbc['lam']:g}, threshold {fbc['threshold']:g}, seed {fbc['seed']}, {fbc['samples']} samples, "
                  f"{fbc['steps']} steps: FirstBlockCache (diffusers, on the unwrapped pipeline, measuring the whole "
                  f"[cond, null] batch) {fbc['firstblockcache']['block_rows']:g} block-rows per sample, "
                  f"{fbc['firstblockcache']['cached_steps']:g} cached steps; BlockCache at ω = 0 (the cond rows) "
                  f"{fbc['blockcache']['block_rows']:g} block-rows, {fbc['blockcache']['cached_steps']:g} cached steps; "
                  f"largest pixel difference between their images {fbc['max_abs_pixel_diff']:.2g} (pixels in [0, 1])."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(text)
    summary = {"meta": metas, "settings": [{k: v for k, v in r.items() if k not in ("by_seed",)} for r in rows],
               "comparisons": comps}
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return text
