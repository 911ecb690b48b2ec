"""The bad-input matrix: every case exits with code 2 and one line naming the file, column or flag.

The scripts' `main` functions run in-process through `utils.run_main` (what `python X.py` runs);
two subprocess tests check the real entry points once.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, write_corpus, write_quirky

import data
import demo
import evaluate
import models
import train
import utils
from checkpoint import load_checkpoint
from utils import UserError


def assert_one_line_error(code, err, *needles, only_line=False):
    """Exit code 2, no traceback, exactly one `error:` line (the last), containing every needle."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    if only_line:  # failed before any logging: the error is all there is
        assert lines == errors, err


QUICK = ["--mlflow", "false", "--demo_posts", "40", "--tiny_hidden", "16", "--tiny_layers", "1", "--tiny_heads", "1",
         "--tiny_vocab", "300", "--max_length", "96", "--doc_stride", "16", "--batch_size", "8",
         "--demo_shift_posts", "10"]


# --------------------------------------------------------------------------- flags and config files (train.py)

@pytest.mark.parametrize("argv, needles", [
    (["--lrr", "3"], ["unrecognized arguments: --lrr 3", "(did you mean --lr?)"]),
    (["--zzzz"], ["unrecognized arguments: --zzzz", "(valid: --help, --config, --task, --data_dir",
                  "--run_name, --mlflow_system_metrics, --mlflow_log_model, --mlflow_register_model)"]),
    (["--epochs", "three"], ["--epochs", "'three'", "expected int"]),
    (["--max_steps", "1.5"], ["--max_steps", "'1.5'", "expected int"]),
    (["--lr", "fast"], ["--lr", "expected float"]),
    (["--lr", "-1"], ["--lr", "must be > 0"]),
    (["--task", "foo"], ["--task", "'foo'", "criteria, evidence, joint"]),
    (["--unit", "word"], ["--unit", "sentence, post"]),
    (["--mlflow_log_model", "true"], ["--mlflow_log_model", "criteria model of --unit sentence", "--unit post"]),
    (["--mlflow", "maybe"], ["--mlflow", "expected bool"]),
    (["--val_ratio", "1.5"], ["--val_ratio", "[0, 1)"]),
    (["--batch_size", "0"], ["--batch_size", ">= 1"]),
    (["--max_length", "64", "--doc_stride", "40"], ["--doc_stride", "max_length/2"]),
    (["--epochs"], ["--epochs", "expected one argument"]),
    (["--epochs", "0"], ["--epochs", "must be >= 1, got 0"]),
    (["--log_every", "0"], ["--log_every", "must be >= 1"]),
    (["--lr", "nan"], ["--lr", "must be a finite number, got nan"]),
    (["--task", "evidence", "--doc_stride", "-1"], ["--doc_stride", "must be >= 0, got -1"]),
    (["--threads", "-1"], ["--threads", "must be >= 0"]),
    (["--tiny_heads", "3"], ["--tiny_heads", "must divide --tiny_hidden 128, got 3"]),
    (["--tiny_hidden", "0"], ["--tiny_hidden", "must be >= 1"]),
    (["--tiny_layers", "0"], ["--tiny_layers", "must be >= 1"]),
    (["--val_ratio", "0.5", "--test_ratio", "0.5"], ["--val_ratio + --test_ratio", "0.5 + 0.5 >= 1"]),
    (["--output_dir", ""], ["--output_dir", "must not be empty"]),
    # one range per field, from its knob, refused before anything is prepared or written (issue 31)
    (["--weight_decay", "-0.5"], ["--weight_decay: must be >= 0, got -0.5"]),
    (["--max_grad_norm", "-1"], ["--max_grad_norm: must be >= 0, got -1.0"]),
    (["--min_delta", "-5"], ["--min_delta: must be >= 0, got -5.0"]),
    (["--loss_weight_evidence", "-1"], ["--loss_weight_evidence: must be >= 0, got -1.0"]),
    (["--demo_shift_posts", "-5"], ["--demo_shift_posts: must be >= 0, got -5"]),
    (["--adam_beta1", "1.5"], ["--adam_beta1: must be in [0, 1), got 1.5"]),
    (["--adam_beta2", "1"], ["--adam_beta2: must be in [0, 1), got 1.0"]),
    (["--adam_eps", "-1"], ["--adam_eps: must be > 0, got -1.0"]),
    (["--adam_eps", "0"], ["--adam_eps: must be > 0, got 0.0"]),
    (["--head_lr", "0"], ["--head_lr: must be > 0, got 0.0"]),
    (["--mlflow_register_model", "m"], ["--mlflow_register_model m", "add --mlflow_log_model true"]),
    (["--task", "evidence", "--class_weights", "true"], ["--class_weights: weighs the criteria loss"]),
])
def test_bad_flags(cli, argv, needles):
    code, err = cli(train.main, argv)
    assert_one_line_error(code, err, *needles, only_line=True)


