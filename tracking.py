"""MLflow tracking: the run tracker, and what train.py and hpo.py log through it (the config as params, the
machine, the data as a dataset input, losses, validation and test metrics, artifacts).

`import mlflow` costs seconds: it is imported where a tracker is opened, never at module import.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from config import Config
from utils import UserError, code_version, first_line, retry, system_info

log = logging.getLogger("redsm5")


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


def start_system_metrics(run_id: str, uri: str, resumed: bool):
    """MLflow's own sampler of CPU, memory, disk, network (and GPU where pynvml is installed): a thread that logs
    `system/...` metrics every 10 s (MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL) until the run ends."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=uri)
    monitor.start()
    return monitor


TRAIN_LOSS, TRAIN_LR = "1_train/loss", "1_train/lr"

# A request to a tracking server gives up after about 30 s (2 retries, 10 s each, backoff 1-2 s), not MLflow's
# default of minutes (7 retries, 120 s timeout): a run whose server went away finishes and writes its outputs.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
               "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def open_store(call, what: str, sqlite: bool):
    """call() at the start of a run. Several processes that open a new sqlite store at once race on creating its
    schema (duplicate column, table already exists, an alembic step that another process took): retried. Anything
    else (a bad URI, an unreachable server) is one line naming the store."""
    def racing(e: Exception) -> bool:
        return sqlite or any(w in str(e) for w in ("already exists", "UNIQUE constraint", "duplicate"))

    try:
        return retry(call, racing, tries=8, wait_s=lambda n: 0.3 * (n + 1))
    except Exception as e:
        raise UserError(f"{what}: cannot open the MLflow store ({first_line(e)}); or run with --mlflow false") \
            from None


# The experiment's kind, as MLflow 3's UI reads it: a model-training experiment (runs, charts, models), not the GenAI
# view (traces, judges, prompts) it shows for an experiment with no kind.
EXPERIMENT_KIND = "mlflow.experimentKind"


