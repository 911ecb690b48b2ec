"""A resume continues only the same run, and says why not in one line; damaged training states are named;
tracking that fails mid-run does not stop training; SIGTERM ends a run as Ctrl-C does."""
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import write_quirky

import runner
import train
from checkpoint import load_checkpoint
from config import make_config
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--mlflow", "false", "--demo_posts", "40", "--tiny_hidden", "16", "--tiny_layers", "1", "--tiny_heads", "1",
         "--tiny_vocab", "300", "--max_length", "96", "--doc_stride", "16", "--batch_size", "8",
         "--demo_shift_posts", "0", "--epochs", "2", "--save_every", "2"]


def one_error_line(code, err):
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    return lines[0]


@pytest.fixture
def finished_run(cli, tmp_path):
    """A small finished run on a data folder of our own (so that its content can change)."""
    folder = write_quirky(tmp_path / "data")
    out = tmp_path / "run"
    code, err = cli(train.main, ["--data_dir", folder, "--output_dir", out, *QUICK])
    assert code == 0, err
    return folder, out


def resume(cli, folder, out, *extra):
    return cli(train.main, ["--data_dir", folder, "--output_dir", out, *QUICK, "--resume", "true", *extra])


def test_resume_refuses_changed_data_content_and_leaves_the_split(cli, finished_run):
    folder, out = finished_run
    splits = (out / "splits.json").read_bytes()
    posts = (folder / "posts.csv").read_bytes()
    (folder / "posts.csv").write_bytes(posts.replace(b"My cat is fine.", b"My cat is well."))  # same ids
    line = one_error_line(*resume(cli, folder, out))
    assert "the data changed since this run started" in line
    assert (out / "splits.json").read_bytes() == splits


@pytest.mark.parametrize("damage", ["empty", "missing", "no_record"])
def test_resume_refuses_a_missing_or_empty_record(cli, finished_run, damage):
    folder, out = finished_run
    splits = (out / "splits.json").read_bytes()
    if damage == "empty":
        (out / "config.yaml").write_text("")
    elif damage == "missing":
        (out / "config.yaml").unlink()
    else:
        (out / "run.json").unlink()
    line = one_error_line(*resume(cli, folder, out, "--seed", "7"))
    assert "missing or empty" in line and "cannot be continued" in line
    assert (out / "splits.json").read_bytes() == splits


def test_resume_refuses_an_edited_split_or_tokenizer(cli, finished_run):
    folder, out = finished_run
    saved = json.loads((out / "splits.json").read_text())
    (out / "splits.json").write_text(json.dumps({**saved, "test": saved["test"] + saved["train"][:1]}))
    assert "splits.json differs" in one_error_line(*resume(cli, folder, out))
    (out / "splits.json").write_text(json.dumps(saved))
    vocab = out / "tokenizer" / "tokenizer_config.json"
    vocab.write_text(vocab.read_text().replace("[UNK]", "[UNK]", 1) + "\n")
    assert "tokenizer differs" in one_error_line(*resume(cli, folder, out))


def test_resume_with_a_trailing_slash_or_a_moved_run_folder(cli, finished_run, tmp_path):
    folder, out = finished_run
    code, err = resume(cli, f"{folder}/", out, "--epochs", "3")
    assert code == 0, err
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(out, moved)
    code, err = resume(cli, folder, moved, "--epochs", "4")
    assert code == 0, err
    assert json.loads((moved / "run_stats.json").read_text())["resumed"] is True


