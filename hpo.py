"""Optuna hyperparameter search over train.py's own training loop: one trial = one `runner.run` in process.

    python hpo.py --task criteria --n_trials 20                     # coarse study over configs/hpo/criteria.yaml
    python hpo.py --task criteria --n_trials 20 --stage fine        # narrowed around the best trials of criteria-coarse
    python hpo.py --task evidence --n_trials 12 --demo_posts 300 --epochs 3   # any train.py flag: the base config
    python hpo.py --task joint --n_trials 40 & python hpo.py --task joint --n_trials 40   # two workers, one study
    python train.py --config outputs/hpo/criteria-coarse/best_config.yaml                  # retrain the best trial

Every trial trains the base config (`--config` and train.py flags, seed included) with the fields
of the search space (`--space`, default configs/hpo/<task>.yaml) sampled by TPE, reports the
validation metric that early stopping watches after each epoch (so the pruner can stop it), and
returns that metric of its best checkpoint. A trial that fails (NaN loss, out of memory) is
recorded as failed with its reason and the study goes on; a study that ends with no complete trial
and a failed one exits 2 with the first failure's reason. A study keeps the space it was created with, and what
its trials' values mean (the metric and the data: another --space, --early_stopping_metric or corpus on it is an
error; give a new --study_name).

--n_trials is the size of the study, not of this run: the same command run again after a kill
adds only the missing trials (several workers can end a trial or two past it: each finishes the
trial it is running). The study lives in --storage (default sqlite:///outputs/hpo/optuna.db). A
trial whose worker died is marked failed once its heartbeat is 30 s old (by the next trial any
worker starts) and is run once more with the same parameters; a worker started on the same host
does that at once for the RUNNING trials of processes of this host that are gone (any storage,
journal included), and those failed trials do not count toward --n_trials. Workers started N times on one
storage share the study (trial n samples with seed + n, so no two draw alike). SQLite is fine
for a few workers on one machine; for many workers or machines use PostgreSQL
(--storage postgresql://user:password@host/db, pip install -e '.[postgres]') or, without a database server, a
journal file on a shared filesystem (--storage journal:outputs/hpo/journal.log; no heartbeat
there: a dead worker's trial on another host stays RUNNING; a partial last record, left by a worker
killed while appending or a full disk, is dropped at the next start, the old file kept as .bak).
A worker paused past the grace period (SIGSTOP) whose trial another worker failed and reran drops
that trial with one warning and goes on.

Outputs in outputs/hpo/<study>/ (or --output_dir), one study per folder: study.json (its storage and
name, written by its first worker; a study of another storage or name is refused there), trial_<n>/
(a train.py run; its checkpoints/last is deleted, and all checkpoints of pruned or failed trials),
best_config.yaml (a config `train.py --config` takes as is, reproducing the best trial),
trials_history.json, hpo_history.png and hpo_importances.png (plots.plot_hpo). With MLflow on:
one parent run per study and a nested run per trial.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import socket
import time
import warnings
from collections import namedtuple
from pathlib import Path

import optuna
import torch
import yaml

import runner
import train
from cli import parse_config
from config import DATA_FIELDS, Config, make_config
from files import write_text_atomic
from plots import plot_hpo
from scoring import metric_names
from search_space import (
    TrialSeededTPE,
    best_trials,
    check_same_fingerprint,
    check_same_space,
    fingerprint,
    sample_params,
    study_space,
)
from storage import (
    DEFAULT_STORAGE,
    QuietLostTrials,
    check_study_dir,
    finished_elsewhere,
    make_storage,
    newly_lost,
    note,
    recover_dead_trials,
    redact,
)
from study_runs import close_trial_run, open_parent_run
from tracking import Tracker
from utils import UserError, run_main, setup_logging

log = logging.getLogger("redsm5")
PRUNERS = ("median", "halving", "hyperband", "none")
DEFAULT_PRUNER = "median"  # the fewest steps at about the best value: results/2026-12-02_hpo-pruners.md
FINISHED = ("COMPLETE", "PRUNED", "FAIL")  # trial states that count toward --n_trials (but see counts_toward_n_trials)


def add_hpo_flags(parser) -> None:
    group = parser.add_argument_group("hpo.py")
    group.add_argument("--n_trials", type=int, default=20, help="trials the study should have (finished ones count)")
    group.add_argument("--stage", choices=("coarse", "fine"), default="coarse")
    group.add_argument("--space", help="search space YAML (default configs/hpo/<task>.yaml)")
    group.add_argument("--storage", default=DEFAULT_STORAGE, help="Optuna storage URL, or journal:PATH")
    group.add_argument("--study_name", help="default <task>-<stage>")
    group.add_argument("--coarse_study", help="fine stage: the study to narrow around (default <task>-coarse)")
    group.add_argument("--top_k", type=int, default=5, help="fine stage: best coarse trials the space is narrowed to")
    group.add_argument("--pruner", choices=PRUNERS, default=DEFAULT_PRUNER)
    group.add_argument("--timeout", type=float, help="seconds after which this worker starts no new trial")


def check_args(args, cfg: Config) -> None:
    """The hpo.py flags and the watched metric, checked before any study is opened or trial run."""
    if args.n_trials < 1:
        raise UserError(f"--n_trials: must be >= 1, got {args.n_trials} (the number of trials the study should have)")
    if args.top_k < 1:
        raise UserError(f"--top_k: must be >= 1, got {args.top_k}")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UserError(f"--timeout: must be a number of seconds > 0, got {args.timeout}")
    name = args.study_name  # it names the folder outputs/hpo/<study>: it must stay one folder there
    if name is not None and (name.strip() in ("", ".", "..") or "/" in name or "\\" in name or not name.isprintable()):
        raise UserError(f"--study_name {name!r}: not a plain name (it names the folder outputs/hpo/<study>: no path "
                        "separator, not '.' or '..', no control character); give a name like criteria-run2")
    if cfg.eval_every:
        raise UserError(f"--eval_every {cfg.eval_every}: hpo.py prunes and compares trials at epoch ends (trials of "
                        "other batch sizes after the same data); leave it at 0 here")
    if cfg.early_stopping_metric != "auto":  # every trial would fail at its first validation
        valid = metric_names(cfg)
        if cfg.early_stopping_metric not in valid:
            raise UserError(f"--early_stopping_metric: '{cfg.early_stopping_metric}' is not a {cfg.task} metric "
                            f"(choose from auto, {', '.join(valid)})")


# --------------------------------------------------------------------------- the data, prepared once per setting

DataKey = namedtuple("DataKey", DATA_FIELDS)  # every Config field tagged data=True: none can be missing from the key
_DATA_CACHE: dict = {}  # one setting at a time: features of big corpora are large


def prepared_data(cfg: Config) -> train.PreparedData:
    """train.prepare_data, reused by every trial of the same data setting in this process."""
    key = DataKey(*(getattr(cfg, name) for name in DataKey._fields))
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = train.prepare_data(cfg)
    return _DATA_CACHE[key]


# --------------------------------------------------------------------------- trials

def trial_config(base: Config, params: dict, output_dir: Path, run_name: str | None = None) -> Config:
    """The base config with the sampled fields; make_config rejects combinations that cannot train."""
    return make_config(**{**dataclasses.asdict(base), **params, "output_dir": str(output_dir), "run_name": run_name,
                          "resume": False})


class PruneAtValidation:
    """runner.run's `on_validation` of one trial: reports the watched metric to Optuna after each
    epoch, prunes there, and keeps the optimizer steps trained up to that validation."""

    def __init__(self, trial, cfg: Config, metric: str):
        self.trial, self.cfg, self.metric, self.steps_done = trial, cfg, metric, 0

    def __call__(self, epoch: int, metrics: dict, step: int, total: int) -> None:
        self.steps_done = step
        self.trial.report(metrics[self.metric], epoch)
        # After the last validation training is over: pruning then would only throw its result away.
        if self.steps_done < total and self.trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch}: {self.metric} {metrics[self.metric]:.4f}")


def is_fatal(e: BaseException) -> bool:
    """A failure of the base config, not of the trial's sampled values: every trial would fail alike."""
    return isinstance(e, UserError) and str(e).startswith("--early_stopping_metric")