def artifact_root(uri: str) -> str | None:
    """A new experiment's artifacts beside its sqlite store (<store folder>/mlruns), not in whatever folder the run
    starts from; None (the server's choice) for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns").as_uri()


@contextlib.contextmanager
def store_lock(uri: str):
    """An flock for a sqlite store's creation, held in the temp folder (nothing written beside the store); a no-op
    for other stores, whose servers serialise their own migrations."""
    if not uri.startswith("sqlite:"):
        yield
        return
    name = hashlib.sha256(os.path.realpath(uri.split(":///", 1)[-1]).encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"redsm5-mlflow-{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Tracker:
    """One MLflow run, written on the main process only; a no-op when tracking is off.

    Tracking is a side channel: a store that stops answering mid-run makes the tracker warn once and go quiet
    (each request gives up after seconds, not minutes: MLFLOW_HTTP_REQUEST_* below), training goes on, and
    `unlogged()` says what was not logged (train.py writes it to run_stats.json). Step metrics are buffered and
    sent in batches: one sqlite write per step would cost more than the tiny model's training step.
    """

    def __init__(self, cfg: Config, enabled: bool, run_id: str | None = None, parent_run_id=None):
        self.enabled, self.buffer, self.run_id, self.ended = enabled and cfg.mlflow, [], None, False
        self.monitor, resumed = None, run_id is not None
        self.failure, self.lost_points, self.lost_items = None, 0, []
        self.logged_up_to = -1  # a resumed run: the last step whose training loss the run already holds
        if not self.enabled:
            return
        for name, value in HTTP_LIMITS.items():  # the user's own setting wins
            os.environ.setdefault(name, value)
        import mlflow
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow sets INFO on import ("Creating tables...")
        self.uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        mlflow.set_tracking_uri(self.uri)
        sqlite, what = self.uri.startswith("sqlite:"), f"--tracking_uri {self.uri}"
        # a bad URI or unreachable store fails here, before training, not mid-run
        self.client = open_store(lambda: self._open(MlflowClient), what, sqlite)
        if run_id is None:
            run_id = open_store(lambda: self._create_run(cfg, parent_run_id), what, sqlite)
        else:
            self.client.update_run(run_id, status="RUNNING")
            history = self.client.get_metric_history(run_id, TRAIN_LOSS)
            self.logged_up_to = max((m.step for m in history), default=-1)
        self.run_id = run_id
        if cfg.mlflow_system_metrics:
            self.monitor = start_system_metrics(run_id, self.uri, resumed)

    def _open(self, client_class):
        """The client, its store created or migrated by one process at a time: processes that create a new sqlite
        store at once race on its schema, and a migration step that fails half-way leaves the file unusable."""
        with store_lock(self.uri):
            client = client_class(self.uri)
            client.search_experiments(max_results=1)
        return client

    def _create_run(self, cfg: Config, parent_run_id) -> str:
        exp = self.client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            exp_id = self.client.create_experiment(cfg.experiment, artifact_location=artifact_root(self.uri),
                                                   tags={EXPERIMENT_KIND: "custom_model_development"})
        else:
            exp_id = exp.experiment_id
            if EXPERIMENT_KIND not in exp.tags:  # MLflow 3 opens an experiment of no kind as a GenAI one
                self.client.set_experiment_tag(exp_id, EXPERIMENT_KIND, "custom_model_development")
        tags = {"mlflow.runName": cfg.run_name or f"{cfg.task}-{Path(cfg.output_dir).name}",
                "mlflow.note.content": f"`{shlex.join(sys.argv)}`",  # the run's description: its command
                "mlflow.source.name": Path(sys.argv[0]).name, "mlflow.source.type": "LOCAL",
                "mlflow.source.git.commit": code_version()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run_id = self.client.create_run(exp_id, tags=tags).info.run_id
        self._log_params(run_id, {k: str(v) for k, v in dataclasses.asdict(cfg).items()})
        return run_id

    def _send(self, what: str, call, size: int = 1) -> None:
        """One request to the store; the first failure turns tracking off for the rest of the run."""
        if self.failure is None:
            try:
                call()
                return
            except Exception as e:  # mlflow raises its own types per store; requests, sqlalchemy theirs
                self.failure = f"{what}: {first_line(e)}"
                log.warning("MLflow store %s stopped answering (%s): tracking is off for the rest of this run; "
                            "training goes on, and run_stats.json lists what was not logged", self.uri, self.failure)
        self.lost_points += size if what == "metrics" else 0
        if what != "metrics":
            self.lost_items.append(what)

    def where(self) -> str:
        """The console's words for where the run is tracked."""
        return f"MLflow run {self.run_id} in {self.uri}" if self.enabled else "MLflow off"

    def unlogged(self) -> dict:
        """What the tracking store did not get, for run_stats.json ({} when everything was logged)."""
        if self.failure is None:
            return {}
        return {"mlflow_failure": self.failure, "mlflow_unlogged_metric_points": self.lost_points,
                "mlflow_unlogged": self.lost_items}

    def _log_params(self, run_id, params: dict):
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_params(self, params: dict):
        if self.enabled:
            self._send("params", lambda: self._log_params(self.run_id, {k: str(v) for k, v in params.items()}))

    def log_metrics(self, metrics: dict, step: int, flush: bool = False):
        if not self.enabled:
            return
        if TRAIN_LOSS in metrics and step <= self.logged_up_to:  # logged before the interruption: not twice
            return
        ts = int(time.time() * 1000)
        self.buffer += [(k, float(v), ts, step) for k, v in flatten(metrics).items()]
        if flush or len(self.buffer) >= 200:
            self.flush()

    def flush(self):
        if self.enabled and self.buffer:
            from mlflow.entities import Metric

            points, self.buffer = self.buffer, []
            for i in range(0, len(points), 500):
                chunk = [Metric(k, v, ts, s) for k, v, ts, s in points[i : i + 500]]
                self._send("metrics", lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk),
                           len(chunk))

    def log_artifact(self, path: str | Path):
        if self.enabled and Path(path).exists():
            self._send(f"artifact {Path(path).name}", lambda: self.client.log_artifact(self.run_id, str(path)))

    def log_artifacts(self, folder: str | Path, artifact_path: str):
        if self.enabled:
            self._send(f"artifacts {artifact_path}/",
                       lambda: self.client.log_artifacts(self.run_id, str(folder), artifact_path))

    def log_dict(self, d: dict, name: str):
        if self.enabled:
            self._send(name, lambda: self.client.log_text(self.run_id, json.dumps(d, indent=2, default=str), name))

    def log_table(self, columns: dict[str, list], name: str):
        """A table artifact (name.json) that the run's Artifacts tab shows as a table."""
        if self.enabled:
            self._send(name, lambda: self.client.log_table(self.run_id, data=columns, artifact_file=name))

    def log_dataset(self, name: str, digest: str, source_type: str, source: dict, profile: dict,
                    tags: dict | None = None, context: str = "training"):
        """A dataset input of the run (the UI's Datasets panel): what the data is, where it came from and a
        content digest, so runs on different data can be told apart. Only this description is stored."""
        if not self.enabled:
            return
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest, source_type=source_type, source=json.dumps(source),
                          profile=json.dumps(profile))
        input_tags = [InputTag(k, str(v)) for k, v in (tags or {}).items()]
        inputs = [DatasetInput(dataset, input_tags + [InputTag("mlflow.data.context", context)])]
        self._send("dataset input", lambda: self.client.log_inputs(self.run_id, inputs))

    def end(self, status: str = "FINISHED"):
        """End the run once; later calls do nothing."""
        if self.enabled and not self.ended:
            self.ended = True
            self.flush()
            if self.monitor is not None:
                self.monitor.finish()  # its last samples, while the run is still RUNNING
            self._send(f"run status {status}", lambda: self.client.set_terminated(self.run_id, status=status))
            if self.failure is not None:  # the store stopped answering: the run shows RUNNING there, say so
                log.warning("MLflow run %s stays RUNNING in %s (the store did not answer); once it answers, end it "
                            "with: python -c \"import mlflow; mlflow.MlflowClient('%s').set_terminated('%s', '%s')\"",
                            self.run_id, self.uri, self.uri, self.run_id, status)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        """A run left by an exception ends KILLED (Ctrl-C, SIGTERM, kill) or FAILED, not RUNNING for ever."""
        if exc_type is None:
            self.end()
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False


