"""Cross-validation and multi-seed refits, summaries with bootstrap confidence intervals, baselines, plots.

    python report.py --task criteria --cv_folds 5 --seeds 1 2 3     # 5-fold CV x 3 seeds on the demo corpus
    python report.py --task criteria --cv_folds 1 --seeds 1 2 3     # refit on one train/val/test split, 3 seeds
    python report.py --task evidence --cv_folds 3 --epochs 2        # any train.py flag sets the base config
    python report.py --hpo_study criteria-coarse                    # plots of an Optuna study (hpo.py makes them too)
    python report.py --task joint --cv_folds 5 --resume true        # after a crash: finished runs are read back

Folds are by post and stratified by the post's symptom profile (`splits.fold_splits`): fold k is the
test set, a stratified slice of the other folds (val_ratio of all posts) the validation set, the rest
trains. Folds depend on --seed only, so --seeds vary the training (initialisation, batch order), not
the data. Each fold x seed is one `runner.run` in output_dir/fold{k}-seed{s}/ and an MLflow run nested
under one parent run. output_dir then holds summary.json and summary.md (its tables written by plots.py):
for every test metric the mean, standard deviation, a percentile-bootstrap 95% interval of the mean over
the runs (it treats them as independent, a lower bound) and, with k >= 2 folds, the corrected resampled
t interval that allows for the training posts the runs share (Nadeau & Bengio 2003), the baselines of
baselines.py on the same folds (the majority class, a bag-of-words logistic regression and, span tasks,
the first sentence of the post), and a per-criterion table; and PNGs of the confusion matrix, PR and ROC
curves, training curves and per-criterion scores (drawn by plots.py; also in each run's folder, and logged
to MLflow). Where there is a shifted test set (the demo's held-out phrasing, or --test_shift_dir), every
run's model and every fold's baselines are scored on it too: summary_test_shift in summary.json, a second
table in summary.md.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np

import data
import rundir
import runner
import splits
from baselines import fold_baselines
from cli import parse_config
from config import Config, load_yaml_config
from files import write_text_atomic
from finished_runs import incomplete_run, run_artifacts
from intervals import summarize_runs
from metrics import classification_metrics, f1_from_counts, span_scores
from models import TASKS
from plots import plot_confusion, plot_hpo, plot_per_criterion, plot_pr_roc, plot_training, summary_markdown
from storage import DEFAULT_STORAGE, make_storage
from tracking import Tracker
from utils import UserError, run_main, setup_logging

log = logging.getLogger("redsm5")

# The ReDSM5 paper's baselines (its example notebooks, eliseobao/redsm5 examples/*.ipynb): micro / macro F1 of
# the post x label matrix, nine symptoms + NO_SYMPTOMS, threshold 0.5. Reference rows only: published, on the
# authors' own 80/20 split of the real corpus, not rerun here.
PUBLISHED_BASELINES = [
    ("TF-IDF + LinearSVC", 0.39, 0.28),
    ("1D CNN", 0.25, 0.19),
    ("bert-base-uncased (5 epochs, lr 2e-5, 512 tokens)", 0.51, 0.36),
    ("Llama-3.2-1B + classification head", 0.544, 0.489),
]
PUBLISHED_NOTE = "published, on the authors' own split, not rerun"
MAX_BOOTSTRAP = 1_000_000


def add_report_flags(parser) -> None:
    group = parser.add_argument_group("report.py")
    group.add_argument("--cv_folds", type=int, default=5,
                       help="folds grouped by post; 1 = the one train/val/test split")
    group.add_argument("--seeds", type=int, nargs="+", help="training seeds of every fold (default: --seed)")
    group.add_argument("--n_bootstrap", type=int, default=10000, help="bootstrap resamples of the interval")
    group.add_argument("--hpo_study", help="only plot this Optuna study: history and parameter importances")
    group.add_argument("--storage", default=DEFAULT_STORAGE, help="--hpo_study: its storage URL (or journal:PATH)")
    group.add_argument("--compare", nargs="+", metavar="YAML", default=[],
                       help="also run these recipes on the same folds and seeds (this report's settings with the "
                            "file's keys on top, in output_dir/vs-<name>/) and write compare.md / compare.json: "
                            "the paired differences, e.g. --compare configs/redsm5_authors.yaml")


def criterion_table(rows: list[dict], classify: bool, spans: bool, gold_only: bool | None = None) -> dict[str, dict]:
    """Per criterion and over 'all': n, support (positives), precision, recall, F1 of each row's `pred`;
    exact match and span F1 of `pred_text` against `gold_texts` (`gold_only`, as joint does: only pairs with
    gold evidence; default: when classifying too)."""
    groups = {c: [r for r in rows if r["criterion"] == c] for c in data.SYMPTOMS}
    out = {}
    for name, group in [(c, g) for c, g in groups.items() if g] + [("all", rows)]:
        res = {"n": len(group)}
        if classify:
            y, p = np.array([r["label"] for r in group]), np.array([r["pred"] for r in group])
            tp = int(((y == 1) & (p == 1)).sum())
            res.update(support=int(y.sum()), precision=tp / max(int(p.sum()), 1), recall=tp / max(int(y.sum()), 1),
                       f1=float(f1_from_counts(tp, int(p.sum()) - tp, int(y.sum()) - tp)))
        if spans:
            scored = [r for r in group if r["gold_texts"]] if (classify if gold_only is None else gold_only) else group
            s = np.array([span_scores(r["pred_text"], r["gold_texts"]) for r in scored]).reshape(-1, 2)
            res.update(pairs=len(scored), exact_match=float(s[:, 0].mean()) if len(s) else None,
                       span_f1=float(s[:, 1].mean()) if len(s) else None)
        out[name] = res
    return out


def mean_tables(tables: list[dict]) -> dict[str, dict]:
    """Criterion tables of several seeds averaged field by field; f1_std / span_f1_std over the seeds."""
    out = {}
    for c in tables[0]:
        rows = [t[c] for t in tables if c in t]
        out[c] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if rows[0][k] is not None}
        for k in ("f1", "span_f1"):
            if k in out[c]:
                out[c][k + "_std"] = float(np.std([r[k] for r in rows], ddof=1)) if len(rows) > 1 else 0.0
    return out


# --------------------------------------------------------------------------- cross-validation

def _curve(name: str, rows: list[dict], **style) -> tuple:
    return name, [r["label"] for r in rows], [r["prob"] for r in rows], style


def same_setting(name: str, saved: dict, now: dict) -> bool:
    """Whether a field of a run's config.yaml is what this report asks for. config.yaml records what ran: a
    mixed_precision of auto is saved as the precision it resolved to (rundir.resolve_run), and paths compare by
    what they point to (rundir.same_setting). A field the file lacks was added after the run: it ran as the
    field's default does (a new field's default keeps the old behaviour)."""
    if name == "mixed_precision" and now[name] == "auto":
        return True
    return rundir.same_setting(name, saved.get(name, getattr(Config, name)), now[name])


def moved_with_the_report(name: str, run_dir: Path, now: dict) -> bool:
    """A report folder that was moved or copied elsewhere resumes there: its runs are found where they are now
    (output_dir), and a fold's split file is the same setting when it holds the split the run trained on."""
    return name == "output_dir" or (name == "splits_file" and rundir.holds_its_split(now[name], run_dir))