def objective(trial, base: Config, space: dict, metric: str, study_dir: Path, parent_run_id: str | None,
              fatal: list | None = None, lost: list | None = None) -> float:
    """One trial. A fatal error (is_fatal) is also put in `fatal`: run_trials then stops the study and raises it.
    A trial another worker finished meanwhile (finished_elsewhere) is put in `lost`: run_trials moves on."""
    t0, pruning, lost = time.perf_counter(), None, [] if lost is None else lost
    # Who runs it: a trial left RUNNING by a dead process of this host is recovered at the next start
    note(trial, "worker_host", socket.gethostname(), lost)
    note(trial, "worker_pid", os.getpid(), lost)
    try:
        if trial.number in lost:
            raise optuna.exceptions.UpdateFinishedTrialError(f"trial {trial.number} is finished already")
        name = f"trial_{trial.number}"
        cfg = trial_config(base, sample_params(trial, space), study_dir / name, run_name=name)
        trial.set_user_attr("config", dataclasses.asdict(cfg))  # exactly what ran, whatever later workers' flags
        pruning = PruneAtValidation(trial, cfg, metric)
        # parent_run_id: the trial's MLflow run nests under the study's; the data is prepared once per setting
        results = runner.run(cfg, on_validation=pruning, parent_run_id=parent_run_id, prepare=prepared_data)
        trial.set_user_attr("train_steps", results["train"]["steps"])
        if not math.isfinite(results["val"][metric]):
            raise ValueError(f"val {metric} is {results['val'][metric]}")
        return results["val"][metric]
    except (Exception, KeyboardInterrupt) as e:
        if finished_elsewhere(e) and trial.number not in lost:
            lost.append(trial.number)
        if not isinstance(e, optuna.TrialPruned):
            note(trial, "fail_reason", f"{type(e).__name__}: {e}"[:2000], lost)
        if fatal is not None and is_fatal(e):
            fatal.append(e)
        if pruning and pruning.steps_done:  # up to the last validation; a trial that failed before it: unknown
            note(trial, "train_steps", pruning.steps_done, lost)
        raise
    finally:
        note(trial, "seconds", round(time.perf_counter() - t0, 2), lost)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # an out-of-memory trial must not starve the next one


