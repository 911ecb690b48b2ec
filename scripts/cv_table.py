"""One Markdown table from several report.py summaries (summary.json): each metric's mean and corrected 95% interval
for every model and the baselines beside them, and the per-criterion F1 of each.

    python scripts/cv_table.py NAME=outputs/.../summary.json [NAME=...] --metrics paper_micro_f1 paper_macro_f1
"""
from __future__ import annotations

import argparse
import json

SYMPTOMS = ["DEPRESSED_MOOD", "WORTHLESSNESS", "SUICIDAL_THOUGHTS", "ANHEDONIA", "FATIGUE", "SLEEP_ISSUES",
            "COGNITIVE_ISSUES", "APPETITE_CHANGE", "PSYCHOMOTOR"]  # ReDSM5's order, most frequent first


def cell(s: dict) -> str:
    if s.get("ci_corrected_low") is not None:
        return f"{s['mean']:.3f} [{s['ci_corrected_low']:.3f}, {s['ci_corrected_high']:.3f}]"
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="NAME=summary.json")
    ap.add_argument("--metrics", nargs="+", required=True)
    args = ap.parse_args()
    runs = {name: json.load(open(path)) for name, path in (r.split("=", 1) for r in args.runs)}
    print("| metric | system | test, mean [corrected 95% CI] (baselines: mean ± std over folds) | runs |")
    print("|---|---|---|---|")
    done = set()
    for metric in args.metrics:
        for name, s in runs.items():
            for system, table in s["summary"].items():
                label = name if system == "model" else system
                if metric in table and (metric, label) not in done:
                    done.add((metric, label))
                    print(f"| {metric} | {label} | {cell(table[metric])} | {table[metric].get('n', '')} |")
    print()
    names = []
    for name, s in runs.items():
        for system in s["per_criterion"]:
            label = name if system == "model" else system
            if label not in [n for n, _, _ in names]:
                names.append((label, name, system))
    print("| criterion (positive posts) | " + " | ".join(label for label, _, _ in names) + " |")
    print("|---|" + "---|" * len(names))
    first = next(iter(runs.values()))["per_criterion"]["model"]
    for c in SYMPTOMS:
        if c in first:
            cells = [f"{runs[n]['per_criterion'][sy][c]['f1']:.3f}" for _, n, sy in names]
            print(f"| {c} ({int(first[c]['support'])}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