def train_or_reuse(run_cfg: Config, resume: bool, parent_run_id: str | None = None) -> str:
    """Train one fold x seed. With --resume, a run that finished with this same config is read back
    as it is and one that stopped midway goes on from its last training state; a run of another
    config in that folder is an error, not silently mixed in. `parent_run_id`: the MLflow run it nests under."""
    run_dir = Path(run_cfg.output_dir)
    if resume and (run_dir / "config.yaml").exists():
        saved, now = load_yaml_config(run_dir / "config.yaml"), dataclasses.asdict(run_cfg)
        changed = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in now  # how the folder was entered, not the run:
                   if k not in ("resume", "overwrite_output_dir") and not same_setting(k, saved, now)
                   and not moved_with_the_report(k, run_dir, now)]
        if changed:
            raise UserError(f"{run_dir}: trained with other settings ({', '.join(changed[:3])}): "
                            "give another --output_dir, or drop --resume")
        if all((run_dir / f).exists() for f in ("history.json", "metrics.json", "predictions.jsonl")):
            why = incomplete_run(run_dir, TASKS[run_cfg.task].classify)
            if why is None:
                return "finished before, read back"  # history.json is written last
            log.warning("%s: its outputs are incomplete (%s): not finished, trained again", run_dir, why)
        if (run_dir / "checkpoints" / "last" / "COMPLETE").exists():
            runner.run(dataclasses.replace(run_cfg, resume=True), parent_run_id=parent_run_id)
            return "resumed from its last state"
        # stopped before its first training state was saved: this report's own run, of this config: start it again
        runner.run(dataclasses.replace(run_cfg, overwrite_output_dir=True), parent_run_id=parent_run_id)
        return "stopped before its first saved state: trained again"
    runner.run(run_cfg, parent_run_id=parent_run_id)
    return "trained"