# --------------------------------------------------------------------------- outputs

def trial_record(t) -> dict:
    reason = t.user_attrs.get("fail_reason") or ("no heartbeat: its worker died" if t.state.name == "FAIL" else None)
    return {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
            "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
            "train_steps": t.user_attrs.get("train_steps"), "seconds": t.user_attrs.get("seconds"),
            "fail_reason": reason, "retry_of": t.system_attrs.get("failed_trial"),
            "output_dir": t.user_attrs.get("config", {}).get("output_dir"),
            "start": t.datetime_start.isoformat() if t.datetime_start else None,
            "end": t.datetime_complete.isoformat() if t.datetime_complete else None}


def write_outputs(study, study_dir: Path, metric: str) -> dict:
    """trials_history.json and best_config.yaml from the storage: every worker's trials. Several workers
    rewrite the same files: each is written atomically, so a reader never sees half of one."""
    trials = [trial_record(t) for t in study.trials]
    counts = {s: sum(t["state"] == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    best = best_trials(study, 1)
    summary = {"study": study.study_name, "direction": study.direction.name.lower(), "metric": metric,
               "counts": counts, "train_steps": sum(t["train_steps"] or 0 for t in trials),
               "best_trial": best[0].number if best else None, "best_value": best[0].value if best else None,
               "search_space": study.user_attrs.get("search_space"), "trials": trials}
    study_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(study_dir / "trials_history.json", json.dumps(summary, indent=2))
    if best and isinstance(best[0].user_attrs.get("config"), dict):  # not a trial told from outside hpo.py
        config = {**best[0].user_attrs["config"], "output_dir": str(study_dir / "best"), "run_name": None}
        header = (f"# Best trial {best[0].number} of study {study.study_name}: val {metric} = {best[0].value:.6f}\n"
                  f"# Reproduce: python train.py --config {study_dir / 'best_config.yaml'}\n")
        write_text_atomic(study_dir / "best_config.yaml", header + yaml.safe_dump(config, sort_keys=False))
    return summary


# --------------------------------------------------------------------------- the study

def make_pruner(name: str, cfg: Config):
    """Pruning steps are epochs: trials with different batch sizes are compared after the same data."""
    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0),
            "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.epochs,
                                                                reduction_factor=3),
            "none": optuna.pruners.NopPruner}[name]()


