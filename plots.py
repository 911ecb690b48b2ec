"""Figures and tables of report.py (and hpo.py's study plots): PNG figures and summary.md's markdown tables.

Figures: confusion matrix, PR and ROC curves, training curves, per-criterion scores, an Optuna study's
history and parameter importances. Pure drawing: each function takes plain values (lists, dicts, an Optuna
study) and a path, writes one PNG and returns its path. matplotlib is imported on first use with the Agg
backend (no display needed). Near-perfect curves and scores are zoomed, and the title says so.

Tables: `summary_markdown` turns report.py's summary.json dict into summary.md: every metric of the model
with its intervals beside the baselines, the shifted test set, the per-criterion table, the ReDSM5 paper's
numbers beside the published ones, every run. Pure formatting: dicts in, text out.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import data


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def plot_confusion(cm, path: Path, title: str) -> Path:
    plt, cm = _pyplot(), np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ax.imshow(cm / cm.sum(1, keepdims=True).clip(min=1), cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(cm):
        share = v / max(cm[i].sum(), 1)
        ax.text(j, i, f"{v:,}\n{share:.1%} of row", ha="center", va="center", color="white" if share > 0.5 else "black")
    ax.set_xticks([0, 1], ["predicted 0", "predicted 1"])
    ax.set_yticks([0, 1], ["true 0", "true 1"])
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_pr_roc(curves: list[tuple], path: Path, title: str) -> Path:
    """curves: (name, labels, probs, line style kwargs); PR on the left, ROC on the right."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    plt = _pyplot()
    fig, (ax_pr, ax_roc) = plt.subplots(1, 2, figsize=(11, 4.6))
    low_precision, high_fpr = 1.0, 0.0  # how far the curves stray from the perfect corner: the zoom
    for name, labels, probs, style in curves:
        if len(set(labels)) < 2:
            continue
        precision, recall, _ = precision_recall_curve(labels, probs)
        ax_pr.plot(recall, precision, label=f"{name} (AP {average_precision_score(labels, probs):.3f})", **style)
        fpr, tpr, _ = roc_curve(labels, probs)
        ax_roc.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(labels, probs):.3f})", **style)
        middle = (recall >= 0.05) & (recall <= 0.98)  # every PR curve ends at (1, prevalence): not informative
        low_precision = min(low_precision, precision[middle].min() if middle.any() else 0.0)
        high_fpr = max(high_fpr, fpr[np.argmax(tpr >= 0.99)])
    prevalence = float(np.mean(curves[0][1]))
    ax_pr.axhline(prevalence, color="grey", ls=":", lw=1, label=f"majority class / chance ({prevalence:.2f})")
    ax_roc.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="majority class / chance (AUC 0.5)")
    # near-perfect curves all hug the corner: zoom in (and say so) so that they can be told apart
    y_low = 0.0 if low_precision < 0.75 else math.floor((low_precision - 0.02) * 50) / 50
    x_high = 1.0 if high_fpr > 0.4 else max(0.05, math.ceil(high_fpr * 1.5 * 20) / 20)
    ax_pr.set(xlabel="recall", ylabel="precision", xlim=(0, 1.01), ylim=(y_low, 1.005),
              title="precision-recall" + (f" (zoomed: precision >= {y_low:.2f})" if y_low else ""))
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", ylim=(0 if x_high == 1 else 0.8, 1.005),
               xlim=(-0.002, x_high),
               title="ROC" + (f" (zoomed: FPR <= {x_high:.2f}, TPR >= 0.8)" if x_high < 1 else ""))
    for ax in (ax_pr, ax_roc):
        ax.legend(fontsize=7, loc="lower left" if ax is ax_pr else "lower right")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_training(histories: dict[str, dict], path: Path) -> Path:
    """Loss and learning rate per logged step, validation metric per epoch; one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name, h in histories.items():
        steps = [r["step"] for r in h["steps"]]
        line, = axes[0].plot(steps, [r["train_loss"] for r in h["steps"]], lw=1, label=name)
        axes[1].plot(steps, [r["lr"] for r in h["steps"]], lw=1, color=line.get_color())
        axes[2].plot([v["step"] for v in h["val"]], [v[h["metric"]] for v in h["val"]], marker="o", lw=1,
                     color=line.get_color())
    metric = next(iter(histories.values()))["metric"] if histories else "metric"
    losses = [r["train_loss"] for h in histories.values() for r in h["steps"]]
    wide = bool(losses) and min(losses) > 0 and max(losses) / min(losses) > 20  # log scale only when it helps
    axes[0].set(title="training loss" + (" (log scale)" if wide else ""), xlabel="optimizer step",
                yscale="log" if wide else "linear")
    axes[1].set(title="learning rate", xlabel="optimizer step")
    axes[2].set(title=f"validation {metric} (per epoch)", xlabel="optimizer step")
    for ax in axes:
        ax.grid(alpha=0.3)
    if 1 < len(histories) <= 12:
        axes[0].legend(fontsize=7)
    return _save(fig, path)


def plot_per_criterion(panels: list[tuple[str, dict[str, dict]]], path: Path) -> Path:
    """Grouped bars, one panel per (title, {series: {criterion: value}})."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 4.4), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        names = [c for c in data.SYMPTOMS if any(c in s for s in series.values())]
        ys = np.array([[values.get(c, np.nan) for c in names] for values in series.values()], dtype=float)
        first_best = np.nanargmax(ys, axis=0)
        for i, (label, y, marker) in enumerate(zip(series, ys, "osD^v")):
            x = np.arange(len(names)) + (i - (len(series) - 1) / 2) * 0.15
            ax.plot(x, y, marker, ms=7, label=label)
            for xi, v, best in zip(x, y, first_best):  # the best value labelled above, the others below: no overlap
                ax.annotate(f"{v:.3f}", (xi, v), textcoords="offset points", xytext=(0, 7 if best == i else -12),
                            ha="center", fontsize=6)
        lowest = np.nanmin(ys) if np.isfinite(ys).any() else 1.0
        ax.set_xticks(np.arange(len(names)), [c.lower().replace("_", "\n") for c in names], fontsize=7)
        y_low = math.floor(max(0.0, lowest - 0.05) * 10) / 10  # a dot plot needs no zero baseline: zoom to the data
        pad = (1 - y_low) * 0.08
        ax.set(ylim=(y_low - pad, 1 + pad), title=title + (f" (axis from {y_low:.1f})" if y_low else ""))
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_hpo(study, out_dir: Path) -> list[Path]:
    """hpo_history.png (value per trial, best so far) and hpo_importances.png (fANOVA, seeded)."""
    import optuna

    plt, out_dir = _pyplot(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    pruned = [t for t in study.trials if t.state.name == "PRUNED" and t.intermediate_values]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([t.number for t in done], [t.value for t in done], label="complete", zorder=3)
    ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
               marker="x", color="grey", label="pruned (last reported)")
    if done:
        best = (np.maximum if study.direction.name == "MAXIMIZE" else np.minimum).accumulate([t.value for t in done])
        ax.step([t.number for t in done], best, where="post", color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel=study.user_attrs.get("metric", "objective"), title=f"study {study.study_name}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths = [_save(fig, out_dir / "hpo_history.png")]
    fig, ax, reason = *plt.subplots(figsize=(7, 4)), "no parameter varied"
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError) as e:  # fewer than two complete trials, or nothing varied
        importances, reason = {}, str(e).split("\n")[0][:80]
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names])
        for y, name in enumerate(names):
            ax.annotate(f"{importances[name]:.2f}", (importances[name], y), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7)
        ax.set(xlabel="fANOVA importance (share of the objective's variance)",
               title=f"parameter importances ({len(done)} complete trials"
                     + (": few, a rough estimate)" if len(done) < 20 else ")"))
    else:
        ax.text(0.5, 0.5, f"no importances: {reason}", ha="center", wrap=True)
        ax.set_axis_off()
    paths.append(_save(fig, out_dir / "hpo_importances.png"))
    return paths


