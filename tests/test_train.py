"""End-to-end: a small run leaves every output, evaluate.py reproduces it, resume equals no crash."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import checkpoint
import evaluate
import models
import runner
import train
import utils
from checkpoint import load_checkpoint
from config import make_config
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(demo_posts=150, tiny_hidden=32, tiny_layers=1, tiny_heads=2, tiny_vocab=1000, max_length=96,
             doc_stride=24, batch_size=16, eval_batch_size=32, mlflow=False, log_every=5, lr=2e-3, demo_shift_posts=30)


def run(tmp_path, name, **overrides):
    cfg = make_config(**{**SMALL, "output_dir": str(tmp_path / name), **overrides})
    return cfg, runner.run(cfg)


@pytest.mark.parametrize("task,options", [("criteria", {}), ("evidence", {}), ("joint", {}),
                                          ("joint", {"shared_encoder": False, "tiny_arch": "bert", "pooling": "cls"}),
                                          ("joint", {"encoding": "post"}),
                                          ("criteria", {"unit": "post", "encoding": "post"}),
                                          ("evidence", {"encoding": "post", "evidence_head": "tag",
                                                        "include_negatives": True})])
def test_run_outputs_and_evaluate_reproduces_test_metrics(tmp_path, task, options):
    cfg, results = run(tmp_path, task, task=task, epochs=1, max_steps=6, **options)
    out = Path(cfg.output_dir)
    encoders = ["encoder", "span_encoder"] if options.get("shared_encoder") is False else ["encoder"]
    for f in ("config.yaml", "splits.json", "metrics.json", "predictions.jsonl", "checkpoints/best/heads.safetensors",
              "checkpoints/best/README.md", "checkpoints/last/COMPLETE", *(f"checkpoints/best/{e}/model.safetensors"
                                                                         for e in encoders)):
        assert (out / f).exists(), f
    assert (out / "checkpoints/best/span_encoder").exists() == (len(encoders) == 2)
    splits = json.loads((out / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["test"]) and not set(splits["val"]) & set(splits["test"])
    saved = json.loads((out / "metrics.json").read_text())
    assert results["train"]["steps"] == 6 and set(saved) == {"val", "test", "test_shift"}
    version = utils.code_version()  # the code that ran: a commit of this checkout (its sha, 40 hex digits)
    assert re.fullmatch(r"[0-9a-f]{40}(\+local changes)?", version)
    for f in ("run.json", "run_stats.json"):
        assert json.loads((out / f).read_text())["code_version"] == version, f
    assert list(saved["test_shift"]) == list(saved["test"])  # the shifted set is scored with the same metrics
    evaluate.main(["--checkpoint", str(out / "checkpoints/best"), "--output", str(tmp_path / "eval.json")])
    again = json.loads((tmp_path / "eval.json").read_text())["test"]
    assert again == saved["test"]  # bit for bit: same weights, same batches, same decoding
    if task == "evidence":  # the shifted set too, with the null threshold tuned on val
        evaluate.main(["--checkpoint", str(out / "checkpoints/best"), "--split", "test_shift",
                       "--output", str(tmp_path / "shift.json")])
        assert json.loads((tmp_path / "shift.json").read_text())["test_shift"] == saved["test_shift"]
        shift_rows = (out / "shift_predictions.jsonl").read_text().splitlines()
        assert len(shift_rows) == saved["test_shift"].get("n", saved["test_shift"].get("n_pairs"))
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == saved["test"].get("n", saved["test"].get("n_pairs"))
    if task == "joint":
        assert saved["test"]["combined"] == pytest.approx((saved["test"]["f1_macro"] + saved["test"]["span_f1"]) / 2)


def test_post_unit_run_has_the_paper_metrics_at_validation_thresholds(tmp_path):
    cfg, results = run(tmp_path, "post", unit="post", epochs=1, max_steps=4)
    out = Path(cfg.output_dir)
    saved = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        m = saved[split]
        for k in ("paper_micro_f1", "paper_macro_f1", "paper_micro_f1_tuned", "paper_macro_f1_tuned"):
            assert 0 <= m[k] <= 1, (split, k)
        # at 0.5 a symptom's post-level F1 is the pair F1 of its criterion: the same decisions
        for c, f1 in m["per_criterion_f1"].items():
            assert m["paper_per_symptom"][c]["f1"] == pytest.approx(f1)
        posts = {r["post_id"] for r in map(json.loads, (out / ("predictions.jsonl" if split == "test" else
                                                                "val_predictions.jsonl")).read_text().splitlines())}
        assert sum(s["support"] for s in m["paper_per_symptom"].values()) >= len(posts)  # each post >= one label
    # the thresholds are chosen on validation, saved with the checkpoint and applied, unchanged, to test
    checkpoint = json.loads((out / "checkpoints/best/checkpoint.json").read_text())
    assert checkpoint["thresholds"]["paper_thresholds"] == saved["val"]["paper_thresholds"] \
        == saved["test"]["paper_thresholds"]
    assert set(checkpoint["thresholds"]["paper_thresholds"]) == set(evaluate.data.SYMPTOMS)
    evaluate.main(["--checkpoint", str(out / "checkpoints/best"), "--output", str(tmp_path / "eval.json")])
    assert json.loads((tmp_path / "eval.json").read_text())["test"] == saved["test"]


def test_criteria_learns_on_demo(tmp_path):
    _, results = run(tmp_path, "learn", demo_posts=300, epochs=3, tiny_hidden=64)
    # hard negatives vs evidence, where frame and core words occur on both sides: far above the majority class
    # (f1_macro ~0.4); 0.72 measured (the default 1,000-post run reaches ~0.9)
    assert results["test"]["f1_macro"] > 0.65


def test_resume_after_crash_equals_uninterrupted_run(tmp_path, monkeypatch):
    common = dict(epochs=2, deterministic=True, save_every=4, patience=0)
    _, full = run(tmp_path, "full", **common)
    calls = {"n": 0}
    real_loss = models.TaskModel.loss  # called once per training micro-batch (evaluation passes no targets)

    def crash_at_step_11(*args, **kwargs):  # dies mid-epoch, after the step-8 checkpoint
        calls["n"] += 1
        if calls["n"] == 11:
            raise KeyboardInterrupt("simulated kill")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(models.TaskModel, "loss", crash_at_step_11)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "crashed", **common)
    monkeypatch.setattr(models.TaskModel, "loss", real_loss)
    state = json.loads((tmp_path / "crashed/checkpoints/last/trainer_state.json").read_text())
    assert state["global_step"] == 8 and state["batches_done"] == 8
    _, resumed = run(tmp_path, "crashed", resume=True, **common)
    for split in ("val", "test"):
        assert resumed[split] == full[split]
    assert resumed["train"]["steps"] == full["train"]["steps"]


@pytest.mark.parametrize("first,longer", [(dict(epochs=1, max_steps=3), dict(epochs=1, max_steps=6)),
                                          (dict(epochs=1), dict(epochs=2))], ids=["max_steps", "epochs"])
def test_resume_with_a_longer_budget_follows_the_new_schedule(tmp_path, first, longer):
    """--max_steps 3 -> 6 on resume trained step 4 at lr 0.0, the end of the 3-step schedule (issue 31): from the
    resumed step on, the rates are an uninterrupted run's of the new budget (warmup included: 1 step of 3, 2 of 6)."""
    small = dict(demo_posts=60, demo_shift_posts=0, warmup_ratio=0.34, scheduler="linear")
    rates = {}
    for name, budgets in (("resumed", [first, longer]), ("uninterrupted", [longer])):
        for i, budget in enumerate(budgets):
            cfg, results = run(tmp_path, name, **small, **budget, resume=i > 0)
        steps = json.loads((Path(cfg.output_dir) / "history.json").read_text())["steps"]
        assert [s["step"] for s in steps] == list(range(1, results["train"]["steps"] + 1))
        rates[name] = [s["lr"] for s in steps]
    resumed_at = 3 if "max_steps" in first else len(rates["resumed"]) // 2
    assert len(rates["resumed"]) == len(rates["uninterrupted"]) > resumed_at
    assert rates["resumed"][resumed_at:] == rates["uninterrupted"][resumed_at:]
    assert rates["resumed"][resumed_at] > 0  # was 0.0: the old schedule's end
    if "max_steps" in first:  # linear, warmup 1 step of 3: 0, 2e-3, 1e-3; then warmup 2 of 6: (6 - 3) / (6 - 2) x 2e-3
        assert rates["resumed"] == pytest.approx([0.0, 2e-3, 1e-3, 1.5e-3, 1e-3, 0.5e-3])


