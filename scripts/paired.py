"""Paired differences between two systems on the same report.py folds: per fold, their mean and the corrected
resampled t interval over the folds (intervals.corrected_t_ci: the folds share training posts). A system is a report
output folder (its folds' metrics.json), or `bow` / `majority`: the baselines refit on the first folder's folds.
Only the folds both systems have are compared.

    python scripts/paired.py --data_dir corpora/written A=outputs/written/criteria-minilm B=bow --metrics paper_macro_f1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baselines  # noqa: E402
import data  # noqa: E402
from config import make_config  # noqa: E402
from intervals import corrected_t_ci  # noqa: E402

BASELINES = {"bow": "bag-of-words LR", "majority": "majority class"}


def fold_metrics(system: str, folds: dict, data_dir: str, task_flags: dict) -> dict[int, dict]:
    if system in BASELINES:
        cfg = make_config(data_dir=data_dir, **task_flags)
        corpus = data.load_corpus(data_dir)
        return {k: baselines.fold_baselines(corpus, split, cfg)["metrics"][BASELINES[system]]
                for k, split in folds.items()}
    out = {}
    for path in Path(system).glob("fold*-seed*/metrics.json"):
        out[int(path.parent.name[4:].split("-")[0])] = json.loads(path.read_text())["test"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("pair", nargs=2, help="NAME=folder|bow|majority, twice (the difference is first - second)")
    ap.add_argument("--metrics", nargs="+", required=True)
    args = ap.parse_args()
    (name_a, a), (name_b, b) = (p.split("=", 1) for p in args.pair)
    folder = Path(a if a not in BASELINES else b)
    folds = {int(p.stem[4:]): json.loads(p.read_text()) for p in sorted((folder / "splits").glob("fold*.json"))}
    cfg = yaml.safe_load(next(folder.glob("fold*-seed*/config.yaml")).read_text())
    flags = {k: cfg[k] for k in ("task", "unit", "include_negatives")}
    ma, mb = (fold_metrics(s, folds, args.data_dir, flags) for s in (a, b))
    common = sorted(set(ma) & set(mb))
    ratio = float(np.mean([len(folds[k]["test"]) / len(folds[k]["train"]) for k in common]))
    print(f"{name_a} - {name_b}, folds {common}")
    print("| metric | " + name_a + " | " + name_b + " | difference per fold | mean [corrected 95% CI] |")
    print("|---|---|---|---|---|")
    for m in args.metrics:
        da = np.array([ma[k][m] for k in common])
        db = np.array([mb[k][m] for k in common])
        d = da - db
        low, high = corrected_t_ci(d, ratio) if len(d) > 1 else (None, None)
        ci = f"[{low:.3f}, {high:.3f}]" if low is not None else "(one fold: no interval)"
        per_fold = " ".join(f"{x:+.3f}" for x in d)
        print(f"| {m} | {da.mean():.3f} | {db.mean():.3f} | {per_fold} | {d.mean():+.3f} {ci} |")


if __name__ == "__main__":
    main()