# --------------------------------------------------------------------------- markdown tables

def _cell(d: dict | None, ci: bool = False, corrected: bool = False) -> str:
    if not d or d["mean"] is None:
        return "–"
    text = f"{d['mean']:.3f} ± {d['std']:.3f}"
    if ci:
        text += f" | [{d['ci_low']:.3f}, {d['ci_high']:.3f}]"
    if corrected:
        low, high = d.get("ci_corrected_low"), d.get("ci_corrected_high")
        text += f" | [{low:.3f}, {high:.3f}]" if low is not None else " | –"
    return text


def metric_table(summary: dict, corrected: bool) -> list[str]:
    """Markdown rows: every metric of the model (mean ± std, intervals) beside the baselines (mean ± std)."""
    baselines = [n for n in summary if n != "model"]
    lines = ["| metric | model | 95% CI | " + ("corrected 95% CI | " if corrected else "") + " | ".join(baselines)
             + " |", "|---|---|---|" + "---|" * (len(baselines) + corrected)]
    for metric, d in summary["model"].items():
        lines.append(f"| {metric} | {_cell(d, ci=True, corrected=corrected)} | "
                     + " | ".join(_cell(summary[b].get(metric)) for b in baselines) + " |")
    return lines


def summary_markdown(result: dict, pngs: list[str]) -> str:
    summary, k, seeds = result["summary"], result["cv_folds"], result["seeds"]
    design = f"{k}-fold cross-validation (grouped by post, stratified)" if k > 1 else "one train/val/test split"
    corrected = k > 1
    lines = [f"# {result['task']}: {design} x {len(seeds)} seed(s)", "", f"`{result['command']}`", "",
             f"{len(result['runs'])} runs (seeds {', '.join(map(str, seeds))}); posts per fold (train / val / test): "
             + ", ".join(f"{f['train']} / {f['val']} / {f['test']}" for f in result["folds"]) + ".", "",
             "Test metrics of each run's best checkpoint: mean ± standard deviation over the runs and a percentile "
             "bootstrap 95% interval of the mean" + (", which treats the runs as independent; they share training "
             "posts, so the corrected resampled t interval (Nadeau & Bengio 2003, variance (1/n + n_test/n_train) s², "
             "t with n - 1 degrees of freedom; unbounded, so it may pass 1 near the ceiling) is the one to quote."
             if corrected else ".")
             + (" Classification metrics at threshold 0.5 unless "
             "`_at_val_threshold` (chosen per run for the best macro F1 on its validation posts)."
             if "val_threshold" in summary["model"] else "") + " Baselines on the same test folds: mean ± std over "
             "the folds.", ""] + metric_table(summary, corrected)
    shifted = result.get("summary_test_shift")
    if shifted:
        lines += ["", "## Shifted test set (test_shift)", "",
                  "Every run's best checkpoint (thresholds from its own validation posts) and the baselines of every "
                  "fold on one separate corpus written with phrasing that no training post uses (the demo's held-out "
                  "phrase items, or `--test_shift_dir`). The set is the same for all runs, so the intervals are "
                  "over training variation only.", ""] + metric_table(shifted, corrected)
    thresholded = "val_threshold" in summary["model"]
    at_threshold = (", classified at each run's one validation-chosen threshold, pooled over the criteria (the "
                    "paper_*_tuned metrics tune a cut per symptom instead)") if thresholded else ""
    lines += ["", "## Per criterion", "",
              "Model: each seed's test predictions pooled over the folds (every post scored once per seed)"
              + at_threshold
              + "; the mean over seeds (± std over seeds). n = examples, support = positive examples, pairs = "
              "(criterion, post) pairs whose spans are scored.", ""]
    lines += criterion_markdown(result["per_criterion"])
    lines += paper_table(summary, result.get("published", []))
    lines += ["", "## Runs", "", "| run | " + " | ".join(list(summary["model"])[:6]) + " |",
              "|---|" + "---:|" * len(list(summary["model"])[:6])]
    for r in result["runs"]:
        lines.append(f"| fold{r['fold']}-seed{r['seed']} | " + " | ".join(
            f"{r['metrics'].get(m, float('nan')):.3f}" for m in list(summary["model"])[:6]) + " |")
    lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in pngs]
    return "\n".join(lines) + "\n"