@pytest.mark.parametrize("task", ["criteria", "evidence"])
def test_an_empty_test_split_is_skipped_with_a_warning(tmp_path, caplog, task):
    """A test split without examples for the task (--test_ratio 0.01 of 30 posts: one post, unannotated; a splits
    file whose test posts have no evidence) was an IndexError in the tokenizer (issue 31). The run trains and
    validates, says in a warning that test is not scored, and metrics.json has test: null."""
    import data
    import splits as splitting

    small = dict(task=task, demo_posts=30, demo_shift_posts=0, epochs=1, max_steps=2)
    corpus = data.load_corpus_from_config(make_config(**small))
    evidence = {r["post_id"] for r in corpus.rows if r["status"] == 1}
    if task == "criteria":
        small["test_ratio"] = 0.01
        annotated = {r["post_id"] for r in corpus.rows}
        assert [p in annotated for p in splitting.split_posts(corpus, 42, 0.1, 0.01)["test"]] == [False]
    else:
        ids = sorted(corpus.posts)
        test = [p for p in ids if p not in evidence][:3]
        rest = [p for p in ids if p not in test]
        (tmp_path / "splits.json").write_text(json.dumps({"train": rest[5:], "val": rest[:5], "test": test}))
        small["splits_file"] = str(tmp_path / "splits.json")
    cfg, results = run(tmp_path, "run", **small)
    out = Path(cfg.output_dir)
    assert results["test"] is None and 0 <= results["val"][train.main_metric(cfg)] <= 1
    assert json.loads((out / "metrics.json").read_text())["test"] is None
    assert not (out / "predictions.jsonl").exists() and (out / "val_predictions.jsonl").exists()
    assert f"the test split has no examples for task '{task}'" in caplog.text and "raise --test_ratio" in caplog.text


