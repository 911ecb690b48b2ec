"""MLflow tracking: the run tracker, and what train.py and hpo.py log through it (the config as params, the
machine, the data as a dataset input, losses, validation and test metrics, artifacts).

`import mlflow` costs seconds: it is imported where a tracker is opened, never at module import.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shlex
import sys
from pathlib import Path

import data
from config import Config
from utils import UserError, system_info

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


class Tracker:
    """One MLflow run, written on the main process only; a no-op when tracking is off.

    Step metrics are buffered and sent in batches: one sqlite write per step would cost more
    than the tiny model's training step.
    """

    def __init__(self, cfg: Config, enabled: bool, run_id: str | None = None, parent_run_id=None):
        self.enabled, self.buffer, self.run_id, self.ended = enabled and cfg.mlflow, [], None, False
        self.monitor, resumed = None, run_id is not None
        if not self.enabled:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow sets INFO on import ("Creating tables...")
        uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
        mlflow.set_tracking_uri(uri)
        try:
            self.client = MlflowClient(uri)
            self.client.search_experiments(max_results=1)  # a bad URI or unreachable store fails here, not mid-run
        except Exception as e:  # mlflow raises its own exception types, several per store kind
            reason = str(e).strip().splitlines()[0][:200]
            raise UserError(f"--tracking_uri {uri}: cannot open the MLflow store ({reason}); "
                            "or run with --mlflow false") from None
        if run_id is None:
            exp = self.client.get_experiment_by_name(cfg.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(cfg.experiment)
            tags = {"mlflow.runName": cfg.run_name or f"{cfg.task}-{Path(cfg.output_dir).name}",
                    "mlflow.note.content": f"`{shlex.join(sys.argv)}`",  # the run's description: its command
                    "mlflow.source.name": Path(sys.argv[0]).name, "mlflow.source.type": "LOCAL"}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            run_id = self.client.create_run(exp_id, tags=tags).info.run_id
            params = {k: str(v) for k, v in dataclasses.asdict(cfg).items()}
            self._log_params(run_id, params)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        if cfg.mlflow_system_metrics:
            self.monitor = start_system_metrics(run_id, uri, resumed)

    def _log_params(self, run_id, params: dict):
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_params(self, params: dict):
        if self.enabled:
            self._log_params(self.run_id, {k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict, step: int, flush: bool = False):
        if not self.enabled:
            return
        import time

        ts = int(time.time() * 1000)
        self.buffer += [(k, float(v), ts, step) for k, v in flatten(metrics).items()]
        if flush or len(self.buffer) >= 200:
            self.flush()

    def flush(self):
        if self.enabled and self.buffer:
            from mlflow.entities import Metric

            for i in range(0, len(self.buffer), 500):
                chunk = [Metric(k, v, ts, s) for k, v, ts, s in self.buffer[i : i + 500]]
                self.client.log_batch(self.run_id, metrics=chunk)
            self.buffer = []

    def log_artifact(self, path: str | Path):
        if self.enabled and Path(path).exists():
            self.client.log_artifact(self.run_id, str(path))

    def log_artifacts(self, folder: str | Path, artifact_path: str):
        if self.enabled:
            self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_dict(self, d: dict, name: str):
        if self.enabled:
            self.client.log_text(self.run_id, json.dumps(d, indent=2, default=str), name)

    def log_table(self, columns: dict[str, list], name: str):
        """A table artifact (name.json) that the run's Artifacts tab shows as a table."""
        if self.enabled:
            self.client.log_table(self.run_id, data=columns, artifact_file=name)

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
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, input_tags + [InputTag("mlflow.data.context",
                                                                                          context)])])

    def end(self, status: str = "FINISHED"):
        """End the run once; later calls do nothing."""
        if self.enabled and not self.ended:
            self.ended = True
            self.flush()
            if self.monitor is not None:
                self.monitor.finish()  # its last samples, while the run is still RUNNING
            self.client.set_terminated(self.run_id, status=status)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        """A run left by an exception ends KILLED (Ctrl-C, kill) or FAILED, not RUNNING for ever."""
        if exc_type is None:
            self.end()
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False


# --------------------------------------------------------------------------- what a run logs

def tracked_metrics(metrics: dict) -> dict:
    """Metrics as MLflow numbers: the F1 per criterion as f1_<CRITERION>, the confusion matrix as cm_tn, cm_fp,
    cm_fn, cm_tp (nested values would otherwise be dropped: MLflow stores one number per key)."""
    out = {k: v for k, v in metrics.items() if k not in ("per_criterion_f1", "confusion_matrix")}
    out.update({f"f1_{c}": v for c, v in metrics.get("per_criterion_f1", {}).items()})
    if "confusion_matrix" in metrics:
        (tn, fp), (fn, tp) = metrics["confusion_matrix"]
        out.update(cm_tn=tn, cm_fp=fp, cm_fn=fn, cm_tp=tp)
    return out


def dataset_input(cfg: Config, report: dict) -> dict:
    """The run's data as an MLflow dataset input (Tracker.log_dataset): a data folder by its path and the sha256
    of its two CSV files, the demo corpus by its parameters and the sha256 of the rows they generate."""
    digest = hashlib.sha256()
    if cfg.data_dir is None:
        posts, annotations = data.make_demo(cfg.demo_posts, cfg.demo_seed)
        digest.update(json.dumps([cfg.demo_posts, cfg.demo_seed, posts, annotations], sort_keys=True).encode())
        name, source_type = f"demo-{cfg.demo_posts}-seed{cfg.demo_seed}", "code"
        source = {"tags": {"mlflow.source.name": f"demo:n_posts={cfg.demo_posts},seed={cfg.demo_seed}"}}
    else:
        folder = Path(cfg.data_dir).resolve()
        for f in data.find_files(folder):  # posts, then annotations
            digest.update(hashlib.sha256(f.read_bytes()).digest())
        name, source_type, source = folder.name, "local", {"uri": str(folder)}
    return {"name": name, "digest": digest.hexdigest()[:16], "source_type": source_type, "source": source,
            "profile": {"posts": report["posts_kept"], "annotations": report["annotations_kept"]},
            "tags": {"sha256": digest.hexdigest()}}  # MLflow keeps at most 36 characters of digest


def log_run_inputs(tracker: Tracker, cfg: Config, report: dict) -> None:
    """What a new run starts from, to MLflow: the machine, the data report and the data as a dataset input."""
    if tracker.enabled:
        tracker.log_params({f"system.{k}": v for k, v in system_info().items()})
        tracker.log_dict(report, "data_report.json")
        tracker.log_dataset(**dataset_input(cfg, report))
