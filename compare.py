"""report.py --compare: another recipe (a YAML of config fields, e.g. configs/redsm5_authors.yaml) on the same folds
and seeds as ours, and the paired differences: per metric and per label, each side's mean, the difference's mean over
the runs and its corrected resampled t interval (the runs share training posts). compare-<name>.md / .json.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from auto_defaults import changed_fields
from config import Config, load_yaml_config, make_config
from intervals import corrected_t_ci

COMPARED = ("paper_micro_f1", "paper_macro_f1", "paper_micro_f1_tuned", "paper_macro_f1_tuned", "f1_macro", "auroc",
            "sentence_f1", "set_exact_match", "exact_match", "span_f1")


def compare_config(cfg: Config, path: str) -> Config:
    """The compared recipe: this report's settings (the fields its flags and --config set away from the defaults)
    with the file's keys on top, its `auto` fields resolved for itself; its runs in output_dir/vs-<file name>/."""
    values = {**changed_fields(cfg), **load_yaml_config(path)}
    return make_config(**{**values, "output_dir": str(Path(cfg.output_dir) / f"vs-{Path(path).stem}")})


def paired(ours: dict, theirs: dict) -> dict:
    """Ours - theirs per fold x seed (the same folds and seeds: the same test posts), for every metric both have:
    each side's mean, the difference's mean and its corrected resampled t interval (the runs share training posts);
    per label, the same of the paper's per-label F1 (at 0.5 and tuned)."""
    a, b = ({(r["fold"], r["seed"]): r for r in result["runs"]} for result in (ours, theirs))
    common = sorted(set(a) & set(b))
    ratio = float(np.mean([f["test"] / f["train"] for f in ours["folds"]]))

    def row(x: list[float], y: list[float]) -> dict:
        d = np.subtract(x, y)
        low, high = corrected_t_ci(d, ratio)
        return {"ours": float(np.mean(x)), "theirs": float(np.mean(y)), "difference": float(d.mean()),
                "ci_corrected_low": low, "ci_corrected_high": high, "per_run": [round(float(v), 4) for v in d]}

    metrics = {m: row([a[k]["metrics"][m] for k in common], [b[k]["metrics"][m] for k in common])
               for m in COMPARED if all(m in a[k]["metrics"] and m in b[k]["metrics"] for k in common)}
    per_label = {key: {label: row([a[k]["per_symptom"][key][label] for k in common],
                                  [b[k]["per_symptom"][key][label] for k in common])
                       for label in a[common[0]]["per_symptom"][key]}
                 for key in ("paper_per_symptom", "paper_per_symptom_tuned")
                 if all(key in a[k]["per_symptom"] and key in b[k]["per_symptom"] for k in common)}
    seconds = [sum(r["train_seconds"] or 0 for r in (a, b)[i].values()) for i in (0, 1)]
    return {"runs": [f"fold{f}-seed{s}" for f, s in common], "metrics": metrics, "per_label": per_label,
            "train_seconds": {"ours": seconds[0], "theirs": seconds[1]}}


def compare_markdown(name: str, ours: dict, cmp: dict) -> str:
    """compare.md: the metrics table (baselines, theirs, ours, the paired difference) and the per-label F1."""
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    base = [n for n in ("majority class", "bag-of-words LR") if n in ours["summary"]]
    lines = [f"# ours vs {name}", "", f"Command: `{ours['command']} --compare ...`  ",
             f"Paired over {len(cmp['runs'])} runs (the same folds and seeds): {', '.join(cmp['runs'])}. Baselines: "
             "mean over the folds. Difference: ours - theirs, its mean over the runs and the corrected resampled t "
             "95% interval (Nadeau & Bengio).", "",
             "| metric | " + " | ".join(base) + f" | {name} | ours | ours - {name} [corrected 95% CI] |",
             "|---|" + "---|" * (len(base) + 3)]
    for m, r in cmp["metrics"].items():
        cells = [fmt(ours["summary"][n].get(m, {}).get("mean")) for n in base]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {fmt(r['theirs'])} | {fmt(r['ours'])} | "
                     f"{r['difference']:+.3f} [{fmt(r['ci_corrected_low'])}, {fmt(r['ci_corrected_high'])}] |")
    lines.append(f"| training seconds, all runs | {' | '.join('' for _ in base)} | "
                 f"{cmp['train_seconds']['theirs']:,.0f} | {cmp['train_seconds']['ours']:,.0f} | |")
    for key, rows in cmp["per_label"].items():
        bow = ours.get("baseline_per_symptom", {}).get("bag-of-words LR", {}).get(key, {})
        at = "each symptom at its threshold tuned on validation" if "tuned" in key else "at 0.5"
        lines += ["", f"Per label F1 ({at}), mean over the runs:", "",
                  f"| label | bag-of-words LR | {name} | ours | ours - {name} [corrected 95% CI] |",
                  "|---|---|---|---|---|"]
        lines += [f"| {label} | {fmt(bow.get(label))} | {fmt(r['theirs'])} | {fmt(r['ours'])} | {r['difference']:+.3f} "
                  f"[{fmt(r['ci_corrected_low'])}, {fmt(r['ci_corrected_high'])}] |" for label, r in rows.items()]
    return "\n".join(lines) + "\n"
