"""A study's MLflow runs: one parent run for all its workers (elected when several start at once), a nested run per
trial, its end status set from the trial's state (hpo.py)."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from config import Config
from storage import redact, retry_at_start
from tracking import Tracker

PARENT_TAG = "hpo_study"  # storage and study name: what the parent runs of one study share


def elect_parent_run(tracker: Tracker, study_key: str, settle_s: float = 2.0) -> str:
    """Workers that start a study at the same moment each create a parent run; all of them then agree on the oldest
    one. Each tags its run with the study, waits until the others' runs are visible (settle_s: they were created
    within moments of each other), and takes the run created first (ties: the smaller id). A worker that starts
    later finds the parent in the study's user attributes and never gets here."""
    tracker.client.set_tag(tracker.run_id, PARENT_TAG, study_key)
    time.sleep(settle_s)
    experiment_id = tracker.client.get_run(tracker.run_id).info.experiment_id
    runs = tracker.client.search_runs([experiment_id], filter_string=f"tags.{PARENT_TAG} = '{study_key}'")
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id


def open_parent_run(args, cfg: Config, study, study_dir: Path, metric: str) -> Tracker:
    """The study's MLflow run, one for all workers: the trials' runs nest under it. Not a `with` block:
    a worker that ends while another still runs trials leaves it open."""
    name = study.study_name
    parent_cfg = dataclasses.replace(cfg, run_name=f"hpo-{name}", output_dir=str(study_dir))
    if not cfg.mlflow:
        return Tracker(parent_cfg, False)
    from mlflow.exceptions import MlflowException

    tracker = retry_at_start(lambda: Tracker(parent_cfg, True, run_id=study.user_attrs.get("mlflow_parent_run_id")),
                             "MLflow tracking store", (MlflowException,))
    if tracker.enabled and "mlflow_parent_run_id" not in study.user_attrs:
        winner = elect_parent_run(tracker, f"{redact(args.storage)}#{name}")
        if winner != tracker.run_id:  # a worker started at the same moment made one too: one parent per study
            tracker.end("KILLED")  # ended first: a deleted run left RUNNING shows as running in a restored view
            tracker.client.delete_run(tracker.run_id)
            tracker = Tracker(parent_cfg, True, run_id=winner)
        study.set_user_attr("mlflow_parent_run_id", winner)
        tracker.log_params({"hpo.study": name, "hpo.stage": args.stage, "hpo.storage": redact(args.storage),
                            "hpo.pruner": args.pruner, "hpo.metric": metric, "hpo.n_trials": args.n_trials})
        tracker.log_dict(study.user_attrs["search_space"], "search_space.json")
    return tracker


def close_trial_run(tracker: Tracker, trial) -> None:
    """Tag the trial's nested MLflow run and set its end status from the trial's state. train.py ends any
    run that raised as FAILED, a pruned one included (KILLED here); a dead worker's run is still RUNNING."""
    retried = trial.system_attrs.get("failed_trial")
    exp_id = tracker.client.get_run(tracker.run_id).info.experiment_id
    for number, state in [(trial.number, trial.state.name)] + ([(retried, "FAIL")] if retried is not None else []):
        for run in tracker.client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{tracker.run_id}' "
                                                        f"and attributes.run_name = 'trial_{number}'"):
            tracker.client.set_tag(run.info.run_id, "optuna.trial", str(number))
            tracker.client.set_tag(run.info.run_id, "optuna.state", state)
            if run.info.status != "FINISHED":
                tracker.client.set_terminated(run.info.run_id, "KILLED" if state == "PRUNED" else "FAILED")