class Evil:
    def __reduce__(self):  # what a malicious pickle does on load: call a function
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("damage,needle", [
    ("rng", "random_states_0.pkl"),
    ("pickle_optimizer", "cannot read the training state"),
    ("truncated_weights", "model.safetensors"),
    ("cut_state", "trainer_state.json"),
    ("no_scheduler", "lacks scheduler"),
])
def test_a_damaged_training_state_is_one_line_naming_it(cli, finished_run, tmp_path, monkeypatch, damage, needle):
    folder, out = finished_run
    last = out / "checkpoints" / "last"
    if damage == "rng":
        (last / "random_states_0.pkl").write_bytes(b"\x00" * 64)
    elif damage == "pickle_optimizer":
        (last / "optimizer.bin").write_bytes(pickle.dumps(Evil()))
    elif damage == "truncated_weights":
        weights = last / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "cut_state":
        state = last / "trainer_state.json"
        state.write_text(state.read_text()[:40])
    else:
        state = json.loads((last / "trainer_state.json").read_text())
        del state["scheduler"]
        (last / "trainer_state.json").write_text(json.dumps(state))
    splits = (out / "splits.json").read_bytes()
    monkeypatch.chdir(tmp_path)
    line = one_error_line(*resume(cli, folder, out, "--epochs", "3"))
    assert needle in line
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled
    assert (out / "splits.json").read_bytes() == splits


def test_an_edited_checkpoint_config_is_named(finished_run):
    _, out = finished_run
    best = out / "checkpoints" / "best"
    original = (best / "config.yaml").read_text()
    config = yaml.safe_load(original)
    (best / "config.yaml").write_text(yaml.safe_dump({**config, "max_length": 64}, sort_keys=False))
    with pytest.raises(UserError, match=r"config.yaml: edited after the checkpoint was saved \(max_length"):
        load_checkpoint(best)
    (best / "config.yaml").write_text(yaml.safe_dump({**config, "max_length": 1}, sort_keys=False))
    with pytest.raises(UserError, match=r"best/config.yaml: --doc_stride"):  # the file, not a flag never given
        load_checkpoint(best)
    (best / "config.yaml").write_text(original)
    assert load_checkpoint(best)[2].max_length == config["max_length"]


def test_a_yaml_alias_bomb_is_reported_by_size(cli, tmp_path):
    levels = ["&a [x, x, x, x, x, x, x, x, x, x]"] + [f"&{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
                                                     for p, c in zip("abcdef", "bcdefg")]  # 10 x 8**6 leaves
    (tmp_path / "bomb.yaml").write_text(f"lr: [{', '.join(levels)}]\n")
    code, err = cli(train.main, ["--config", tmp_path / "bomb.yaml"])
    line = one_error_line(code, err)
    assert "invalid value (a list of 7 items) for 'lr'" in line and len(line) < 300


def test_a_tracking_store_that_stops_answering_does_not_stop_training(tmp_path, monkeypatch, caplog):
    """After the first failed request the tracker warns once and goes quiet; the run finishes, its metrics equal an
    untracked run's, and run_stats.json says what was not logged."""
    import mlflow.tracking

    small = dict(demo_posts=40, tiny_hidden=16, tiny_layers=1, tiny_heads=1, tiny_vocab=300, max_length=96,
                 doc_stride=16, batch_size=8, demo_shift_posts=0, epochs=2, log_every=1, deterministic=True)
    untracked = runner.run(make_config(**small, mlflow=False, output_dir=str(tmp_path / "plain")))
    calls = {"n": 0}
    real = mlflow.tracking.MlflowClient.log_batch

    def dies_after_three(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise ConnectionError("Connection refused")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.tracking.MlflowClient, "log_batch", dies_after_three)
    cfg = make_config(**small, mlflow=True, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                      output_dir=str(tmp_path / "tracked"))
    tracked = runner.run(cfg)
    assert tracked["test"] == untracked["test"] and tracked["val"] == untracked["val"]
    stats = json.loads((tmp_path / "tracked" / "run_stats.json").read_text())
    assert stats["mlflow_failure"].startswith("metrics: Connection refused")
    assert stats["mlflow_unlogged_metric_points"] > 0
    assert calls["n"] == 4  # one failed request, then none
    # its end was not logged either: the run shows RUNNING in the store, and a line says how to end it
    assert f"MLflow run {stats['mlflow_run_id']} stays RUNNING" in caplog.text and "set_terminated" in caplog.text