def cross_validate(cfg: Config, k: int, seeds: list[int], n_boot: int, command: str) -> dict:
    """Train every fold x seed, then summarise (summary.json, summary.md, PNGs) into cfg.output_dir."""
    out_dir = Path(cfg.output_dir)
    corpus = data.load_corpus_from_config(cfg)
    folds = [splits.load_splits(cfg.splits_file, corpus)] if k == 1 and cfg.splits_file else \
        splits.fold_splits(corpus, k, cfg.seed, cfg.val_ratio, cfg.test_ratio)
    for i, split in enumerate(folds):  # a report is its test scores: a run would skip an empty test split
        if not TASKS[cfg.task].examples(corpus, split["test"], cfg):
            raise UserError(f"--cv_folds {k}: the test posts of fold {i} ({len(split['test'])}) have no examples for "
                            f"task '{cfg.task}', so nothing to score; " + ("fewer folds" if k > 1 else
                                                                          "raise --test_ratio or give other posts"))
    (out_dir / "splits").mkdir(parents=True, exist_ok=True)
    parent_cfg = dataclasses.replace(cfg, run_name=cfg.run_name or f"{cfg.task}-cv{k}x{len(seeds)}")
    with Tracker(parent_cfg, True) as parent:  # a run that raises ends the parent FAILED (KILLED on Ctrl-C)
        parent.log_params({"report.cv_folds": k, "report.seeds": " ".join(map(str, seeds))})
        shift = data.load_shift_corpus(cfg, corpus)  # one shifted test set, scored by every fold's model
        shift_ex = TASKS[cfg.task].examples(shift, sorted(shift.posts), cfg) if shift is not None else None
        runs, baselines = train_folds(cfg, corpus, folds, seeds, parent, shift_ex)
        result = summarize_cv(cfg, k, seeds, folds, runs, baselines, n_boot, command)
        pngs = summary_plots(result, runs, baselines, out_dir)
        write_text_atomic(out_dir / "summary.json", json.dumps(result, indent=2))
        write_text_atomic(out_dir / "summary.md", summary_markdown(result, [p.name for p in pngs]))
        if parent.enabled:
            for prefix, summary in (("", result["summary"]), ("test_shift_", result.get("summary_test_shift"))):
                parent.log_metrics({f"{prefix}{m}_{s}": v for m, d in (summary or {}).get("model", {}).items()
                                    for s, v in d.items() if v is not None and s in (
                                        "mean", "std", "ci_low", "ci_high", "ci_corrected_low", "ci_corrected_high")},
                                   step=0)
            for path in [out_dir / "summary.json", out_dir / "summary.md", *pngs]:
                parent.log_artifact(path)
    log.info("wrote %s and %s", out_dir / "summary.md", out_dir / "summary.json")
    return result


def train_folds(cfg: Config, corpus: data.Corpus, folds: list[dict], seeds: list[int], parent: Tracker,
                shift_ex: list[dict] | None = None) -> tuple[list[dict], list[dict]]:
    """(runs, baselines): every fold x seed trained (or read back) in output_dir/fold{k}-seed{s}/ with its
    plots, the MLflow runs nested under `parent`; the baselines of every fold (also on `shift_ex`)."""
    out_dir, task = Path(cfg.output_dir), TASKS[cfg.task]
    runs, baselines = [], []
    for fold, split in enumerate(folds):
        write_text_atomic(out_dir / "splits" / f"fold{fold}.json", json.dumps(split))
        baselines.append(fold_baselines(corpus, split, cfg, shift_ex))
        for seed in seeds:
            name = f"fold{fold}-seed{seed}"
            run_cfg = dataclasses.replace(cfg, seed=seed, splits_file=str(out_dir / "splits" / f"fold{fold}.json"),
                                          output_dir=str(out_dir / name), run_name=f"{cfg.task}-{name}", resume=False)
            log.info("=== %s: %d train / %d val / %d test posts", name, *map(len, split.values()))
            log.info("%s: %s", name, train_or_reuse(run_cfg, cfg.resume, parent.run_id))
            run = {"fold": fold, "seed": seed, "output_dir": run_cfg.output_dir,
                   **run_artifacts(out_dir / name, task.classify)}
            pngs = run_plots(cfg.task, name, run, baselines[-1], out_dir / name)
            if parent.enabled and run["mlflow_run_id"]:
                for png in pngs:
                    parent.client.log_artifact(run["mlflow_run_id"], str(png), "plots")
            runs.append(run)
    return runs, baselines