def test_two_processes_evaluate_like_one(tmp_path):
    cfg, results = run(tmp_path, "ddp", task="joint", epochs=1, max_steps=4)
    ckpt = Path(cfg.output_dir) / "checkpoints/best"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "evaluate.py"),
           "--checkpoint", str(ckpt), "--output", str(tmp_path / "two.json"), "--batch_size", "7"]
    subprocess.run(cmd, check=True, env=env, cwd=tmp_path, capture_output=True, timeout=300)
    evaluate.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "one.json"), "--batch_size", "7"])
    one, two = (json.loads((tmp_path / f).read_text())["test"] for f in ("one.json", "two.json"))
    assert two["confusion_matrix"] == one["confusion_matrix"]  # every pair counted exactly once
    assert two == one  # the same batches on both sides, so the same numbers, bit for bit


def every_epoch_improves(best, value, cfg) -> bool:
    """train.improves for tests that need a new best checkpoint saved at every epoch (--min_delta may not be < 0)."""
    return True


def test_two_processes_with_a_batch_larger_than_the_data_train_on_their_share(tmp_path):
    """--batch_size 1024 on two processes and a few dozen training inputs: accelerate filled each process's batch
    with copies up to 1024 (6 GB; killed for memory, and rank 0 said only "stopped by SIGTERM"), and
    samples_per_second counted the copies. Each process now takes its share, and the copies are not counted."""
    import math

    import train

    argv = ["--task", "criteria", "--demo_posts", "40", "--tiny_hidden", "16", "--tiny_layers", "1", "--tiny_heads",
            "1", "--tiny_vocab", "300", "--epochs", "2", "--demo_shift_posts", "0", "--mlflow", "false"]
    n = len(train.prepare_data(train.parse_config(argv)[0]).features["train"][1])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train.py"), *argv,
           "--batch_size", "1024", "--output_dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [line for line in proc.stderr.splitlines() if "--batch_size 1024: more than the" in line]
    assert len(warned) == 1, proc.stderr[-3000:]  # the main process says it, once
    assert f"the {n} training inputs shared by 2 processes: each takes {math.ceil(n / 2)} a step" in warned[0]
    stats = json.loads((tmp_path / "run" / "run_stats.json").read_text())
    assert (stats["processes"], stats["steps"]) == (2, 2)  # one step an epoch: both shares at once
    assert round(stats["samples_per_second"] * stats["train_seconds"]) == 2 * n  # each input once an epoch