def test_three_runs_starting_on_a_new_tracking_store_all_start(tmp_path):
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    code = ("import sys; sys.path.insert(0, %r); from config import make_config; from tracking import Tracker; "
            "t = Tracker(make_config(tracking_uri=%r, output_dir=sys.argv[1]), True); t.end(); print(t.run_id)")
    procs = [subprocess.Popen([sys.executable, "-c", code % (str(ROOT), uri), str(tmp_path / f"o{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0, 0], [r[1][-500:] for r in results]
    assert len({r[0].strip() for r in results}) == 3


def test_sigterm_ends_the_run_killed_and_the_resume_logs_no_step_twice(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    argv = [sys.executable, "train.py", *QUICK, "--mlflow", "true", "--tracking_uri", uri, "--output_dir",
            str(tmp_path / "run"), "--epochs", "30", "--patience", "0", "--log_every", "1", "--demo_posts", "80"]
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "epoch 1 step" not in seen:  # two epochs trained and saved, 28 to go
        line = proc.stderr.readline()
        assert line, seen
        seen += line
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    err = seen + proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"error: stopped by SIGTERM; continue it with: python train.py --output_dir {tmp_path / 'run'} --resume true "
        "(and the same flags)")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("redsm5").experiment_id])
    assert run.info.status == "KILLED"
    resumed = subprocess.run(argv + ["--resume", "true"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "1_train/loss")]
    assert len(steps) == len(set(steps)) and steps and max(steps) == json.loads(
        (tmp_path / "run" / "run_stats.json").read_text())["steps"]


def test_evaluate_on_another_labelled_corpus_never_scores_trained_posts_as_new(cli, finished_run, tmp_path):
    """--data_dir of the training corpus scores its test split; a corpus with other content (here: the same posts,
    one sentence reworded) is not the training corpus by its digest, but its posts whose ids the model trained or
    validated on are left out: what is scored as new is the test split's posts (issue 33)."""
    import evaluate

    folder, out = finished_run
    best, splits = out / "checkpoints" / "best", json.loads((out / "splits.json").read_text())
    code, err = cli(evaluate.main, ["--checkpoint", best, "--data_dir", f"{folder}/",
                                    "--output", tmp_path / "same.json"])
    assert code == 0, err
    assert f"{len(splits['test'])} of the corpus's" in err
    assert list(json.loads((tmp_path / "same.json").read_text())) == ["test"]
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    (other / "posts.csv").write_bytes((other / "posts.csv").read_bytes().replace(b"My cat is fine.", b"My cat is ok."))
    code, err = cli(evaluate.main, ["--checkpoint", best, "--data_dir", other, "--output", tmp_path / "all.json"])
    assert code == 0, err
    n_posts, n_seen = sum(len(ids) for ids in splits.values()), len(splits["train"]) + len(splits["val"])
    assert f"{n_seen} of its {n_posts} posts have ids the model trained or validated on" in err
    scored = json.loads((tmp_path / "all.json").read_text())["unseen"]
    assert scored["n"] == json.loads((tmp_path / "same.json").read_text())["test"]["n"]


def test_a_run_never_writes_inside_another_run_or_a_checkpoint(cli, finished_run, tmp_path):
    """`--output_dir <run>/checkpoints/best` exited 0 and rewrote that checkpoint's config.yaml and splits.json
    (issue 31): a folder in another run's folder, or a checkpoint folder anywhere, is refused before anything is
    written there (not even the lock file), also with --overwrite_output_dir."""
    folder, out = finished_run
    best = out / "checkpoints" / "best"
    copied = tmp_path / "models" / "best"  # a checkpoint outside any run: the folder itself says what it is
    shutil.copytree(best, copied)
    before = {f: f.read_bytes() for f in best.rglob("*") if f.is_file()}
    for target, needle in [(best, f"is the checkpoint folder {best}"), (out / "extra", f"another run, {out}"),
                           (copied, f"is the checkpoint folder {copied}"),
                           (copied / "encoder" / "new", f"is inside the checkpoint folder {copied / 'encoder'}")]:
        for overwrite in ("false", "true"):
            code, err = cli(train.main, ["--data_dir", folder, "--output_dir", target, *QUICK,
                                         "--overwrite_output_dir", overwrite])
            line = one_error_line(code, err)
            assert f"--output_dir {target}: " in line and needle in line, line
    assert {f: f.read_bytes() for f in best.rglob("*") if f.is_file()} == before
    assert not (out / "extra").exists() and not (copied / "encoder" / "new").exists()
    assert not (best / ".lock").exists() and not (copied / ".lock").exists()


def test_a_run_never_writes_its_config_over_the_config_file_it_reads(cli, tmp_path):
    """`--config mine/config.yaml --output_dir mine` replaced the user's hand-written file with the resolved config
    (issue 31): refused in one line, the file as it was; the same file drives a run in another folder."""
    mine = tmp_path / "mine"
    mine.mkdir()
    text = "# tried first: a short run\nepochs: 1\nmax_steps: 2\n"
    (mine / "config.yaml").write_text(text)
    line = one_error_line(*cli(train.main, ["--config", mine / "config.yaml", "--output_dir", mine, *QUICK[:-4]]))
    assert f"--config {mine / 'config.yaml'}: is the config.yaml this run writes in --output_dir {mine}" in line
    assert (mine / "config.yaml").read_text() == text and not (mine / ".lock").exists()
    code, err = cli(train.main, ["--config", mine / "config.yaml", "--output_dir", tmp_path / "run", *QUICK[:-4]])
    assert code == 0, err
    assert (mine / "config.yaml").read_text() == text
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["max_steps"] == 2


@pytest.mark.parametrize("raised", ["OSError", "SafetensorError"])
def test_a_full_disk_while_saving_is_one_line_and_leaves_no_temp_folder(cli, tmp_path, monkeypatch, raised):
    """The weights writer of checkpoints/last (accelerate's, through safetensors) finds the disk full: it was a
    SafetensorError traceback with last.tmp left behind (issue 31). Now one line naming the folder, exit code 2,
    no last.tmp; checkpoints/best (saved before it) stays complete."""
    import errno

    import accelerate.utils.other
    from safetensors import SafetensorError

    def disk_full(*args, **kwargs):
        if raised == "OSError":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", disk_full)
    out = tmp_path / "run"
    line = one_error_line(*cli(train.main, ["--output_dir", out, *QUICK[:-2]]))  # last: first at the epoch's end
    assert line.startswith(f"error: {out / 'checkpoints' / 'last'}: cannot be written (No space left on device); "
                           "nothing half-written is left; free some space")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best"]
    assert load_checkpoint(out / "checkpoints" / "best")[3]["epoch"] == 0


def test_sigterm_to_the_process_group_with_dataloader_workers_is_one_line(tmp_path):
    """`scancel` and `timeout` signal the whole process group: with --num_workers 2 the workers died of it and the
    main process raised "DataLoader worker is killed by signal" (tracebacks, exit 1; issue 31). The workers leave
    SIGTERM to the main process, which ends the run with the one documented line and 143; no worker is left."""
    argv = [sys.executable, "train.py", *QUICK, "--num_workers", "2", "--output_dir", str(tmp_path / "run"),
            "--epochs", "200", "--patience", "0"]
    proc = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = ""
    while "epoch 1 step" not in seen:  # the workers have served two epochs, and go on
        line = proc.stderr.readline()
        assert line, seen
        seen += line
    os.killpg(proc.pid, signal.SIGTERM)
    err = seen + proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "killed by signal" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: stopped by SIGTERM; continue it with: python train.py")
    time.sleep(1)
    with pytest.raises(ProcessLookupError):  # nothing of the group is left
        os.killpg(proc.pid, 0)