def run_plots(task: str, name: str, run: dict, fold_baseline: dict, run_dir: Path) -> list[Path]:
    """One run's PNGs in its folder: training curves; classifying, the confusion matrix at the validation
    threshold and PR/ROC curves beside the fold's bag-of-words baseline."""
    pngs = [plot_training({name: run["history"]}, run_dir / "training.png")]
    if TASKS[task].classify:
        threshold = run["metrics"]["val_threshold"]
        confusion = classification_metrics([r["label"] for r in run["rows"]],
                                           [r["pred"] for r in run["rows"]])["confusion_matrix"]
        pngs += [plot_confusion(confusion, run_dir / "confusion.png", f"{task} {name}: test fold\n"
                                f"(threshold {threshold:.2f}, chosen on validation)"),
                 plot_pr_roc([_curve("model", run["rows"], lw=1.5),
                              _curve("bag-of-words LR", fold_baseline["rows"]["bag-of-words LR"], lw=2, ls="--",
                                     color="black")],
                             run_dir / "pr_roc.png", f"{task} {name}: test fold")]
    return pngs


def summarize_cv(cfg, k, seeds, folds, runs, baselines, n_boot, command) -> dict:
    """What summary.json holds: the model over runs, baselines over folds, the per-criterion tables."""
    task = TASKS[cfg.task]
    # k folds: training sets overlap, so the corrected t interval too (test / train posts, mean over folds)
    ratio = float(np.mean([len(f["test"]) / len(f["train"]) for f in folds])) if k > 1 else None
    summary = {"model": summarize_runs([r["metrics"] for r in runs], n_boot, ratio)}
    for name in baselines[0]["metrics"]:
        summary[name] = summarize_runs([b["metrics"][name] for b in baselines], n_boot)
    shifted = None
    if all(r["shift_metrics"] for r in runs):  # the same shifted set for every run: still their training overlaps
        shifted = {"model": summarize_runs([r["shift_metrics"] for r in runs], n_boot, ratio)}
        for name in baselines[0]["shift_metrics"]:
            shifted[name] = summarize_runs([b["shift_metrics"][name] for b in baselines], n_boot)
    # per criterion: each seed's test rows pooled over the folds (every post scored once), then the mean over seeds
    by_seed = [[row for r in runs if r["seed"] == s for row in r["rows"]] for s in seeds]
    per_criterion = {"model": mean_tables([criterion_table(rows, task.classify, task.spans) for rows in by_seed])}
    for name in baselines[0]["rows"]:
        pooled = [row for b in baselines for row in b["rows"][name]]
        per_criterion[name] = criterion_table(pooled, "pred" in pooled[0], "pred_text" in pooled[0], task.classify)
    published = [{"name": n, "paper_micro_f1": mi, "paper_macro_f1": ma, "note": PUBLISHED_NOTE}
                 for n, mi, ma in PUBLISHED_BASELINES] if "paper_micro_f1" in summary["model"] else []
    return {"command": command, "task": cfg.task, "cv_folds": k, "seeds": seeds,
            "folds": [{s: len(f[s]) for s in ("train", "val", "test")} for f in folds],
            "runs": [{key: r[key] for key in ("fold", "seed", "output_dir", "metrics", "shift_metrics", "per_symptom",
                                              "train_seconds")} for r in runs],
            "baseline_per_symptom": baseline_per_symptom(baselines),
            "summary": summary, **({"summary_test_shift": shifted} if shifted else {}), "per_criterion": per_criterion,
            "published": published}


def baseline_per_symptom(baselines: list[dict]) -> dict[str, dict]:
    """The paper's per-label F1 of each baseline (at 0.5, and `_tuned`), mean over the folds; {} off the paper task."""
    out = {}
    for name, metrics in baselines[0]["metrics"].items():
        for key in ("paper_per_symptom", "paper_per_symptom_tuned"):
            if key in metrics:
                out.setdefault(name, {})[key] = {label: float(np.mean([b["metrics"][name][key][label]["f1"]
                                                                       for b in baselines]))
                                                 for label in metrics[key]}
    return out