def criterion_markdown(pc: dict) -> list[str]:
    """The per-criterion table: the model's pooled test predictions beside the baselines'."""
    model = pc["model"]
    cls, spans = "f1" in model["all"], "span_f1" in model["all"]
    head, rule = ["criterion", "n"], ["---", "---:"]
    if cls:
        head += ["support", "precision", "recall", "F1", "bag-of-words LR F1"]
        rule += ["---:"] * 5
    if spans:
        head += ["pairs", "exact match", "span F1", "first-sentence span F1"]
        rule += ["---:"] * 4
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for c, m in model.items():
        cells = [c, f"{m['n']:.0f}"]
        if cls:
            bow = pc["bag-of-words LR"].get(c, {})
            cells += [f"{m['support']:.0f}", f"{m['precision']:.3f}", f"{m['recall']:.3f}",
                      f"{m['f1']:.3f} ± {m['f1_std']:.3f}", f"{bow['f1']:.3f}" if bow else "–"]
        if spans:
            first = pc["first sentence"].get(c, {})
            cells += [f"{m['pairs']:.0f}", f"{m.get('exact_match', float('nan')):.3f}",
                      f"{m.get('span_f1', float('nan')):.3f} ± {m.get('span_f1_std', float('nan')):.3f}",
                      f"{first['span_f1']:.3f}" if first.get("span_f1") is not None else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def paper_table(summary: dict, published: list[dict]) -> list[str]:
    """Markdown lines: the ReDSM5 paper's numbers of the model and the baselines scored here, beside the
    published baselines as reference rows (their split, their corpus: not a like-for-like comparison)."""
    if "paper_micro_f1" not in summary["model"]:
        return []
    keys = ("paper_micro_f1", "paper_macro_f1", "paper_micro_f1_tuned", "paper_macro_f1_tuned")
    lines = ["", "## Compared with the ReDSM5 paper", "",
             "The paper's protocol: (post, criterion) predictions folded into the post x label matrix of the nine "
             "symptoms plus NO_SYMPTOMS (predicted where no symptom is), micro and macro F1 over the ten labels as "
             "scikit-learn's classification_report gives them, threshold 0.5; tuned = per-symptom thresholds "
             "chosen on each run's validation posts. Ours: mean ± std over runs (baselines: over folds). "
             "(f1_macro above is the two-class macro over pairs: not comparable.)", "",
             "| system | micro F1 | macro F1 | micro F1 (tuned) | macro F1 (tuned) | source |",
             "|---|---:|---:|---:|---:|---|"]
    for name, metrics in summary.items():
        source = "this report" if name == "model" else "this report, same test posts"
        lines.append(f"| {name} | " + " | ".join(_cell(metrics.get(k)) for k in keys) + f" | {source} |")
    for p in published:
        lines.append(f"| {p['name']} | {p['paper_micro_f1']:.3f} | {p['paper_macro_f1']:.3f} | – | – | {p['note']} |")
    return lines

