"""When the loop validates (--eval_every), what it does when a step runs out of memory (half the batch), and how it
stops on SIGTERM (checkpoints/last saved at the step it stopped at): each resumed run equals an uninterrupted one."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

import models
import runner
import scoring
import train
from checkpoint import load_checkpoint
from config import make_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(demo_posts=150, tiny_hidden=16, tiny_layers=1, tiny_heads=1, tiny_vocab=400, max_length=96,
             doc_stride=16, batch_size=8, eval_batch_size=32, mlflow=False, demo_shift_posts=0, deterministic=True)
FLAGS = [x for k, v in SMALL.items() for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


def run(tmp_path, name, on_validation=None, **overrides):
    cfg = make_config(**{**SMALL, "output_dir": str(tmp_path / name), **overrides})
    return runner.run(cfg, on_validation=on_validation)


def crash_at_training_call(monkeypatch, n: int, action):
    """TaskModel.loss runs once per training micro-batch (evaluation passes no targets): `action()` at the n-th."""
    real, calls = models.TaskModel.loss, {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            action()
        return real(*args, **kwargs)

    monkeypatch.setattr(models.TaskModel, "loss", loss)
    return real


def test_eval_every_validates_every_n_steps_and_after_the_last(tmp_path):
    """Validation at steps 5, 10, ... and at the last step; MLflow's validation points and history.json carry those
    steps; the best checkpoint is the first best of these validations."""
    seen = []
    results = run(tmp_path, "run", lambda epoch, metrics, step, total: seen.append((step, total)), epochs=2,
                  eval_every=5, patience=0, mlflow=True, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    total = results["train"]["steps"]
    expected = [*range(5, total + 1, 5), *([total] if total % 5 else [])]
    assert total > 10 and [s for s, _ in seen] == expected and {t for _, t in seen} == {total}
    history = json.loads((tmp_path / "run" / "history.json").read_text())["val"]
    assert [h["step"] for h in history] == expected
    values = [h["f1_macro"] for h in history]
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best")[3]
    assert best["step"] == history[values.index(max(values))]["step"] and best["f1_macro"] == max(values)
    assert results["val"]["f1_macro"] == max(values)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    points = client.get_metric_history(results["train"]["mlflow_run_id"], "2_val/f1_macro")
    assert sorted(p.step for p in points) == expected


def test_patience_counts_validations_under_eval_every(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "improves", lambda best, value, cfg: best is None)  # only the first validation improves
    results = run(tmp_path, "run", epochs=3, eval_every=4, patience=2)
    history = json.loads((tmp_path / "run" / "history.json").read_text())["val"]
    assert [h["step"] for h in history] == [4, 8, 12] and results["train"]["steps"] == 12  # stopped mid-epoch 0


def test_resume_between_evaluations_equals_uninterrupted_run(tmp_path, monkeypatch):
    """Killed at step 8: after the validation at step 5 and the save at step 6, before the validation at step 10."""
    common = dict(epochs=2, eval_every=5, save_every=3, patience=0)
    full = run(tmp_path, "full", **common)

    def kill():
        raise KeyboardInterrupt("simulated kill")

    real = crash_at_training_call(monkeypatch, 8, kill)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "crashed", **common)
    monkeypatch.setattr(models.TaskModel, "loss", real)
    state = json.loads((tmp_path / "crashed/checkpoints/last/trainer_state.json").read_text())
    assert state["global_step"] == 6 and [h["step"] for h in state["history"]] == [5]
    resumed = run(tmp_path, "crashed", resume=True, **common)
    assert (tmp_path / "crashed/metrics.json").read_bytes() == (tmp_path / "full/metrics.json").read_bytes()
    assert resumed["train"]["steps"] == full["train"]["steps"]
    history = [json.loads((tmp_path / name / "history.json").read_text()) for name in ("full", "crashed")]
    assert history[0] == history[1]


def test_sigterm_mid_epoch_saves_the_step_and_the_resume_equals_an_uninterrupted_run(cli, tmp_path, monkeypatch):
    """A real SIGTERM (to this process, inside the 11th training step, --save_every 0): the step finishes,
    checkpoints/last is saved at step 11 (before: nothing was saved before the epoch's end, 11 steps lost), the exit
    code is 143, and the resumed run's metrics.json equals an uninterrupted run's byte for byte."""
    common = [*FLAGS, "--epochs", "2", "--patience", "0"]
    assert cli(train.main, [*common, "--output_dir", tmp_path / "full"])[0] == 0
    real = crash_at_training_call(monkeypatch, 11, lambda: os.kill(os.getpid(), signal.SIGTERM))
    code, err = cli(train.main, [*common, "--output_dir", tmp_path / "stopped"])
    assert code == 143, err
    assert "SIGTERM: stopping at step 11, checkpoints/last saved there" in err
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM; continue it with:")
    state = json.loads((tmp_path / "stopped/checkpoints/last/trainer_state.json").read_text())
    assert (state["global_step"], state["batches_done"], state["epoch"]) == (11, 11, 0)  # mid-epoch, 0 steps lost
    monkeypatch.setattr(models.TaskModel, "loss", real)
    code, err = cli(train.main, [*common, "--output_dir", tmp_path / "stopped", "--resume", "true"])
    assert code == 0, err
    assert (tmp_path / "stopped/metrics.json").read_bytes() == (tmp_path / "full/metrics.json").read_bytes()


def test_sigterm_from_outside_loses_no_step(tmp_path):
    """train.py in a subprocess, SIGTERM after some steps of the first epoch: every step it trained (MLflow's loss
    points of the KILLED run) is in checkpoints/last; resumed, its metrics.json equals an uninterrupted run's."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    argv = [sys.executable, "train.py", *FLAGS, "--demo_posts", "400", "--epochs", "2", "--patience", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run([*argv, "--output_dir", str(tmp_path / "full")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]
    stopped = [*argv, "--output_dir", str(tmp_path / "stopped"), "--mlflow", "true", "--tracking_uri", uri]
    proc = subprocess.Popen(stopped, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "first optimizer step" not in seen:
        line = proc.stderr.readline()
        assert line, seen
        seen += line
    proc.send_signal(signal.SIGTERM)  # at once: an epoch here is ~60 steps, well under a second on an idle machine
    err = seen + proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 143, err
    client = MlflowClient(uri)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("redsm5").experiment_id])
    trained = max(m.step for m in client.get_metric_history(mlflow_run.info.run_id, "1_train/loss"))
    state = json.loads((tmp_path / "stopped/checkpoints/last/trainer_state.json").read_text())
    assert state["global_step"] == trained > 0 and state["epoch"] == 0 and state["batches_done"] > 0
    resumed = subprocess.run([*stopped, "--resume", "true"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (tmp_path / "stopped/metrics.json").read_bytes() == (tmp_path / "full/metrics.json").read_bytes()


def out_of_memory_above(monkeypatch, rows: int, from_call: int = 1, training: bool = True):
    """TaskModel.forward raises CUDA's OutOfMemoryError for a training batch (or with training=False, a scoring batch:
    the model in eval mode) of more than `rows` inputs, from the `from_call`-th such call on; returns the sizes of
    the batches of that kind it ran."""
    real, ran, calls = models.TaskModel.forward, [], {"n": 0}

    def forward(self, **batch):
        if self.training == training:
            calls["n"] += 1
            if len(batch["input_ids"]) > rows and calls["n"] >= from_call:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            ran.append(len(batch["input_ids"]))
        return real(self, **batch)

    monkeypatch.setattr(models.TaskModel, "forward", forward)
    return ran


def test_out_of_memory_halves_the_batch_and_keeps_the_effective_batch(tmp_path, monkeypatch):
    """Batch 16 runs out of memory at step 3, then 8 at its first step; 4 fits, with 4 micro-batches a step: the run
    completes with as many steps as batch 16 takes, every training input seen once an epoch."""
    ran = out_of_memory_above(monkeypatch, rows=4, from_call=3)
    results = run(tmp_path, "run", epochs=2, batch_size=16, patience=0, mlflow=True,
                  tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    params = client.get_run(results["train"]["mlflow_run_id"]).data.params
    assert (params["batch_size"], params["ran_batch_size"], params["ran_grad_accum"]) == ("16", "4", "4")
    assert params["batch_fallbacks"].startswith("out of memory at step 3 with batch 16; out of memory at step 1 with "
                                                "batch 8 (train_loss points")
    config = yaml.safe_load((tmp_path / "run/config.yaml").read_text())
    assert (config["batch_size"], config["grad_accum"]) == (4, 4)
    stats = json.loads((tmp_path / "run/run_stats.json").read_text())
    assert [(e["step"], e["batch_size"], e["to_batch_size"], e["to_grad_accum"]) for e in stats["batch_fallbacks"]] \
        == [(3, 16, 8, 2), (1, 8, 4, 4)]
    assert "CUDA out of memory" in stats["batch_fallbacks"][0]["error"]
    inputs = len(train.prepare_data(make_config(**{**SMALL, "output_dir": str(tmp_path / "x")})).features["train"][1])
    assert results["train"]["steps"] == 2 * math.ceil(inputs / 16)
    last_attempt = ran[2:]  # batch 16 trained two micro-batches before it failed
    assert ran[:2] == [16, 16] and max(last_attempt) == 4 and sum(last_attempt) == 2 * inputs
    assert load_checkpoint(tmp_path / "run/checkpoints/best")[2].batch_size == 4


def test_out_of_memory_at_batch_1_is_one_line(cli, tmp_path, monkeypatch):
    out_of_memory_above(monkeypatch, rows=0)
    code, err = cli(train.main, [*FLAGS, "--batch_size", "2", "--epochs", "1", "--output_dir", tmp_path / "run"])
    assert code == 2 and "Traceback" not in err, err
    assert "out of memory at step 1 with --batch_size 2: training again from the start at --batch_size 1 " \
           "--grad_accum 2" in err
    assert err.strip().splitlines()[-1].startswith("error: out of memory at step 1 with --batch_size 1 (CUDA out of "
                                                   "memory. Tried to allocate 2.00 GiB): lower --max_length")


def test_out_of_memory_in_validation_halves_the_eval_batch(tmp_path, monkeypatch):
    """Validation at --eval_batch_size 32 runs out of memory (it was a traceback after an epoch of training): scored
    again at 16, then 8, which fits and is kept for the later validations and the test; the run equals one asked
    for 8 to begin with, its fallbacks in run_stats.json."""
    asked = run(tmp_path, "asked-for-8", epochs=2, eval_batch_size=8)
    ran = out_of_memory_above(monkeypatch, rows=8, training=False)
    results = run(tmp_path, "run", epochs=2, eval_batch_size=32)
    assert max(ran) == 8
    stats = json.loads((tmp_path / "run/run_stats.json").read_text())
    assert stats["eval_batch_fallbacks"] == [{"split": "val", "eval_batch_size": 32, "to": 16},
                                             {"split": "val", "eval_batch_size": 16, "to": 8}]
    assert (tmp_path / "run/metrics.json").read_bytes() == (tmp_path / "asked-for-8/metrics.json").read_bytes()
    assert results["train"]["steps"] == asked["train"]["steps"]


def test_each_split_gets_one_loader_however_often_it_is_scored(tmp_path, monkeypatch):
    """Validation after each of 3 epochs reuses one loader (a new one each time started --num_workers processes
    anew and kept the old ones: a SIGTERM to the group then met a worker being born); val and test: 2 loaders."""
    made, real = [], train.make_loader
    for module in (train, scoring):  # the training loader, the scoring ones
        monkeypatch.setattr(module, "make_loader", lambda feats, batch, shuffle, *a, **k: made.append(shuffle) or
                            real(feats, batch, shuffle, *a, **k))
    results = run(tmp_path, "run", epochs=3, patience=0)
    assert len(json.loads((tmp_path / "run/history.json").read_text())["val"]) == 3 and results["test"]
    assert made == [True, False, False]  # training, val (3 validations, then scored again with the best), test


def test_out_of_memory_in_validation_at_eval_batch_1_is_one_line(cli, tmp_path, monkeypatch):
    out_of_memory_above(monkeypatch, rows=0, training=False)
    code, err = cli(train.main, [*FLAGS, "--eval_batch_size", "2", "--epochs", "1", "--output_dir", tmp_path / "run"])
    assert code == 2 and "Traceback" not in err, err
    assert "out of memory scoring val with --eval_batch_size 2 (CUDA out of memory. Tried to allocate 2.00 GiB): " \
           "scoring it again at --eval_batch_size 1" in err
    assert err.strip().splitlines()[-1] == "error: out of memory scoring val with --eval_batch_size 1 (CUDA out of " \
                                           "memory. Tried to allocate 2.00 GiB): lower --max_length", err


def test_a_resume_with_the_first_flags_continues_at_the_fallen_back_batch(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"batch_size": 4, "grad_accum": 4}))
    asked = make_config(batch_size=16, grad_accum=1, resume=True)
    resumed = runner.fallen_back_batch(asked, tmp_path)
    assert (resumed.batch_size, resumed.grad_accum) == (4, 4)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"batch_size": 4, "grad_accum": 2}))  # not a fallback of it
    assert runner.fallen_back_batch(asked, tmp_path) == asked


def test_eval_every_below_zero_is_one_line(cli, tmp_path):
    code, err = cli(train.main, ["--eval_every", "-1", "--output_dir", tmp_path / "run"])
    assert code == 2 and err.strip().splitlines()[-1] == "error: --eval_every: must be >= 0, got -1"