# --------------------------------------------------------------------------- what a run logs

# MLflow's run page draws one chart section per key prefix, sorted as text: numbered, the training curves come first,
# then the validation curve, then the best checkpoint's results (one point each).
SECTIONS = {"train": "1_train", "val": "2_val", "best_val": "3_best_val", "test": "4_test",
            "test_shift": "5_test_shift"}


def tracked_metrics(metrics: dict, split: str, headline: tuple, per_criterion: bool = False) -> dict:
    """What MLflow gets of one split's metrics, keyed <section>/<metric> (SECTIONS): the task's headline metrics
    (counts left out), and with `per_criterion` the F1 of each criterion as <section>/f1/<CRITERION>. The long tail
    (the paper's per-symptom tables, ranking, single-span and multi-sentence variants) is in metrics.json, an
    artifact of the run."""
    section = SECTIONS[split]
    out = {f"{section}/{k}": metrics[k] for k in headline if isinstance(metrics.get(k), float)}
    if per_criterion:
        out.update({f"{section}/f1/{c}": v for c, v in metrics.get("per_criterion_f1", {}).items()})
    return out


def log_figures(tracker: Tracker, out_dir: Path, results: dict, history: dict, predictions: dict) -> list[Path]:
    """The run's figures, in out_dir/figures and under the run's figures/ artifacts: training curves, and for a
    classifying task the test confusion matrix, PR and ROC curves (test and test_shift) and the F1 per criterion."""
    import plots

    folder = out_dir / "figures"
    folder.mkdir(exist_ok=True)
    pngs = [plots.plot_training({"run": history}, folder / "training.png")]
    test = results.get("test") or {}
    if "confusion_matrix" in test:
        pngs.append(plots.plot_confusion(test["confusion_matrix"], folder / "confusion_test.png",
                                         "test: confusion matrix (threshold 0.5)"))
        curves = [(name, [r["label"] for r in rows], [r["prob"] for r in rows], {"lw": 1.5})
                  for name, rows in predictions.items() if name != "val" and rows and "prob" in rows[0]]
        if curves:
            pngs.append(plots.plot_pr_roc(curves, folder / "pr_roc.png", "precision-recall and ROC"))
    per = {name: results[name]["per_criterion_f1"] for name in ("val", "test", "test_shift")
           if (results.get(name) or {}).get("per_criterion_f1")}
    if per:
        pngs.append(plots.plot_per_criterion([("F1 per criterion", per)], folder / "per_criterion_f1.png"))
    tracker.log_artifacts(folder, "figures")
    return pngs


def dataset_input(cfg: Config, report: dict, sha256: str) -> dict:
    """The run's data as an MLflow dataset input (Tracker.log_dataset): the demo corpus by its parameters, a data
    folder by its path, both with the content digest of data.data_sha256."""
    if cfg.data_dir is None:
        name, source_type = f"demo-{cfg.demo_posts}-seed{cfg.demo_seed}", "code"
        source = {"tags": {"mlflow.source.name": f"demo:n_posts={cfg.demo_posts},seed={cfg.demo_seed}"}}
    else:
        folder = Path(cfg.data_dir).resolve()
        name, source_type, source = folder.name, "local", {"uri": str(folder)}
    return {"name": name, "digest": sha256[:16], "source_type": source_type, "source": source,
            "profile": {"posts": report["posts_kept"], "annotations": report["annotations_kept"]},
            "tags": {"sha256": sha256}}  # MLflow keeps at most 36 characters of digest


def log_run_inputs(tracker: Tracker, cfg: Config, report: dict, sha256: str) -> None:
    """What a new run starts from, to MLflow: the machine, the data report and the data as a dataset input."""
    if tracker.enabled:
        tracker.log_params({f"system.{k}": v for k, v in system_info().items()})
        tracker.log_dict(report, "data_report.json")
        tracker.log_dataset(**dataset_input(cfg, report, sha256))
