"""Figures for reports and HPO studies, as PNG files: confusion matrix, PR and ROC curves, training
curves, per-criterion scores, an Optuna study's history and parameter importances.

Pure drawing: each function takes plain values (lists, dicts, an Optuna study) and a path, writes one
PNG and returns its path. matplotlib is imported on first use with the Agg backend (no display needed).
Near-perfect curves and scores are zoomed, and the title says so.
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
