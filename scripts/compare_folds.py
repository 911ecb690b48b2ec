"""report.py --compare's table from two report folders whose cross-validations did not both finish: the folds x seeds
both have, paired (compare.paired, compare.compare_markdown), and the baselines refit on those folds.

    python scripts/compare_folds.py --data_dir corpora/written outputs/written/criteria-minilm \
        outputs/written/criteria-authors-minilm --name redsm5_authors --out outputs/written/compare
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import baselines  # noqa: E402
import compare  # noqa: E402
import data  # noqa: E402
import report  # noqa: E402
from config import load_yaml_config, make_config  # noqa: E402
from finished_runs import incomplete_run, run_artifacts  # noqa: E402
from intervals import summarize_runs  # noqa: E402


def finished_runs(folder: Path) -> list[dict]:
    runs = []
    for run_dir in sorted(folder.glob("fold*-seed*")):
        if incomplete_run(run_dir, True) is None:
            fold, seed = (int(x) for x in run_dir.name[4:].split("-seed"))
            runs.append({"fold": fold, "seed": seed, **run_artifacts(run_dir, True)})
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("ours")
    ap.add_argument("theirs")
    ap.add_argument("--name", default="theirs")
    ap.add_argument("--out", required=True, help="folder for compare-NAME.md / .json")
    args = ap.parse_args()
    ours_dir, theirs_dir = Path(args.ours), Path(args.theirs)
    ours, theirs = finished_runs(ours_dir), finished_runs(theirs_dir)
    common = sorted({(r["fold"], r["seed"]) for r in ours} & {(r["fold"], r["seed"]) for r in theirs})
    folds = sorted({f for f, _ in common})
    splits = {k: json.loads((ours_dir / "splits" / f"fold{k}.json").read_text()) for k in folds}
    for k in folds:  # the same test posts, or the pairing means nothing
        assert splits[k] == json.loads((theirs_dir / "splits" / f"fold{k}.json").read_text()), k
    saved = load_yaml_config(next(ours_dir.glob("fold*-seed*/config.yaml")))
    cfg = make_config(data_dir=args.data_dir, task=saved["task"], unit=saved["unit"])
    corpus = data.load_corpus(args.data_dir)
    fitted = [baselines.fold_baselines(corpus, splits[k], cfg) for k in folds]
    results = []
    for runs in (ours, theirs):
        runs = [r for r in runs if (r["fold"], r["seed"]) in common]
        summary = {name: summarize_runs([b["metrics"][name] for b in fitted]) for name in fitted[0]["metrics"]}
        results.append({"command": f"python scripts/compare_folds.py {' '.join(sys.argv[1:])}", "runs": runs,
                        "folds": [{s: len(splits[k][s]) for s in ("train", "val", "test")} for k in folds],
                        "summary": summary, "baseline_per_symptom": report.baseline_per_symptom(fitted)})
    cmp = compare.paired(*results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"compare-{args.name}.json").write_text(json.dumps(cmp, indent=2))
    (out / f"compare-{args.name}.md").write_text(compare.compare_markdown(args.name, results[0], cmp))
    print((out / f"compare-{args.name}.md").read_text())


if __name__ == "__main__":
    main()