def summary_plots(result: dict, runs: list[dict], baselines: list[dict], out_dir: Path) -> list[Path]:
    task, pc = result["task"], result["per_criterion"]
    pngs = [plot_training({f"fold{r['fold']}-seed{r['seed']}": r["history"] for r in runs}, out_dir / "training.png")]
    panels = []
    if TASKS[task].classify:
        cm = np.sum([classification_metrics([x["label"] for x in r["rows"]], [x["pred"] for x in r["rows"]])
                     ["confusion_matrix"] for r in runs], axis=0)
        pngs.append(plot_confusion(cm, out_dir / "confusion.png", f"{task}: test folds, summed over {len(runs)} runs"
                                   "\n(threshold chosen on validation per run)"))
        curves = [_curve(f"fold{r['fold']}-seed{r['seed']}", r["rows"], lw=1, alpha=0.8) for r in runs]
        bow = [row for b in baselines for row in b["rows"]["bag-of-words LR"]]
        curves.append(_curve("bag-of-words LR (all folds)", bow, lw=2, ls="--", color="black"))
        pngs.append(plot_pr_roc(curves, out_dir / "pr_roc.png", f"{task}: test folds ({int(cm.sum()):,} rows)"))
        panels.append(("F1 per criterion (mean over seeds)",
                       {n: {c: v["f1"] for c, v in pc[n].items()} for n in ("model", "bag-of-words LR")}))
    if TASKS[task].spans:
        panels.append(("span F1 per criterion (mean over seeds)",
                       {n: {c: v["span_f1"] for c, v in pc[n].items() if v.get("span_f1") is not None}
                        for n in ("model", "first sentence")}))
    return pngs + [plot_per_criterion(panels, out_dir / "per_criterion.png")]


# --------------------------------------------------------------------------- command line

def hpo_plots(args, cfg: Config) -> list[Path]:
    import optuna

    try:
        study = optuna.load_study(study_name=args.hpo_study, storage=make_storage(args.storage))
    except KeyError:
        raise UserError(f"--hpo_study: no study '{args.hpo_study}' in {args.storage}") from None
    out = Path(cfg.output_dir) if cfg.output_dir != Config.output_dir else Path("outputs/hpo") / args.hpo_study
    paths = plot_hpo(study, out)
    log.info("wrote %s", ", ".join(map(str, paths)))
    return paths


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, args = parse_config(argv, prog="report.py", extra=add_report_flags, doc=__doc__)
    setup_logging(True)
    if args.hpo_study:
        return hpo_plots(args, cfg)
    if args.cv_folds < 1:
        raise UserError(f"--cv_folds: must be >= 1, got {args.cv_folds}")
    if not 100 <= args.n_bootstrap <= MAX_BOOTSTRAP:  # resamples x runs are drawn at once: 1e9 would not fit
        raise UserError(f"--n_bootstrap: must be between 100 and {MAX_BOOTSTRAP:,}, got {args.n_bootstrap}")
    bad = next((s for s in args.seeds or [] if not 0 <= s < 2**32), None)
    if bad is not None:  # numpy's generators take 0 .. 2**32 - 1
        raise UserError(f"--seeds: each must be between 0 and 4294967295, got {bad}")
    seeds = list(dict.fromkeys(args.seeds or [cfg.seed]))
    if cfg.output_dir == Config.output_dir:
        cfg = dataclasses.replace(cfg, output_dir=f"outputs/report/{cfg.task}-cv{args.cv_folds}")
    from compare import compare_config, compare_markdown, paired

    others = [(path, compare_config(cfg, path)) for path in args.compare]  # a bad file fails before any training
    result = cross_validate(cfg, args.cv_folds, seeds, args.n_bootstrap, "python report.py " + " ".join(argv))
    for path, other in others:
        theirs = cross_validate(other, args.cv_folds, seeds, args.n_bootstrap, f"{result['command']} ({path})")
        cmp = paired(result, theirs)
        name = Path(path).stem
        out = Path(cfg.output_dir)
        write_text_atomic(out / f"compare-{name}.json", json.dumps(cmp, indent=2))
        write_text_atomic(out / f"compare-{name}.md", compare_markdown(name, result, cmp))
        log.info("wrote %s", out / f"compare-{name}.md")
    return result


if __name__ == "__main__":
    run_main(main)