def test_bad_paths_in_flags(cli, tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01task: joint\x00")
    for argv, needles in [(["--output_dir", tmp_path / "a_file"], ["--output_dir", "a_file", "is a file"]),
                          (["--model", tmp_path / "empty_model"], ["--model", "empty_model", "without config.json"]),
                          (["--config", tmp_path / "binary.yaml"], ["binary.yaml", "not a text (UTF-8) config file"])]:
        code, err = cli(train.main, argv)
        assert_one_line_error(code, err, *needles, only_line=True)


@pytest.mark.parametrize("content, needles", [
    ("lrr: 0.1\n", ["unknown config key 'lrr'", "valid: task, data_dir"]),
    ("epochs: three\n", ["invalid value 'three' for 'epochs'", "expected int"]),
    ("epochs: 2.5\n", ["'epochs'", "expected int"]),
    ("mlflow: [1, 2]\n", ["'mlflow'", "expected bool"]),
    ("task: foo\n", ["'task'", "criteria, evidence, joint"]),
    ("- epochs\n", ["expected a mapping"]),
    ("epochs: [unclosed\n", ["not valid YAML"]),
    ("1: 2\nepochs: 1\n", ["config key 1 (int) is not a field name"]),
    ("null: 2\n", ["config key None (NoneType) is not a field name"]),
    ("lr: " + "[" * 5000 + "]" * 5000 + "\n", ["nested too deeply to read", "not a config file"]),
])
def test_bad_config_files(cli, tmp_path, content, needles):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    code, err = cli(train.main, ["--config", path])
    assert_one_line_error(code, err, str(path), *needles, only_line=True)


def test_config_file_missing_and_precedence(cli, tmp_path):
    code, err = cli(train.main, ["--config", tmp_path / "none.yaml"])
    assert_one_line_error(code, err, "none.yaml: config file not found", only_line=True)
    # YAML (3e-5 is a string to YAML 1.1, still a float here) < flags; the rest keep their defaults
    path = tmp_path / "ok.yaml"
    path.write_text("lr: 3e-5\nepochs: 2.0\ntask: evidence\n")
    from cli import parse_config

    cfg, _ = parse_config(["--config", str(path), "--epochs", "5"])
    assert (cfg.lr, cfg.epochs, cfg.task, cfg.batch_size) == (3e-5, 5, "evidence", 32)


# --------------------------------------------------------------------------- data problems (train.py)

def run_train_on(cli, tmp_path, folder, *extra):
    return cli(train.main, ["--data_dir", folder, "--output_dir", tmp_path / "out", *QUICK, *extra])


def test_missing_data_dir(cli, tmp_path):
    code, err = run_train_on(cli, tmp_path, tmp_path / "nowhere")
    assert_one_line_error(code, err, str(tmp_path / "nowhere"), "data directory not found")


def test_no_redsm5_files(cli, tmp_path):
    (tmp_path / "d").mkdir()
    code, err = run_train_on(cli, tmp_path, tmp_path / "d")
    assert_one_line_error(code, err, "no ReDSM5 files found", "posts.csv + annotations.csv")


@pytest.mark.parametrize("names", data.FILE_PAIRS)
def test_missing_posts_file(cli, tmp_path, names):
    folder = write_quirky(tmp_path / "d", names)
    (folder / names[0]).unlink()
    code, err = run_train_on(cli, tmp_path, folder)
    assert_one_line_error(code, err, str(folder / names[0]), "file not found")


def test_missing_column_names_the_column(cli, tmp_path):
    folder = write_corpus(tmp_path / "d", [("a", "x")], [("a", "a_0", "x", "FATIGUE", "1")])
    (folder / "posts.csv").write_text("post_id,body\na,hello\n")
    code, err = run_train_on(cli, tmp_path, folder)
    assert_one_line_error(code, err, str(folder / "posts.csv"), "missing column 'text'", "found: post_id, body")


def test_empty_csv(cli, tmp_path):
    folder = write_corpus(tmp_path / "d", [("a", "x")], [("a", "a_0", "x", "FATIGUE", "1")])
    (folder / "annotations.csv").write_bytes(b"")
    code, err = run_train_on(cli, tmp_path, folder)
    assert_one_line_error(code, err, str(folder / "annotations.csv"), "file is empty")


def test_splits_file_with_a_post_in_two_splits(cli, tmp_path):
    folder = write_quirky(tmp_path / "d")
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": ["p_main", "p_dup"], "val": ["p_nl"], "test": ["p_dup"]}))
    code, err = run_train_on(cli, tmp_path, folder, "--splits_file", splits)
    assert_one_line_error(code, err, str(splits), "post 'p_dup' is in both 'train' and 'test'")


def test_max_length_too_small_for_the_criterion(cli, tmp_path):
    code, err = cli(train.main, ["--output_dir", tmp_path / "out", *QUICK, "--task", "evidence", "--encoding", "pair",
                                 "--max_length", "40", "--doc_stride", "16"])
    assert_one_line_error(code, err, "--max_length 40", "--doc_stride 16")


def test_resume_without_a_saved_state(cli, tmp_path):
    code, err = cli(train.main, ["--output_dir", tmp_path / "out", *QUICK, "--resume", "true"])
    assert_one_line_error(code, err, str(tmp_path / "out" / "checkpoints" / "last"), "no complete training state")


def test_resume_a_run_of_another_task(cli, tmp_path):
    out = tmp_path / "out"
    code, err = cli(train.main, ["--output_dir", out, *QUICK, "--max_steps", "1", "--epochs", "1"])
    assert code == 0, err
    code, err = cli(train.main, ["--output_dir", out, *QUICK, "--max_steps", "2", "--epochs", "1",
                                 "--resume", "true", "--task", "evidence"])
    assert_one_line_error(code, err, str(out / "config.yaml"), "task 'criteria' -> 'evidence'")


@pytest.mark.parametrize("change, needle", [(["--seed", "7"], "seed 42 -> 7"),
                                           (["--data_dir", "OTHER"], "data_dir None")])
def test_resume_refuses_settings_that_change_the_data_and_allows_more_epochs(cli, tmp_path, change, needle):
    """A resume with another seed would redraw the split (16 of 20 new test posts had been trained on)."""
    out, other = tmp_path / "out", tmp_path / "other"
    other.mkdir()  # refused before any data is read
    code, err = cli(train.main, ["--output_dir", out, *QUICK, "--max_steps", "1", "--epochs", "1"])
    assert code == 0, err
    splits = (out / "splits.json").read_text()
    change = [str(other) if a == "OTHER" else a for a in change]
    code, err = cli(train.main, ["--output_dir", out, *QUICK, "--max_steps", "2", "--epochs", "1", "--resume", *change])
    assert_one_line_error(code, err, str(out / "config.yaml"), needle, "another --output_dir")
    assert (out / "splits.json").read_text() == splits  # refused before anything was rewritten
    code, err = cli(train.main, ["--output_dir", out, *QUICK, "--max_steps", "3", "--epochs", "2", "--resume"])
    assert code == 0, err
    assert json.loads((out / "run_stats.json").read_text())["steps"] == 3


def test_a_second_run_on_a_busy_output_dir_names_the_holder(cli, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; from pathlib import Path; "
                               "p = Path(sys.argv[1]); p.mkdir(); f = open(p / '.lock', 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.write(str(os.getpid())); f.flush(); "
                               "print('locked', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, err = cli(train.main, ["--output_dir", out, *QUICK, "--max_steps", "1"])
        assert_one_line_error(code, err, str(out), f"another run is using it (pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait()
    code, err = cli(train.main, ["--output_dir", out, *QUICK, "--max_steps", "1", "--epochs", "1"])
    assert code == 0, err  # the kernel released the dead holder's lock


# --------------------------------------------------------------------------- checkpoints (evaluate.py)

def copy_checkpoint(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_load_checkpoint_checks_the_task(checkpoint):
    model, _, cfg, extra = load_checkpoint(checkpoint, expect_task="criteria")
    assert cfg.task == "criteria" and model.cls_head is not None and model.span_head is None
    with pytest.raises(UserError, match="checkpoint of task 'criteria', expected 'evidence'"):
        load_checkpoint(checkpoint, expect_task="evidence")


def write_config(path, cfg: dict) -> None:
    """A checkpoint whose config.yaml and checkpoint.json agree on another config (as a foreign folder would)."""
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    extra = json.loads((path / "checkpoint.json").read_text())
    (path / "checkpoint.json").write_text(json.dumps({**extra, "config": cfg}))


@pytest.mark.parametrize("damage, needles", [
    ("nothing_there", ["not a complete checkpoint", "encoder/model.safetensors", "heads.safetensors"]),
    ("no_weights", ["not a complete checkpoint (missing encoder/model.safetensors)"]),
    ("no_heads", ["not a complete checkpoint (missing heads.safetensors)"]),
    ("no_tokenizer", ["not a complete checkpoint (missing encoder/tokenizer_config.json)"]),
    ("no_span_encoder", ["not a complete checkpoint (missing span_encoder/model.safetensors)"]),
    ("old_layout", ["written by an older version", "model.safetensors + encoder_config.json", "retrain"]),
    ("other_task", ["heads.safetensors", "weights do not match a 'evidence' model"]),
    ("bad_config", ["config.yaml: unknown config key 'colour'"]),
    ("edited_config", ["config.yaml: edited after the checkpoint was saved (max_length differ"]),
    # a TypeError traceback in evaluate.py (issue 31)
    ("thresholds_list", ["checkpoint.json: its thresholds are damaged (a list, not a mapping of names to numbers)"]),
    ("paper_thresholds_cut", ["checkpoint.json: its thresholds are damaged (paper_thresholds is not a number for"]),
])
def test_bad_checkpoints(cli, checkpoint, tmp_path, damage, needles):
    path = tmp_path / "best"
    if damage != "nothing_there":
        copy_checkpoint(checkpoint, path)
    cfg = yaml.safe_load((checkpoint / "config.yaml").read_text())
    if damage == "no_weights":
        (path / "encoder" / "model.safetensors").unlink()
    elif damage == "no_heads":
        (path / "heads.safetensors").unlink()
    elif damage == "no_tokenizer":
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (path / "encoder" / f).unlink()
    elif damage == "no_span_encoder":  # a joint model with two encoders, the second one not there
        write_config(path, {**cfg, "task": "joint", "shared_encoder": False})
    elif damage == "old_layout":  # what this code wrote before checkpoints had the Hugging Face layout
        for f in ("model.safetensors", "encoder_config.json"):
            (path / f).write_bytes(b"{}")
    elif damage == "other_task":  # a criteria model's weights behind an evidence run's config
        write_config(path, {**cfg, "task": "evidence"})
    elif damage == "edited_config":  # config.yaml changed by hand after the save: scores would silently change
        (path / "config.yaml").write_text(yaml.safe_dump({**cfg, "max_length": 48}))
    elif damage == "bad_config":
        (path / "config.yaml").write_text(yaml.safe_dump({"task": "criteria", "colour": "red"}))
    elif damage in ("thresholds_list", "paper_thresholds_cut"):
        extra = json.loads((path / "checkpoint.json").read_text())
        extra["thresholds"] = [0.5, 0.5] if damage == "thresholds_list" else {"paper_thresholds": {"FATIGUE": 0.4}}
        (path / "checkpoint.json").write_text(json.dumps(extra))
    code, err = cli(evaluate.main, ["--checkpoint", path])
    assert_one_line_error(code, err, str(path), *needles)


def test_run_dir_instead_of_its_checkpoint(cli, checkpoint):
    run_dir = checkpoint.parent.parent  # outputs/run rather than outputs/run/checkpoints/best
    code, err = cli(evaluate.main, ["--checkpoint", run_dir])
    assert_one_line_error(code, err, str(run_dir), "not a complete checkpoint")


@pytest.mark.parametrize("argv, needles", [
    ([], ["the following arguments are required: --checkpoint"]),
    (["--checkpoint", "x", "--split", "dev"], ["--split", "'dev'", "'train', 'val', 'test'"]),
    (["--checkpoint", "x", "--batch_size", "big"], ["--batch_size", "invalid int value: 'big'"]),
    (["--checkpoint", "x", "--bogus"], ["unrecognized arguments: --bogus"]),
])
def test_evaluate_bad_flags(cli, argv, needles):
    code, err = cli(evaluate.main, argv)
    assert_one_line_error(code, err, *needles, only_line=True)


def test_predict_file_problems(cli, checkpoint, tmp_path):
    code, err = cli(evaluate.main, ["--checkpoint", checkpoint, "--predict", tmp_path / "new.csv"])
    assert_one_line_error(code, err, str(tmp_path / "new.csv"), "file not found")
    (tmp_path / "new.csv").write_text("id,text\n1,hello\n")
    code, err = cli(evaluate.main, ["--checkpoint", checkpoint, "--predict", tmp_path / "new.csv"])
    assert_one_line_error(code, err, str(tmp_path / "new.csv"), "missing column 'post_id'")


# --------------------------------------------------------------------------- data.py

def test_data_cli_errors(cli, tmp_path):
    code, err = cli(data.main, ["--data_dir", tmp_path / "nowhere"])
    assert_one_line_error(code, err, str(tmp_path / "nowhere"), "data directory not found")
    code, err = cli(data.main, ["--make_demo", tmp_path / "demo", "--n_posts", "many"])
    assert_one_line_error(code, err, "--n_posts", "invalid int value: 'many'", only_line=True)


def test_data_cli_reports_a_quirky_folder(cli, tmp_path):
    code, err = cli(data.main, ["--data_dir", write_quirky(tmp_path / "d")])
    assert code == 0 and "annotations: 19 read, 9 kept" in err and "unaligned 1" in err


# --------------------------------------------------------------------------- the real entry points

def run_script(*argv, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / argv[0]), *map(str, argv[1:])], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_make_demo_script_writes_a_corpus_that_loads_cleanly(tmp_path):
    proc = run_script("data.py", "--make_demo", tmp_path / "demo", "--n_posts", 60, "--seed", 5, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["annotations.csv", "posts.csv", "shift"]
    shift = data.load_corpus(tmp_path / "demo" / "shift")  # the held-out phrasing, 200 posts by default
    assert shift.report["posts_kept"] == 200 and shift.report["dropped"] == {} and min(shift.posts) == "shift_00000"
    corpus = data.load_corpus(tmp_path / "demo")
    rep = corpus.report
    posts, anns = demo.make_demo(60, 5)
    assert rep["dropped"] == {} and rep["posts_kept"] == rep["posts_read"] == 60
    assert rep["annotations_kept"] == rep["annotations_read"] == len(anns)
    assert rep["alignment"]["exact"] == len(anns)
    assert corpus.posts == {p["post_id"]: p["text"] for p in posts}  # the CSV round trip is lossless


def test_script_bad_input_exits_2_without_traceback(tmp_path):
    proc = run_script("train.py", "--task", "foo", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: --task: invalid value 'foo' for 'task' (choose from criteria, evidence, joint)"]
    assert not (tmp_path / "outputs").exists()  # nothing written on a bad command line


def test_help_prints_every_field_help_as_written(capsys):
    """argparse %-formats help texts: lora_dropout's '27% slower' printed the action's dict in its place."""
    from cli import parse_config
    from config import config_fields

    with pytest.raises(SystemExit):
        parse_config(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "a CPU 0.1 makes a step 27% slower than 0" in help_text
    assert "option_strings" not in help_text
    for name, f in config_fields().items():
        assert " ".join(f.metadata["help"].split()[:4]) in help_text, name


def test_boolean_flags_also_take_the_bare_form():
    from cli import parse_config

    assert parse_config(["--resume"])[0].resume is True
    assert parse_config(["--resume", "false"])[0].resume is False
    cfg = parse_config(["--mlflow", "--deterministic", "--epochs", "2"])[0]
    assert (cfg.mlflow, cfg.deterministic, cfg.epochs) == (True, True, 2)
    with pytest.raises(UserError, match="--epochs"):  # a non-boolean flag still needs its value
        parse_config(["--epochs"])


@pytest.mark.parametrize("posts, needles", [
    ("post_id,text\np1,I cannot sleep, I wake at 3am, every night.\np2,fine\n",
     ["posts.csv", "line 2", "4 fields where the header has 2", "quote the field"]),
    ('post_id,text\np1,"I cannot sleep\np2,I feel fine\np3,ok\n',
     ["posts.csv", "malformed CSV at line 2", "unclosed quote"]),
    ('post_id,text\np1,"I cannot sleep\np2,"I feel fine"\n', ["posts.csv", "malformed CSV at line 2"]),
])
def test_csv_rows_are_never_cut_or_merged_silently(cli, tmp_path, posts, needles):
    """An unquoted comma would cut p1's text; an unclosed quote would swallow p2 into p1."""
    folder = tmp_path / "d"
    write_corpus(folder, [["p0", "I sleep well."]], [["p0", "p0_0", "I sleep well.", "SLEEP_ISSUES", "0"]])
    (folder / "posts.csv").write_text(posts)
    code, err = run_train_on(cli, tmp_path, folder)
    assert_one_line_error(code, err, *needles)


# --------------------------------------------------------------------------- evaluate.py: damaged checkpoints, outputs

def truncate(path, n=100):
    path.write_bytes(path.read_bytes()[:n])


@pytest.mark.parametrize("damage, file, needles", [
    (lambda p: truncate(p / "encoder" / "model.safetensors"), "encoder/model.safetensors",
     ["cannot read the weights", "truncated"]),
    (lambda p: (p / "encoder" / "model.safetensors").write_bytes(b""), "encoder/model.safetensors",
     ["cannot read the weights"]),
    (lambda p: truncate(p / "heads.safetensors", 40), "heads.safetensors", ["cannot read the weights", "truncated"]),
    (lambda p: (p / "checkpoint.json").write_text("{oops"), "checkpoint.json", ["not a valid checkpoint.json"]),
    (lambda p: (p / "checkpoint.json").write_text("[1, 2]"), "checkpoint.json", ["expected a JSON object, got list"]),
    (lambda p: (p / "encoder" / "config.json").write_text('{"hidden'), "encoder/config.json",
     ["not a valid encoder config"]),
    (lambda p: (p / "encoder" / "config.json").write_text("{}"), "encoder/config.json", ["`model_type`"]),
    (lambda p: (p / "encoder" / "config.json").write_text(json.dumps(
        {**json.loads((p / "encoder" / "config.json").read_text()), "hidden_size": 24})), "encoder",
     ["cannot build its encoder"]),
    (lambda p: truncate(p / "encoder" / "tokenizer.json"), "encoder/tokenizer.json", ["not a valid tokenizer file"]),
    (lambda p: (p / "encoder" / "tokenizer.json").write_bytes(b"\xff\xfe\x00"), "encoder/tokenizer.json",
     ["not a valid tokenizer file", "utf-8"]),
    (lambda p: (p / "encoder" / "tokenizer.json").write_text("{}"), "encoder", ["cannot load the tokenizer"]),
    (lambda p: (p / "encoder" / "tokenizer_config.json").write_text("{oops"), "encoder/tokenizer_config.json",
     ["not a valid tokenizer file"]),
], ids=["weights_truncated", "weights_empty", "heads_truncated", "checkpoint_json_corrupt", "checkpoint_json_list",
        "encoder_config_corrupt", "encoder_config_no_model_type", "encoder_config_other_width",
        "tokenizer_json_truncated", "tokenizer_json_binary", "tokenizer_json_empty_object", "tokenizer_config_corrupt"])
def test_damaged_checkpoint_files(cli, checkpoint, tmp_path, damage, file, needles):
    path = copy_checkpoint(checkpoint, tmp_path / "best")
    damage(path)
    code, err = cli(evaluate.main, ["--checkpoint", path])
    assert_one_line_error(code, err, str(path / file), *needles)


@pytest.mark.parametrize("value", ["0", "-1"])
def test_evaluate_batch_size_must_be_positive(cli, value):
    code, err = cli(evaluate.main, ["--checkpoint", "x", "--batch_size", value])
    assert_one_line_error(code, err, "--batch_size", f"must be >= 1, got {value}")


@pytest.mark.parametrize("predict", [False, True], ids=["split", "predict"])
def test_evaluate_out_of_memory_is_one_line_naming_the_batch(cli, checkpoint, tmp_path, monkeypatch, predict):
    (tmp_path / "new.csv").write_text("post_id,text\np1,I can't sleep and I feel worthless.\n")

    def forward(self, **batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(models.TaskModel, "forward", forward)
    corpus = write_corpus(tmp_path / "d", [["p0", "I can't sleep."]], [["p0", "p0_0", "I can't sleep.", "SLEEP_ISSUES",
                                                                         "1"]])
    argv = ["--checkpoint", checkpoint, "--batch_size", "16"] + (["--predict", tmp_path / "new.csv"] if predict else
                                                                 ["--data_dir", corpus])
    code, err = cli(evaluate.main, [*argv, "--output", tmp_path / "out.json"])
    assert_one_line_error(code, err, "out of memory scoring at --batch_size 16 (CUDA out of memory. Tried to "
                          "allocate 2.00 GiB): give a smaller --batch_size")
    assert not (tmp_path / "out.json").exists()


@pytest.mark.parametrize("name, needles", [
    ("nonexistent/dir/x.jsonl", ["does not exist"]),
    ("nonexistent/x.json", ["does not exist"]),
    ("a_dir", ["is a directory"]),
])
@pytest.mark.parametrize("predict", [True, False], ids=["predict", "metrics"])
def test_evaluate_output_not_writable_is_refused_before_loading(cli, tmp_path, name, needles, predict):
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "new.csv").write_text("post_id,text\np1,hello\n")
    output = tmp_path / name
    # the checkpoint does not exist: the output is checked before anything is loaded or run
    argv = ["--checkpoint", tmp_path / "none", "--output", output] + (["--predict", tmp_path / "new.csv"] * predict)
    code, err = cli(evaluate.main, argv)
    assert_one_line_error(code, err, f"--output {output}", *needles)


@pytest.mark.parametrize("target", ["predict", "predict_by_another_name", "checkpoint_file", "data_file"])
def test_evaluate_output_that_is_one_of_its_inputs_is_refused(cli, checkpoint, tmp_path, target):
    """`--predict posts.csv --output posts.csv` replaced the input with the predictions (issue 31)."""
    posts = tmp_path / "new.csv"
    posts.write_text("post_id,text\np1,I cannot sleep.\n")
    (tmp_path / "link.csv").symlink_to(posts)
    data = write_quirky(tmp_path / "data")
    output, flag, read = {"predict": (posts, "--predict", posts),
                          "predict_by_another_name": (tmp_path / "link.csv", "--predict", posts),
                          "checkpoint_file": (checkpoint / "checkpoint.json", "--checkpoint",
                                              checkpoint / "checkpoint.json"),
                          "data_file": (data / "posts.csv", "--data_dir", data / "posts.csv")}[target]
    before = read.read_bytes()
    argv = ["--checkpoint", checkpoint, "--output", output] + (["--predict", posts] if flag == "--predict" else
                                                                ["--data_dir", data])
    code, err = cli(evaluate.main, argv)
    assert_one_line_error(code, err, f"--output {output}: is the {flag} file", "give another file")
    assert read.read_bytes() == before


@pytest.mark.parametrize("content, needles", [
    ("post_id,text\n", ["no posts (a header and no rows)"]),
    ("post_id,text\n\n\n", ["no posts (a header and no rows)"]),
    ("post_id,text\np1,\n,hello\n", ["no row has both a post_id and a visible text", "1 without post_id"]),
    ("post_id,text\np1,hello\np2,world\np1,again\n", ["post_id 'p1' on line 2 and again on line 4"]),
    ('post_id,text\np1,"two\nlines"\n\np2,x\n p1 ,again\n', ["post_id 'p1' on line 2 and again on line 6"]),
], ids=["header_only", "header_and_blank_lines", "no_usable_row", "duplicate_post_id", "duplicate_after_multiline"])
def test_predict_file_content_problems(cli, checkpoint, tmp_path, content, needles):
    posts = tmp_path / "new.csv"
    posts.write_text(content)
    code, err = cli(evaluate.main, ["--checkpoint", checkpoint, "--predict", posts,
                                    "--output", tmp_path / "p.jsonl"])
    assert_one_line_error(code, err, str(posts), *needles)
    assert not (tmp_path / "p.jsonl").exists()


def test_predict_refuses_a_sentence_unit_model(cli, tmp_path):
    """A criteria model of --unit sentence never saw a post's unannotated sentences: it cannot score new posts."""
    import models
    from checkpoint import save_checkpoint
    from config import make_config

    cfg = make_config(task="criteria", unit="sentence", tiny_hidden=16, tiny_layers=1, tiny_heads=1, max_length=64,
                      doc_stride=16)
    tokenizer = models.train_tiny_tokenizer(list(data.CRITERIA.values()) + ["I can't sleep."], 200)
    path = tmp_path / "best"
    save_checkpoint(models.build_model(cfg, tokenizer), tokenizer, cfg, path, {})
    (tmp_path / "new.csv").write_text("post_id,text\np1,I can't sleep at night.\n")
    code, err = cli(evaluate.main, ["--checkpoint", path, "--predict", tmp_path / "new.csv", "--output",
                                    tmp_path / "p.jsonl"])
    assert_one_line_error(code, err, "--predict", "criteria model of --unit sentence", "--unit post")
    assert not (tmp_path / "p.jsonl").exists()


def test_predict_writes_strict_json_lines(cli, checkpoint, tmp_path):
    posts = tmp_path / "new.csv"
    posts.write_text("post_id,text\np1,I can't sleep at night.\np2,\n")
    code, err = cli(evaluate.main, ["--checkpoint", checkpoint, "--predict", posts, "--output", tmp_path / "p.jsonl"])
    assert code == 0, err
    assert "1 rows skipped, not predicted: 0 without post_id, 1 with an empty text" in err
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
            for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == len(data.SYMPTOMS) and {r["post_id"] for r in rows} == {"p1"}


def test_json_safe_writes_nan_as_null():
    import numpy as np

    assert utils.json_safe({"a": float("nan"), "b": [1.0, float("inf")]}) == {"a": None, "b": [1.0, None]}
    assert utils.json_safe({"c": (np.float32(0.5), np.int64(3), np.float64("-inf"), np.array([np.nan, 2.0]))}) \
        == {"c": [0.5, 3, None, [None, 2.0]]}
    assert utils.json_safe({"d": True, "e": "x", "f": None, "g": 2}) == {"d": True, "e": "x", "f": None, "g": 2}
    assert utils.dumps({"auroc": float("nan")}) == '{"auroc": null}'


def test_a_bogus_tracking_uri_is_one_line_before_training(cli, tmp_path):
    assert QUICK[:2] == ["--mlflow", "false"]
    code, err = cli(train.main, ["--output_dir", tmp_path / "out", *QUICK[2:], "--tracking_uri", "foo://bar",
                                 "--max_steps", "1"])
    assert_one_line_error(code, err, "--tracking_uri foo://bar", "cannot open the MLflow store", "--mlflow false")


def test_error_lines_never_print_control_bytes(cli, tmp_path):
    """A UTF-16 or binary file quoted in an error must not put NULs on the terminal."""
    def main(argv):
        raise UserError("bad row 'p\x001\x07' in x.csv")

    code, err = cli(main, [])
    assert_one_line_error(code, err, "bad row 'p\\x001\\x07' in x.csv")
    assert "\x00" not in err


def test_a_bare_run_logs_no_non_default_field():
    from auto_defaults import changed_fields
    from cli import parse_config

    assert changed_fields(parse_config([])[0]) == {}  # `auto` resolved to its own value is not a change
    assert changed_fields(parse_config(["--lr", "1e-3", "--task", "joint"])[0]) == {"task": "joint", "lr": 1e-3}
    assert changed_fields(parse_config(["--model", "minilm"])[0]) == {"model": "minilm"}


def test_a_run_stopped_before_any_saved_state_says_there_is_nothing_to_resume(cli, tmp_path, monkeypatch):
    import models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(models.TaskModel, "loss", interrupted)
    code, err = cli(train.main, [*QUICK, "--output_dir", tmp_path / "run"])
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: interrupted; no training state was saved yet in {tmp_path / 'run'}: nothing to resume, start it again")


PRESETS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if p.name != "demo_corpus.yaml")  # not: phrases


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads(preset):
    from cli import parse_config

    parse_config(["--config", str(ROOT / "configs" / preset)])


def test_the_authors_preset_is_their_recipe():
    """examples/bert.ipynb of eliseobao/redsm5: post level, 512 tokens truncated, batch 8, constant 2e-5, no warmup,
    no clipping, 5 epochs, no early stopping."""
    from cli import parse_config

    cfg, _ = parse_config(["--config", str(ROOT / "configs" / "redsm5_authors.yaml"), "--model", "minilm"])
    assert (cfg.task, cfg.unit, cfg.max_length, cfg.max_windows_per_post, cfg.batch_size) == ("criteria", "post", 512,
                                                                                             1, 8)
    assert (cfg.lr, cfg.head_lr, cfg.scheduler, cfg.warmup_ratio, cfg.max_grad_norm) == (2e-5, None, "constant", 0, 0)
    assert (cfg.epochs, cfg.patience, cfg.weight_decay) == (5, 0, 0.01)