@pytest.mark.parametrize("n, batch_size", [(1000, 32), (130, 32), (100, 8), (51, 1024)])
def test_two_processes_see_every_training_input_once_an_epoch(n, batch_size):
    """accelerate deals batches to the processes in turns and expects a short batch only at the end: the shuffled
    short batch, dealt in the middle, dropped itself and the batch beside it (1,000 inputs, batch 32: 40 unseen in
    epoch 0). The copies it adds to even out the last step are what train.real_inputs leaves out."""
    from accelerate.data_loader import BatchSamplerShard

    import features

    per_process = features.per_process_batch(n, batch_size, 2)
    sampler = features.LengthGroupedBatches(np.arange(n) % 7, per_process, True, seed=0, short_last=True)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        shards = [list(BatchSamplerShard(sampler, 2, rank)) for rank in range(2)]
        assert len(shards[0]) == len(shards[1])  # the same number of steps on both processes
        steps = list(zip(*shards))
        assert all(len(b) == per_process for step in steps for b in step)
        assert sorted({i for step in steps for b in step for i in b}) == list(range(n))
        earlier = [i for step in steps[:-1] for b in step for i in b]
        assert len(earlier) == len(set(earlier))  # copies only in the last step
        last = {i for b in steps[-1] for i in b} - set(earlier)
        assert len(last) == (n % (2 * per_process) or 2 * per_process)  # its real inputs: accelerate's remainder


def test_kill_during_best_save_keeps_previous_best(tmp_path, monkeypatch):
    real_save = checkpoint.save_checkpoint
    calls = {"n": 0}

    def killed_on_second_save(model, tokenizer, cfg, path, extra, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # half a checkpoint on disk, then the process dies
            path.mkdir(parents=True, exist_ok=True)
            (path / "heads.safetensors").write_bytes(b"torn")
            raise KeyboardInterrupt("killed during save")
        return real_save(model, tokenizer, cfg, path, extra, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", killed_on_second_save)
    monkeypatch.setattr(train, "improves", every_epoch_improves)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "torn", epochs=3, patience=0)
    best = tmp_path / "torn/checkpoints/best"
    recorded = json.loads((best / "checkpoint.json").read_text())
    assert recorded["epoch"] == 0
    evaluate.main(["--checkpoint", str(best), "--split", "val", "--output", str(tmp_path / "val.json")])
    assert json.loads((tmp_path / "val.json").read_text())["val"] == recorded["val_metrics"]
    with pytest.raises(UserError, match="not a complete checkpoint"):
        load_checkpoint(best.with_name("best.tmp"))


def _nan_at_call(n):
    real_loss, calls = models.TaskModel.loss, {"n": 0}

    def loss(*args, **kwargs):
        calls["n"] += 1
        value = real_loss(*args, **kwargs)
        return value * float("nan") if calls["n"] == n else value
    return loss


def test_nonfinite_loss_stops_naming_the_step(tmp_path, monkeypatch):
    monkeypatch.setattr(models.TaskModel, "loss", _nan_at_call(3))
    with pytest.raises(UserError, match="loss became nan at step 3"):
        run(tmp_path, "nan", epochs=1, max_steps=6)


def test_a_run_that_raises_ends_failed_or_killed_in_mlflow(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr(models.TaskModel, "loss", _nan_at_call(3))
    with pytest.raises(UserError, match="loss became nan"):
        run(tmp_path, "nan", epochs=1, max_steps=6, mlflow=True, tracking_uri=uri, run_name="nan")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models.TaskModel, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "ctrl-c", epochs=1, max_steps=6, mlflow=True, tracking_uri=uri, run_name="ctrl-c")
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(make_config().experiment).experiment_id])
    assert {r.info.run_name: r.info.status for r in runs} == {"nan": "FAILED", "ctrl-c": "KILLED"}


