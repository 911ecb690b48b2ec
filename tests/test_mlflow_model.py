"""mlflow_model.py: the best checkpoint logged as an MLflow pyfunc model gives evaluate.py --predict's rows, in
process, from the registry, and from `mlflow models serve`. Everything (the store, the artifacts) stays in tmp."""
import csv
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

import evaluate
import mlflow_model
import runner
from config import make_config

POSTS = [("p1", "I can't sleep at night. I feel worthless and tired all day."),
         ("p2", "We went to the beach last summer. The weather was great."),
         ("p3", "Nothing interests me anymore.\nI eat far too much, and I cry every single day.")]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny joint checkpoint (probabilities and evidence), logged as "model" of a run of a tmp store."""
    tmp = tmp_path_factory.mktemp("mlflow_model")
    cfg = make_config(task="joint", demo_posts=40, tiny_hidden=16, tiny_layers=1, tiny_heads=1, tiny_vocab=300,
                      max_length=96, doc_stride=16, batch_size=8, demo_shift_posts=0, epochs=1, max_steps=2,
                      mlflow=False, output_dir=str(tmp / "run"))
    runner.run(cfg)
    previous = os.environ.get("MLFLOW_TRACKING_URI")  # log_model sets mlflow's URI (and this variable) globally
    uri = f"sqlite:///{tmp}/m.db"
    client = MlflowClient(uri)
    artifacts = (tmp / "artifacts").as_uri()
    exp_id = client.create_experiment("redsm5-model", artifact_location=artifacts)
    run_id = client.create_run(exp_id).info.run_id
    best = tmp / "run" / "checkpoints" / "best"
    model_uri = mlflow_model.log_model(best, run_id, uri)
    mlflow.set_tracking_uri(uri)
    yield SimpleNamespace(tmp=tmp, best=best, uri=uri, client=client, exp_id=exp_id, run_id=run_id,
                          model_uri=model_uri, artifacts=artifacts, pyfunc=mlflow.pyfunc.load_model(model_uri))
    mlflow.set_tracking_uri(previous)  # None: unset again, as before this module


def frame(posts) -> pd.DataFrame:
    return pd.DataFrame(posts, columns=["post_id", "text"])


def test_logged_model_is_in_the_run_and_tmp(logged):
    assert logged.model_uri == f"runs:/{logged.run_id}/model"
    run = logged.client.get_run(logged.run_id)
    assert run.info.status == "RUNNING"  # logging the model neither ends nor restarts the caller's run
    (output,) = run.outputs.model_outputs
    model = logged.client.get_logged_model(output.model_id)
    assert model.name == "model" and model.experiment_id == logged.exp_id and model.source_run_id == logged.run_id
    assert model.artifact_location.startswith(logged.artifacts)  # in the experiment's folder, not ./mlruns
    folder = Path(model.artifact_location.removeprefix("file://"))
    code = sorted(p.name for p in (folder / "code").iterdir())
    assert {"mlflow_model.py", "evaluate.py", "checkpoint.py", "models.py", "utils.py"} <= set(code)
    assert not any(name.startswith("test") for name in code)
    assert (folder / "artifacts" / "best" / "checkpoint.json").is_file()
    requirements = (folder / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"torch", "transformers", "tokenizers", "accelerate",
                                                        "safetensors", "scikit-learn", "numpy", "pyyaml", "pandas"}
    inputs = logged.pyfunc.metadata.signature.inputs.input_names()
    assert inputs == ["post_id", "text"]
    # the run's Artifacts (where MLflow 3 does not list a logged model) point to it
    pointer = Path(logged.client.download_artifacts(logged.run_id, "model.json", str(logged.tmp)))
    pointer = json.loads(pointer.read_text())
    assert pointer["runs_uri"] == logged.model_uri and pointer["model_id"] == output.model_id
    assert pointer["serve"] == f"mlflow models serve -m {logged.model_uri} --env-manager local"


def test_pyfunc_predict_equals_evaluate_predict(logged, cli):
    posts_csv, out = logged.tmp / "posts.csv", logged.tmp / "predictions.jsonl"
    with open(posts_csv, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([("post_id", "text"), *POSTS])
    code, err = cli(evaluate.main, ["--checkpoint", logged.best, "--predict", posts_csv, "--output", out])
    assert code == 0, err
    expected = [json.loads(line) for line in out.read_text().splitlines()]
    got = logged.pyfunc.predict(frame(POSTS)).to_dict("records")
    assert [(r["post_id"], r["criterion"]) for r in got] == [(r["post_id"], r["criterion"]) for r in expected]
    assert len(got) == 3 * 9
    for g, e in zip(got, expected):
        assert abs(g["prob"] - e["prob"]) < 1e-6
        assert (g["pred"], g["pred_tuned"], g["threshold_tuned"]) == (e["pred"], e["pred_tuned"], e["threshold_tuned"])
        assert e["pred_tuned"] == int(e["prob"] >= e["threshold_tuned"])
        # evidence only where a decision calls the criterion present (joint)
        assert ("evidence_sentences" in e) == bool(e["pred"] or e["pred_tuned"])
        if "evidence_sentences" not in e:
            assert not isinstance(g["evidence_sentences"], list) and pd.isna(g["evidence_text"])
            continue
        assert list(g["evidence_sentence_texts"]) == e["evidence_sentence_texts"]
        assert [list(s) for s in g["evidence_sentences"]] == e["evidence_sentences"]
        assert g["evidence_text"] == e["evidence_text"]


def test_predict_inputs_and_errors(logged):
    model = logged.pyfunc.unwrap_python_model()
    base = model.predict(None, frame(POSTS[:2]))
    as_records = [{"post_id": p, "text": t} for p, t in POSTS[:2]]
    as_columns = {"post_id": [p for p, _ in POSTS[:2]], "text": [t for _, t in POSTS[:2]]}
    for other in (as_records, as_columns):
        pd.testing.assert_frame_equal(model.predict(None, other), base)
    with pytest.raises(ValueError, match="lacks column.*text"):
        model.predict(None, pd.DataFrame({"post_id": ["p1"], "body": ["I am sad."]}))
    with pytest.raises(ValueError, match="no rows"):
        model.predict(None, frame([]))
    with pytest.raises(ValueError, match="post_id 'p1' twice"):
        model.predict(None, frame([POSTS[0], POSTS[0]]))
    with pytest.raises(ValueError, match="no row has both a post_id and a visible text"):
        model.predict(None, frame([("p1", " \u200b ")]))


def test_a_post_of_bidi_marks_is_skipped_not_scored(logged):
    """A post of bidi marks passed as visible, then the tokenizer gave it no token: a traceback under `mlflow models
    serve` for it alone, and a refusal of every post beside it. It is skipped like an empty post, and alone it is a
    bad input (a ValueError and an MlflowException: HTTP 400 with its sentence)."""
    model = logged.pyfunc.unwrap_python_model()
    rows = model.predict(None, frame([("p0", "\u200e\u200f\u202e"), *POSTS[:1]]))
    pd.testing.assert_frame_equal(rows, model.predict(None, frame(POSTS[:1])))
    with pytest.raises(mlflow_model.BadInput, match="model input: no row has both a post_id and a visible text "
                                                    r"\(0 without post_id, 1 with an empty text"):
        model.predict(None, frame([("p0", "\u200e\u200f\u202e")]))


def test_register_model(logged):
    run_id = logged.client.create_run(logged.exp_id).info.run_id
    uri = mlflow_model.log_model(logged.best, run_id, logged.uri, register_name="redsm5-joint")
    assert uri == f"runs:/{run_id}/model"
    registered = logged.client.get_registered_model("redsm5-joint")
    (version,) = registered.latest_versions
    assert int(version.version) == 1 and version.run_id == run_id
    one = frame(POSTS[:1])
    served = mlflow.pyfunc.load_model("models:/redsm5-joint/1").predict(one)
    assert served["prob"].tolist() == pytest.approx(logged.pyfunc.predict(one)["prob"].tolist(), abs=1e-6)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.skipif(importlib.util.find_spec("uvicorn") is None,
                    reason="mlflow models serve runs mlflow's scoring server under uvicorn, which is not installed")
def test_mlflow_models_serve(logged):
    port, log_file = free_port(), logged.tmp / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged.uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # its `exec uvicorn`
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", logged.model_uri, "--env-manager", "local",
               "-p", str(port), "-h", "127.0.0.1"]
    with open(log_file, "wb") as log:
        server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"the server exited ({server.returncode}):\n{log_file.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no /ping in 120 s:\n{log_file.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/invocations"
        status, body = post_json(url, {"dataframe_split": {"columns": ["post_id", "text"],
                                                           "data": [list(p) for p in POSTS[:2]]}})
        assert status == 200, body
        expected = logged.pyfunc.predict(frame(POSTS[:2])).to_dict("records")
        rows = body["predictions"]
        assert [(r["post_id"], r["criterion"]) for r in rows] == [(r["post_id"], r["criterion"]) for r in expected]
        for r, e in zip(rows, expected):
            assert abs(r["prob"] - e["prob"]) < 1e-6
            if isinstance(e["evidence_sentences"], float):  # NaN: no decision calls it present, no evidence
                assert r.get("evidence_sentences") is None or pd.isna(r["evidence_sentences"])
                continue
            assert r["evidence_sentence_texts"] == list(e["evidence_sentence_texts"])  # lists come back as lists
            assert r["evidence_sentences"] == [list(s) for s in e["evidence_sentences"]]
        status, body = post_json(url, {"dataframe_split": {"columns": ["post_id", "text"], "data": [["p1", " "]]}})
        assert status == 400 and "no row has both a post_id and a visible text" in body["message"]
    finally:
        server.terminate()  # mlflow passes SIGTERM on to its uvicorn
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        try:
            os.killpg(server.pid, signal.SIGKILL)  # anything it started and left behind (its own session)
        except ProcessLookupError:
            pass