def open_study(args, cfg: Config, name: str, metric: str) -> tuple:
    """(study, search space): the study in --storage, set up by the first worker that opens it."""
    direction = "maximize" if cfg.early_stopping_mode == "max" else "minimize"
    storage = make_storage(args.storage)
    study = optuna.create_study(storage=storage, study_name=name, direction=direction, load_if_exists=True,
                                pruner=make_pruner(args.pruner, cfg))
    if study.direction.name.lower() != direction or study.user_attrs.get("task", cfg.task) != cfg.task:
        raise UserError(f"study '{name}' exists for task {study.user_attrs.get('task')} "
                        f"({study.direction.name.lower()}): choose another --study_name")
    if "search_space" not in study.user_attrs:  # a new study: its space is fixed now, for every worker and resume
        space, first, given = study_space(args, cfg, storage)
        for key, value in {"task": cfg.task, "metric": metric, "base_config": dataclasses.asdict(cfg),
                           "fingerprint": fingerprint(cfg, metric, space),
                           "space_given": given, "search_space": space}.items():  # search_space last: it marks
            study.set_user_attr(key, value)                                       # the study as set up
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2, stable since
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([f"val {metric}"])  # optuna-dashboard's name of the objective: not "Objective 0"
        if first:
            study.enqueue_trial(first, skip_if_exists=True)  # the fine stage starts from the coarse optimum
    else:  # a study keeps its space and what its trials' values mean: neither may change silently
        if args.space:
            check_same_space(args, study, name, cfg)
        check_same_fingerprint(study, cfg, metric, name)
    changed = {k: v for k, v in dataclasses.asdict(cfg).items() if study.user_attrs["base_config"].get(k) != v}
    if changed:
        log.warning("base config differs from the one study '%s' was created with: %s", name, changed)
    study.sampler = TrialSeededTPE(cfg.seed, n_startup_trials=min(10, max(4, args.n_trials // 3)))
    return study, study.user_attrs["search_space"]


def after_trial(study, trial, study_dir: Path, metric: str, tracker: Tracker) -> None:
    """Optuna callback of every finished trial: the outputs rewritten, its checkpoints pruned, MLflow updated."""
    summary = write_outputs(study, study_dir, metric)
    # Trials are never resumed (a dead one is rerun): only a complete trial's best checkpoint is worth its disk.
    checkpoints = study_dir / f"trial_{trial.number}" / "checkpoints"
    shutil.rmtree(checkpoints / "last" if trial.state.name == "COMPLETE" else checkpoints, ignore_errors=True)
    if tracker.enabled:
        close_trial_run(tracker, trial)
        best = summary["best_value"]
        tracker.log_metrics({"best_value": float("nan") if best is None else best,
                             "train_steps": summary["train_steps"],
                             **{f"n_{k.lower()}": v for k, v in summary["counts"].items()}},
                            step=trial.number, flush=True)


def counts_toward_n_trials(t) -> bool:
    return t.state.name in FINISHED and not t.user_attrs.get("dead_worker")


def n_finished(study) -> int:
    return sum(counts_toward_n_trials(t) for t in study.get_trials(deepcopy=False))


def stop_at(n_trials: int):
    """Optuna callback: every worker stops once the study, not the worker, has n_trials finished trials."""
    def callback(study, trial):
        if n_finished(study) >= n_trials:
            study.stop()
    return callback


def stop_on_fatal(fatal: list):
    def callback(study, trial):
        if fatal:
            study.stop()
    return callback


def run_trials(study, args, cfg: Config, space: dict, metric: str, study_dir: Path, tracker: Tracker) -> str:
    """Run trials until the study has --n_trials finished ones; the parent run's end status. A fatal error
    of a trial (is_fatal: the base config's, every trial would fail alike) stops the study and is raised."""
    recover_dead_trials(study)
    finished = n_finished(study)
    log.info("study %s: %d of %d trials finished; storage %s", study.study_name, finished, args.n_trials,
             redact(args.storage))  # no password in the log
    if finished >= args.n_trials:
        return "FINISHED"
    record = functools.partial(after_trial, study_dir=study_dir, metric=metric, tracker=tracker)
    fatal, lost, handled, started = [], [], set(), []
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    quiet = QuietLostTrials(lost)  # Optuna's own "Trial n failed" lines and traceback: our one warning instead
    optuna_log = logging.getLogger("optuna.study._optimize")
    optuna_log.addFilter(quiet)
    try:
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            missing = args.n_trials - n_finished(study)
            if missing <= 0 or (left is not None and left <= 0):
                break
            try:
                study.optimize(lambda t: started.append(t.number) or objective(t, cfg, space, metric, study_dir,
                                                                               tracker.run_id, fatal, lost),
                               n_trials=missing, timeout=left, catch=(Exception,),
                               callbacks=[record, stop_at(args.n_trials), stop_on_fatal(fatal)], gc_after_trial=True)
            except KeyboardInterrupt:
                log.warning("interrupted: run the same command again to continue the study")
                return "KILLED"
            except Exception as e:  # Optuna's own tell of a trial another worker finished (a ValueError) lands here
                new = newly_lost(e, lost, handled, started)
                if not new:
                    raise
                handled.update(new)
                for number in new:
                    log.warning("trial %d: another worker marked it failed and reran it while this worker was paused "
                                "(its heartbeat went stale); its result is dropped, this worker goes on with the next "
                                "trial", number)
                    record(study, study.trials[number])
                continue
            break
    finally:
        optuna_log.removeFilter(quiet)
    if fatal:
        raise fatal[0]
    return "FINISHED"


def finish_study(study, study_dir: Path, metric: str, tracker: Tracker, status: str) -> dict:
    """The final outputs and plots, logged to the parent run, which ends unless another worker is running."""
    summary = write_outputs(study, study_dir, metric)
    if status == "FINISHED" and all_failed(summary):
        status = "FAILED"
    c = summary["counts"]
    log.info("study %s: %d complete, %d pruned, %d failed, %d training steps in all", study.study_name,
             c["COMPLETE"], c["PRUNED"], c["FAIL"], summary["train_steps"])
    if summary["best_trial"] is not None:
        log.info("best trial %d: val %s %.6f -> %s", summary["best_trial"], metric, summary["best_value"],
                 study_dir / "best_config.yaml")
    plots = plot_hpo(study, study_dir) if summary["best_trial"] is not None else []
    if tracker.enabled:
        for f in ("best_config.yaml", "trials_history.json", *(p.name for p in plots)):
            tracker.log_artifact(study_dir / f)
        if c["RUNNING"] == 0 or status == "KILLED":  # another worker still running keeps the parent open
            tracker.end(status)
    return summary


def all_failed(summary: dict) -> str | None:
    """The one-line error of a study with no complete trial and at least one failed one, else None."""
    c = summary["counts"]
    if c["COMPLETE"] or not c["FAIL"]:
        return None
    failed = [t for t in summary["trials"] if t["state"] == "FAIL"]
    first = next((t for t in failed if not str(t["fail_reason"]).startswith("worker died")), failed[0])
    reason = (str(first["fail_reason"]).strip().splitlines() or ["no reason recorded"])[0][:400]
    return (f"study '{summary['study']}': no trial completed, {c['FAIL']} failed, so there is no best config; the "
            f"first failure (trial {first['number']}): {reason}")


def main(argv=None):
    cfg, args = parse_config(argv, prog="hpo.py", extra=add_hpo_flags, doc=__doc__)
    check_args(args, cfg)
    setup_logging(True)
    metric, name = train.main_metric(cfg), args.study_name or f"{cfg.task}-{args.stage}"
    study_dir = Path(cfg.output_dir) if cfg.output_dir != Config.output_dir else Path("outputs/hpo") / name
    check_study_dir(study_dir, args.storage, name)  # before the storage is touched
    study, space = open_study(args, cfg, name, metric)
    check_study_dir(study_dir, args.storage, name, claim=True)
    tracker = open_parent_run(args, cfg, study, study_dir, metric)
    try:
        status = run_trials(study, args, cfg, space, metric, study_dir, tracker)
    except UserError:  # a fatal trial error: the outputs and the parent run closed, then the one-line error
        finish_study(study, study_dir, metric, tracker, "FAILED")
        raise
    summary = finish_study(study, study_dir, metric, tracker, status)
    if status == "KILLED":
        raise SystemExit(130)
    failed = all_failed(summary)
    if failed:  # exit 0 with no best config would look like success
        raise UserError(failed)
    return summary


if __name__ == "__main__":
    run_main(main)