def test_nonfinite_loss_skipped_when_asked_and_states_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(models.TaskModel, "loss", _nan_at_call(3))
    cfg, results = run(tmp_path, "skip", epochs=1, max_steps=8, skip_nonfinite=True, save_every=2, keep_checkpoints=3)
    assert results["train"]["skipped_nonfinite_steps"] == 1 and results["train"]["steps"] == 8
    assert all(np.isfinite(v) for v in results["test"].values() if isinstance(v, float) and v == v)
    ckpts = Path(cfg.output_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-0000006", "step-0000008"]
    state = json.loads((ckpts / "last/trainer_state.json").read_text())
    assert state["global_step"] == 8


@pytest.mark.parametrize("threads,local,expected", [(0, None, "cores"), (0, "2", "half"), (3, "2", 3)])
def test_cpu_threads_share_the_cores_among_local_processes(monkeypatch, threads, local, expected):
    """`accelerate launch` sets OMP_NUM_THREADS=1 (and ACCELERATE_DYNAMO_BACKEND); by default each process gets its
    share of the cores instead. OMP_NUM_THREADS set by the user, outside a launcher: tests/test_utils.py."""
    import torch

    from utils import make_accelerator

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    if local:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    before = torch.get_num_threads()
    try:
        make_accelerator(make_config(threads=threads))
        want = {"cores": cores, "half": max(1, cores // 2)}.get(expected, expected)
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("folder", ["best", "last"])
@pytest.mark.parametrize("window", ["between the renames", "inside the removal of the old copy"])
def test_kill_inside_a_folder_swap_resumes_to_the_same_metrics(tmp_path, monkeypatch, folder, window):
    """A kill at either instant of replace_dir of checkpoints/best or /last, at the second epoch's save: the
    complete copy is found (evaluate.py loads best, --resume loads last) and the resumed run equals an
    uninterrupted one."""
    import shutil

    common = dict(epochs=3, patience=0, deterministic=True)
    monkeypatch.setattr(train, "improves", every_epoch_improves)  # a new best at every epoch: best is saved each time
    _, full = run(tmp_path, "full", **common)
    real_rename, real_rmtree, seen = Path.rename, shutil.rmtree, {"n": 0}

    def rename(self, target):
        result = real_rename(self, target)
        if window == "between the renames" and self.name == folder and Path(target).name == f"{folder}.old":
            seen["n"] += 1
            if seen["n"] == 1:  # the second save: the first one had no old copy to move away
                raise KeyboardInterrupt("killed between the renames")
        return result

    def rmtree(path, *args, **kwargs):
        if window != "between the renames" and Path(path).name == f"{folder}.old" and Path(path).exists():
            seen["n"] += 1
            if seen["n"] == 1:  # half of the old copy removed, then the process dies
                victim = next(p for p in sorted(Path(path).rglob("*")) if p.is_file())
                victim.unlink()
                raise KeyboardInterrupt("killed inside rmtree")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "killed", **common)
    monkeypatch.setattr(Path, "rename", real_rename)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert seen["n"] == 1
    best = tmp_path / "killed/checkpoints/best"
    recorded = load_checkpoint(best)[3]  # from best.old when the kill fell between best's renames
    evaluate.main(["--checkpoint", str(best), "--split", "val", "--output", str(tmp_path / "val.json")])
    assert json.loads((tmp_path / "val.json").read_text())["val"] == recorded["val_metrics"]
    _, resumed = run(tmp_path, "killed", resume=True, **common)
    for split in ("val", "test"):
        assert resumed[split] == full[split]
    checkpoints = sorted(p.name for p in (tmp_path / "killed/checkpoints").iterdir())
    assert checkpoints == ["best", "last"]  # the leftovers are cleaned up by the next save
