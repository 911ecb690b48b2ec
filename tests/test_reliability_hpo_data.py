"""Issue 23's adversarial cases in hpo.py, storage.py, data.py, features.py, evaluate.py and report.py: each gives one
`error:` line and exit code 2, a warning and the right file state, or the right numbers.

HPO studies here train nothing: `runner.run` is replaced by a stand-in that returns a validation metric (the real
loop is in test_hpo.py), so a study of a few trials takes a second."""
from __future__ import annotations

import json
import logging
import os
import shutil
import warnings

import optuna
import pytest
import yaml
from conftest import write_corpus
from test_cli import assert_one_line_error

import data
import evaluate
import features
import finished_runs
import hpo
import report
import search_space
import splits as splitting
import storage
import study_runs
import train
from config import Config
from utils import UserError

BASE = ["--task", "criteria", "--demo_posts", "40", "--mlflow", "false", "--threads", "1"]
SPACE = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "batch_size": [8, 16]}


@pytest.fixture
def fake_train(monkeypatch):
    """runner.run replaced: val f1_macro = lr * 10 (so the best trial is known), 3 steps; `behaviour` per trial
    number changes what a trial does (raise, or a callable run before it returns)."""
    behaviour, calls = {}, []

    def run(cfg, on_validation=None, parent_run_id=None, prepare=None):
        number = int(cfg.run_name.split("_")[1])
        calls.append(number)
        what = behaviour.get(number, behaviour.get("all"))
        if isinstance(what, Exception):
            raise what
        if callable(what):
            what(on_validation)
        return {"train": {"steps": 3}, "val": {"f1_macro": cfg.lr * 10}}

    monkeypatch.setattr(hpo.runner, "run", run)
    return behaviour, calls


def space_file(tmp_path, space=SPACE, name="space.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(space))
    return path


def hpo_argv(tmp_path, storage_url, out="study", n=2, space=None, extra=()):
    return [*BASE, "--storage", storage_url, "--space", space or space_file(tmp_path), "--n_trials", n,
            "--output_dir", tmp_path / out, *extra]


def states(tmp_path, out="study"):
    return [t["state"] for t in json.loads((tmp_path / out / "trials_history.json").read_text())["trials"]]


# --------------------------------------------------------------------------- 1. one study per output folder

def test_second_storage_on_a_study_folder_is_refused(cli, tmp_path, fake_train):
    a, b = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    code, err = cli(hpo.main, hpo_argv(tmp_path, a))
    assert code == 0, err
    record = json.loads((tmp_path / "study" / "study.json").read_text())
    assert record == {"storage": f"sqlite:///{tmp_path}/a.db", "study_name": "criteria-coarse"}
    before = (tmp_path / "study" / "trials_history.json").read_bytes()
    code, err = cli(hpo.main, hpo_argv(tmp_path, b))  # only --storage differs: the same outputs/hpo/<study>
    assert_one_line_error(code, err, f"{tmp_path / 'study'}: holds study 'criteria-coarse' of storage {a}",
                          f"not 'criteria-coarse' of {b}", "--output_dir")
    assert (tmp_path / "study" / "trials_history.json").read_bytes() == before  # nothing overwritten
    assert not (tmp_path / "b.db").exists()  # refused before that storage was opened
    code, err = cli(hpo.main, hpo_argv(tmp_path, a, extra=["--study_name", "other"]))  # one storage, two studies
    assert_one_line_error(code, err, "holds study 'criteria-coarse'", "not 'other' of")
    # A second worker of the same study (here: the same file named by a relative path) shares the folder.
    rel = f"sqlite:///{(tmp_path / 'a.db').relative_to(tmp_path.parent)}"
    with pytest.MonkeyPatch.context() as m:
        m.chdir(tmp_path.parent)
        code, err = cli(hpo.main, hpo_argv(tmp_path, rel, n=3))
    assert code == 0, err
    assert states(tmp_path) == ["COMPLETE"] * 3


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not a study record"),
    ('{"storage": "sqlite:///x.db"}', "not a study record"),
    ('{"storage": "journal:/elsewhere/j.log", "study_name": "criteria-coarse"}',
     "holds study 'criteria-coarse' of storage journal:/elsewhere/j.log"),
], ids=["damaged", "incomplete", "another_storage"])
def test_study_record_problems(cli, tmp_path, fake_train, content, needle):
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study.json").write_text(content)
    code, err = cli(hpo.main, hpo_argv(tmp_path, f"sqlite:///{tmp_path}/a.db"))
    assert_one_line_error(code, err, str(tmp_path / "study"), needle)
    assert not (tmp_path / "study" / "trials_history.json").exists()


def test_study_record_hides_the_password_and_resolves_paths():
    assert storage.storage_identity("postgresql://me:secret@db.example/hpo") == "postgresql://me:***@db.example/hpo"
    assert storage.storage_identity("journal:rel/j.log").startswith("journal:/")


def test_claim_never_overwrites_another_workers_record(tmp_path):
    study_dir = tmp_path / "s"
    storage.check_study_dir(study_dir, f"sqlite:///{tmp_path}/a.db", "s", claim=True)
    first = (study_dir / "study.json").read_text()
    with pytest.raises(UserError, match="holds study 's' of storage sqlite:///"):
        storage.check_study_dir(study_dir, f"sqlite:///{tmp_path}/b.db", "s", claim=True)
    assert (study_dir / "study.json").read_text() == first
    assert sorted(p.name for p in study_dir.iterdir()) == ["study.json"]  # no temp file left


# --------------------------------------------------------------------------- 2. --space of an existing study

def test_another_space_on_an_existing_study_is_refused(cli, tmp_path, fake_train):
    url = f"sqlite:///{tmp_path}/o.db"
    code, err = cli(hpo.main, hpo_argv(tmp_path, url, n=1))
    assert code == 0, err
    wider = space_file(tmp_path, {**SPACE, "lr": {"low": 1e-5, "high": 1e-1, "log": True}, "dropout": [0.0, 0.2]},
                       "wider.yaml")
    code, err = cli(hpo.main, hpo_argv(tmp_path, url, n=2, space=wider))
    assert_one_line_error(code, err, f"--space {wider}", "differs from the search space study 'criteria-coarse'",
                          "fields dropout, lr", "give a new --study_name")
    assert states(tmp_path) == ["COMPLETE"]  # nothing ran
    code, err = cli(hpo.main, hpo_argv(tmp_path, url, n=2))  # the same space again: the study goes on
    assert code == 0, err
    assert states(tmp_path) == ["COMPLETE"] * 2
    code, err = cli(hpo.main, hpo_argv(tmp_path, url, n=2, space=wider, out="fine", extra=["--stage", "fine"]))
    assert_one_line_error(code, err, f"--space {wider}", "study 'criteria-coarse', which the fine stage narrows")
    code, err = cli(hpo.main, hpo_argv(tmp_path, url, n=1, out="fine", extra=["--stage", "fine"]))
    assert code == 0, err
    code, err = cli(hpo.main, hpo_argv(tmp_path, url, n=1, space=wider, out="fine", extra=["--stage", "fine"]))
    assert_one_line_error(code, err, "differs from the search space study 'criteria-fine' was created with")


# --------------------------------------------------------------------------- 3. a journal ending in a partial record

@pytest.mark.parametrize("damage, why", [
    (lambda raw: raw + raw.splitlines(True)[-1][:30], "no newline at its end"),  # a worker killed while appending
    (lambda raw: raw + b"\x00" * 40, "no newline at its end"),  # a full disk / a crash: zeros, no newline
    (lambda raw: raw + b'{"op_code": 5, "worker_id\n', "not JSON"),
], ids=["truncated", "nul_bytes", "garbage_line"])
def test_journal_with_a_partial_last_record_is_repaired(cli, tmp_path, fake_train, caplog, damage, why):
    path = tmp_path / "journal.log"
    url = f"journal:{path}"
    code, err = cli(hpo.main, hpo_argv(tmp_path, url, n=2))
    assert code == 0, err
    damaged = damage(path.read_bytes())
    path.write_bytes(damaged)
    kept = damaged[: damaged[:-1].rfind(b"\n") + 1]  # all but the last line
    code, err = cli(hpo.main, hpo_argv(tmp_path, url, n=3))
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "its last record was partial" in line]
    assert len(warnings) == 1 and why in warnings[0] and f"{path}.bak" in warnings[0], err
    assert (tmp_path / "journal.log.bak").read_bytes() == damaged  # the file as it was
    assert path.read_bytes().startswith(kept) and path.read_bytes().endswith(b"\n")
    assert all(json.loads(line) for line in path.read_bytes().splitlines())
    assert states(tmp_path) == ["COMPLETE"] * 3
    code, err = cli(hpo.main, hpo_argv(tmp_path, url, n=3))  # and every later run: nothing to repair
    assert code == 0 and "last record was partial" not in err, err


def test_repair_journal_leaves_a_whole_file_alone(tmp_path):
    path = tmp_path / "j.log"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n')
    assert storage.repair_journal(path) == 0 and not (tmp_path / "j.log.bak").exists()
    path.write_bytes(b'{"a": 1}\n{"b"')  # a long file is read from its end, in blocks
    assert storage.repair_journal(path) == 4 and path.read_bytes() == b'{"a": 1}\n'
    path.write_bytes(b"x" * 200_000)  # one partial record and nothing else
    assert storage.repair_journal(path) == 200_000 and path.read_bytes() == b""
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "j.log.lock").exists()


# --------------------------------------------------------------------------- 4. a paused worker's trial rerun elsewhere

def fail_elsewhere(pruning):
    """What another worker does while this one is paused: marks its trial failed (stale heartbeat), queues a retry."""
    trial = pruning.trial
    study = optuna.load_study(study_name=trial.study.study_name, storage=trial.storage)
    study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
    retry(study, study._storage.get_trial(trial._trial_id))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
@pytest.mark.parametrize("wakes", ["at_validation", "after_training"])
def test_paused_worker_whose_trial_was_rerun_goes_on(cli, tmp_path, fake_train, wakes):
    behaviour, calls = fake_train

    def paused(pruning):
        fail_elsewhere(pruning)
        if wakes == "at_validation":
            pruning(0, {"f1_macro": 0.5}, 3, 6)  # trial.report: UpdateFinishedTrialError

    behaviour[0] = paused
    code, err = cli(hpo.main, hpo_argv(tmp_path, f"sqlite:///{tmp_path}/o.db", n=3))
    assert code == 0, err
    assert "Traceback" not in err and "UpdateFinishedTrialError" not in err, err
    lines = [line for line in err.splitlines() if "another worker marked it failed" in line]
    assert len(lines) == 1 and "trial 0:" in lines[0] and "WARNING" in lines[0], err
    trials = json.loads((tmp_path / "study" / "trials_history.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]  # the study did not end short
    assert trials[1]["retry_of"] == 0 and trials[1]["params"] == trials[0]["params"]
    assert calls == [0, 1, 2]


# --------------------------------------------------------------------------- 5. every trial failed

@pytest.mark.parametrize("behaviour, expect", [
    ({"all": ValueError("CUDA out of memory\nsecond line")}, "first failure (trial 0): ValueError: CUDA out of "
                                                             "memory"),
    ({0: ValueError("boom")}, None),  # one failed, one completed: a best config, exit 0
], ids=["all_failed", "one_failed"])
def test_a_study_without_a_complete_trial_exits_2(cli, tmp_path, fake_train, behaviour, expect):
    fake_train[0].update(behaviour)
    code, err = cli(hpo.main, hpo_argv(tmp_path, f"sqlite:///{tmp_path}/o.db", n=2))
    if expect is None:
        assert code == 0 and (tmp_path / "study" / "best_config.yaml").exists(), err
        return
    assert_one_line_error(code, err, "study 'criteria-coarse': no trial completed, 2 failed", "no best config",
                          expect)
    assert "second line" not in err.splitlines()[-1]
    assert states(tmp_path) == ["FAIL", "FAIL"] and not (tmp_path / "study" / "best_config.yaml").exists()


def test_trial_seeds_stay_in_numpys_range():
    sampler = search_space.TrialSeededTPE(2**32 - 1, n_startup_trials=2)
    study = optuna.create_study(sampler=sampler)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)  # seeds 2**32 - 1, 0, 1: no ValueError
    assert len(study.trials) == 3


# --------------------------------------------------------------------------- 6. a column twice in a CSV header

@pytest.mark.parametrize("file, header, column", [
    ("posts.csv", "post_id,text,text", "text"),
    ("posts.csv", "post_id, post_id ,text", "post_id"),
    ("annotations.csv", "post_id,sentence_id,sentence_text,DSM5_symptom,status,status", "status"),
])
def test_a_column_twice_in_a_header_is_an_error(cli, tmp_path, file, header, column):
    folder = write_corpus(tmp_path / "d", [("p1", "I cannot sleep.")], [("p1", "p1_0", "I cannot sleep.",
                                                                           "SLEEP_ISSUES", "1")])
    rows = (folder / file).read_text().splitlines()[1:]
    (folder / file).write_text("\n".join([header] + [r + ",x" for r in rows]) + "\n")
    code, err = cli(data.main, ["--data_dir", folder])
    assert_one_line_error(code, err, f"{folder / file}: column '{column}' appears 2 times in the header")


def test_a_column_twice_in_a_predict_file_and_empty_names_are_fine(cli, tmp_path):
    posts = tmp_path / "new.csv"
    posts.write_text("post_id,text,text\np1,I cannot sleep.,\n")
    code, err = cli(evaluate.main, ["--checkpoint", tmp_path / "none", "--predict", posts, "--output",
                                    tmp_path / "p.jsonl"])
    assert_one_line_error(code, err, f"{posts}: column 'text' appears 2 times in the header (columns 2, 3)")
    posts.write_text("post_id,text,,\np1,I cannot sleep.,,\n")  # unnamed trailing columns: nothing to overwrite
    assert data.read_csv(posts, data.POST_COLUMNS)[0] == [{"post_id": "p1", "text": "I cannot sleep.", "": ""}]


# --------------------------------------------------------------------------- 7. a splits file that leaves posts out

def test_splits_file_that_leaves_posts_out_is_refused(cli, tmp_path):
    corpus = data.load_corpus(None, demo_posts=96, demo_seed=0)
    ids = sorted(corpus.posts)
    assert len(ids) == 96
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": ids[:14], "val": ids[14:17], "test": ids[17:20]}))
    code, err = cli(train.main, ["--demo_posts", "96", "--mlflow", "false", "--splits_file", splits,
                                 "--output_dir", tmp_path / "run", "--max_steps", "1"])
    assert_one_line_error(code, err, f"{splits}: 76 of the corpus' 96 posts are in no split",
                          "silently go unused", "drop --splits_file")
    assert not (tmp_path / "run" / "metrics.json").exists()
    splits.write_text(json.dumps({"train": ids[:80], "val": ids[80:88], "test": ids[88:]}))
    assert [len(v) for v in splitting.load_splits(splits, corpus).values()] == [80, 8, 8]
    splits.write_text(json.dumps({"train": ids, "val": ["gone1"], "test": ["gone2"]}))
    with pytest.raises(UserError, match="none of the posts of 'val' is in the corpus"):
        splitting.load_splits(splits, corpus)


# --------------------------------------------------------------------------- 8. max_windows_per_post; a huge post

@pytest.mark.parametrize("encoding", ["pair", "post"])
def test_max_windows_per_post_keeps_the_first_windows_and_counts_the_rest(tiny_tokenizer, caplog, encoding):
    text = " ".join(f"On day {i} we walked to the old store and bought {i} green apples." for i in range(60))
    short = "I can’t sleep at night."
    ex = [{"post_id": pid, "criterion": c, "text": t, "label": 0, "spans": [(0, 14)] if pid == "long" else []}
          for pid, t in (("long", text), ("short", short)) for c in ("FATIGUE", "SLEEP_ISSUES")]

    def run(max_windows):
        if encoding == "pair":
            return features.featurize(tiny_tokenizer, ex, 64, 16, True, max_windows)
        return features.featurize_posts(tiny_tokenizer, ex, 64, 16, max_windows)

    key = "example_idx" if encoding == "pair" else "post_idx"
    with caplog.at_level(logging.WARNING, "redsm5"):
        whole = run(10_000)
        assert not [r for r in caplog.records if r.name == "redsm5"]
        cut = run(3)
    per_text = {k: [f for f in whole if f[key] == k] for k in {f[key] for f in whole}}
    post_of = {k: ex[k if encoding == "pair" else 2 * k]["post_id"] for k in per_text}
    assert all(len(fs) > 3 if post_of[k] == "long" else len(fs) == 1 for k, fs in per_text.items())
    expected = [f for k, fs in sorted(per_text.items()) for f in fs[:3]]
    assert [f["idx"] for f in cut] == list(range(len(cut)))  # positions in the list: what evaluate looks up
    assert [(f[key], f["input_ids"].tolist(), f["offsets"].tolist()) for f in sorted(cut, key=lambda f: f["idx"])] \
        == [(f[key], f["input_ids"].tolist(), f["offsets"].tolist()) for f in expected]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "redsm5"]
    texts = "2 (criterion, post) pairs" if encoding == "pair" else None
    dropped = sum(len(fs) - 3 for fs in per_text.values() if len(fs) > 3)
    assert line.startswith("--max_windows_per_post 3: 1 posts cut to their first 3 windows")
    assert f"{dropped} windows dropped" in line and "first: post long" in line
    assert (texts in line) if texts else "pairs" not in line


def test_cut_text_counts_the_windows_of_the_whole_text(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(features, "CHUNK_CHARS", 500)  # a long text counted in many pieces, never whole
    text = " ".join(f"On day {i} we walked to the old store and bought {i} green apples." for i in range(200))
    n_tokens = len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
    (cut, windows), = features.cut_text(tiny_tokenizer, text, [48], 16, 4)
    assert windows == 1 + -(-(n_tokens - 48) // 32)
    assert text.startswith(cut) and len(tiny_tokenizer(cut, add_special_tokens=False)["input_ids"]) == 48 + 3 * 32
    assert features.cut_text(tiny_tokenizer, "Short one.", [48], 16, 4) == [("Short one.", 0)]


def test_cut_text_ignores_the_truncation_a_tokenizer_json_carries(tiny_tokenizer):
    """all-MiniLM-L6-v2's tokenizer.json truncates and pads to 128: counted with it, every piece of a long text was
    128 tokens, and --max_windows_per_post 1 kept several windows' worth of text (and the run stopped)."""
    text = " ".join(f"On day {i} we walked to the old store and bought {i} green apples." for i in range(60))
    backend = tiny_tokenizer.backend_tokenizer
    whole = features.cut_text(tiny_tokenizer, text, [48], 16, 1)
    backend.enable_truncation(8)
    backend.enable_padding(length=8)
    try:
        assert features.cut_text(tiny_tokenizer, text, [48], 16, 1) == whole
        assert backend.truncation["max_length"] == 8 and backend.padding["length"] == 8  # put back
    finally:
        backend.no_truncation()
        backend.no_padding()
    (cut, windows), = whole
    assert len(tiny_tokenizer(cut, add_special_tokens=False)["input_ids"]) == 48 and windows > 1


def test_a_huge_post_aligns_like_a_small_one(tmp_path):
    """Alignment was a char-by-char copy of the post per sentence (a 50 MB post: 47 s, 5.6 GB); now one regex
    search, and the post's sentences split once. The spans must be the ones a small post gives."""
    filler = "We walked to the old store and bought green apples. " * 40_000  # ~2 MB
    tail = "Honestly I have not   slept properly in weeks. The end."
    post = filler + tail
    sentences = [("h1", "Honestly I have not   slept properly in weeks.", "SLEEP_ISSUES"),
                 ("h2", "honestly i HAVE not slept\nproperly in weeks.", "FATIGUE"),
                 ("h3", "I honestly have not been sleeping properly for weeks.", "DEPRESSED_MOOD")]
    folder = write_corpus(tmp_path / "d", [("big", post), ("small", tail)],
                          [(pid, sid, s, sym, "1") for pid in ("big", "small") for sid, s, sym in sentences])
    corpus = data.load_corpus(folder)
    got = {(r["post_id"], r["sentence_id"]): (r["start"], r["end"], r["align"]) for r in corpus.rows}
    shift = len(filler)
    for sid, method in (("h1", "exact"), ("h2", "normalized"), ("h3", "fuzzy")):
        s, e, how = got["small", sid]
        assert how == method and got["big", sid] == (s + shift, e + shift, method)
        assert post[s + shift : e + shift] == "Honestly I have not   slept properly in weeks."


# --------------------------------------------------------------------------- 9, 10. --predict input and output

@pytest.mark.parametrize("content, needles, rows", [
    ("post_id,text\np1,\u200b\u200b\u2060\np2,I can't sleep.\n,hello\np3,\n",
     ["3 rows skipped, not predicted: 1 without post_id, 2 with an empty text or only invisible"], {"p2"}),
    ("post_id,text\np1,\u200b\ufeff \u200c\np2,\u00ad\n", ["no row has both a post_id and a visible text",
                                                           "0 without post_id, 2 with an empty text"], None),
], ids=["some_invisible", "only_invisible"])
def test_predict_skips_invisible_posts_like_training(cli, checkpoint, tmp_path, content, needles, rows):
    posts, out = tmp_path / "new.csv", tmp_path / "p.jsonl"
    posts.write_text(content, encoding="utf-8")
    code, err = cli(evaluate.main, ["--checkpoint", checkpoint, "--predict", posts, "--output", out])
    if rows is None:
        assert_one_line_error(code, err, str(posts), *needles)
        assert not out.exists()
        return
    assert code == 0, err
    warned = [line for line in err.splitlines() if "skipped" in line]
    assert len(warned) == 1 and all(n in warned[0] for n in needles), err
    predicted = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["post_id"] for r in predicted} == rows and len(predicted) == len(data.SYMPTOMS)


def test_predictions_are_written_whole_or_not_at_all(cli, checkpoint, tmp_path, monkeypatch):
    """A write that dies midway (a row that cannot be serialised, where a kill -9 would stop it) leaves the file
    that was there untouched, and no temp file (scripts/kill_predict.py kills real runs)."""
    posts, out = tmp_path / "new.csv", tmp_path / "p.jsonl"
    posts.write_text("post_id,text\np1,I can't sleep.\n")
    out.write_text("the old file\n")
    real = evaluate.predict_posts
    monkeypatch.setattr(evaluate, "predict_posts", lambda *a, **k: real(*a, **k)[:3] + [{"bad": object()}])
    with pytest.raises(TypeError):
        evaluate.main([str(a) for a in ["--checkpoint", checkpoint, "--predict", posts, "--output", out]])
    assert out.read_text() == "the old file\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# --------------------------------------------------------------------------- 11. report.py reads back whole runs only

REPORT = ["--task", "criteria", "--demo_posts", "60", "--tiny_hidden", "16", "--tiny_layers", "1", "--tiny_heads",
          "1", "--tiny_vocab", "300", "--max_length", "64", "--doc_stride", "16", "--batch_size", "16", "--max_steps",
          "2", "--epochs", "1", "--threads", "1", "--demo_shift_posts", "20", "--mlflow", "false", "--cv_folds", "2",
          "--seeds", "1"]


@pytest.fixture(scope="module")
def finished_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "cv"
    report.main(REPORT + ["--output_dir", str(out)])
    return out


def cut_last_line(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.rstrip(b"\n").rfind(b"\n") + 20])  # the last row torn 20 bytes in


def drop_rows(path, n=3):
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-n]))


@pytest.mark.parametrize("damage, needle", [
    (lambda d: cut_last_line(d / "predictions.jsonl"), "predictions.jsonl: line"),
    (lambda d: drop_rows(d / "predictions.jsonl"), "predictions.jsonl has"),
    (lambda d: drop_rows(d / "val_predictions.jsonl"), "val_predictions.jsonl has"),
    (lambda d: (d / "shift_predictions.jsonl").unlink(), "shift_predictions.jsonl is missing"),
    (lambda d: (d / "metrics.json").write_text('{"val": {"n": 3'), "metrics.json: not valid JSON"),
    (lambda d: (d / "history.json").write_text("[1, 2"), "history.json: not valid JSON"),
    (lambda d: (d / "predictions.jsonl").write_text('{"label": 1}\n' * json.loads(
        (d / "metrics.json").read_text())["test"]["n"]), "lacks one of label, prob"),
], ids=["torn_last_row", "rows_missing", "val_rows_missing", "shift_missing", "metrics_torn", "history_torn",
        "rows_without_prob"])
def test_incomplete_run_is_found(finished_report, tmp_path, damage, needle):
    run_dir = shutil.copytree(finished_report / "fold1-seed1", tmp_path / "run")
    assert finished_runs.incomplete_run(run_dir, classify=True) is None
    damage(run_dir)
    why = finished_runs.incomplete_run(run_dir, classify=True)
    assert why is not None and needle in why, why


def test_resume_retrains_a_run_whose_predictions_are_torn(finished_report, cli, monkeypatch):
    out = finished_report
    first = json.loads((out / "summary.json").read_text())
    n_rows = len((out / "fold1-seed1" / "predictions.jsonl").read_text().splitlines())
    cut_last_line(out / "fold1-seed1" / "predictions.jsonl")
    calls, real_train = [], report.runner.run

    def train_and_record(cfg, **kwargs):
        calls.append((cfg.output_dir, cfg.resume))
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(report.runner, "run", train_and_record)
    code, err = cli(report.main, REPORT + ["--output_dir", out, "--resume", "true"])
    assert code == 0, err
    assert [c[0] for c in calls] == [str(out / "fold1-seed1")]  # fold 0 read back, fold 1 trained again
    warned = [line for line in err.splitlines() if "its outputs are incomplete" in line]
    assert len(warned) == 1 and str(out / "fold1-seed1") in warned[0] and "line" in warned[0], err
    assert len((out / "fold1-seed1" / "predictions.jsonl").read_text().splitlines()) == n_rows
    again = json.loads((out / "summary.json").read_text())
    assert again["summary"]["model"]["f1_macro"] == first["summary"]["model"]["f1_macro"]


def test_metrics_output_is_replaced_whole(finished_report, tmp_path, monkeypatch):
    """evaluate.py --output (metrics): written beside, then renamed; a failing last step leaves the old file."""
    out = tmp_path / "m.json"
    out.write_text("the old file\n")

    def replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        evaluate.main(["--checkpoint", str(finished_report / "fold0-seed1" / "checkpoints" / "best"), "--output",
                       str(out)])
    assert out.read_text() == "the old file\n"


@pytest.mark.parametrize("argv, needle", [
    (["--n_bootstrap", "1000000000"], "--n_bootstrap: must be between 100 and 1,000,000, got 1000000000"),
    (["--seeds", "1", "-3"], "--seeds: each must be between 0 and 4294967295, got -3"),
    (["--seeds", "4294967296"], "--seeds: each must be between 0 and 4294967295"),
])
def test_report_numbers_out_of_range(cli, tmp_path, argv, needle):
    code, err = cli(report.main, argv + ["--mlflow", "false", "--output_dir", tmp_path])
    assert_one_line_error(code, err, needle)


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"a": 1}\n{"a": 2\n')
    with pytest.raises(UserError, match=r"p.jsonl: line 2 is not JSON"):
        finished_runs.read_jsonl(path)
    path.write_text('{"a": 1}\n[1]\n')
    with pytest.raises(UserError, match=r"p.jsonl: line 2 is not a JSON object"):
        finished_runs.read_jsonl(path)


@pytest.mark.parametrize("argv, needle", [
    (["--make_demo", "DIR", "--n_posts", "-5"], "--n_posts: must be >= 1, got -5"),
    (["--make_demo", "DIR", "--n_posts", "0"], "--n_posts: must be >= 1, got 0"),
    (["--make_demo", "DIR", "--shift_posts", "-1"], "--shift_posts: must be >= 0 (0 = none), got -1"),
    (["--data_dir", "DIR", "--fuzzy_threshold", "nan"], "--fuzzy_threshold: must be in [0, 1), got nan"),
    (["--data_dir", "DIR", "--fuzzy_threshold", "5"], "--fuzzy_threshold: must be in [0, 1), got 5.0"),
])
def test_data_cli_numbers_out_of_range(cli, tmp_path, argv, needle):
    code, err = cli(data.main, [str(tmp_path / "demo") if a == "DIR" else a for a in argv])
    assert_one_line_error(code, err, needle, only_line=True)
    assert not (tmp_path / "demo").exists()


# --------------------------------------------------------------------------- issue 31: study names, drivers, election

@pytest.mark.parametrize("name", ["../../escape", "a/b", "a\\b", "..", ".", " ", "bad\nname"])
def test_a_study_name_that_is_not_one_folder_is_refused(cli, tmp_path, fake_train, name):
    """--study_name names outputs/hpo/<study>: '../../escape' wrote two folders above it."""
    with pytest.MonkeyPatch.context() as m:
        m.chdir(tmp_path)
        code, err = cli(hpo.main, [*BASE, "--storage", f"sqlite:///{tmp_path}/o.db", "--space", space_file(tmp_path),
                                   "--n_trials", "1", "--study_name", name])
    assert_one_line_error(code, err, f"--study_name {name!r}: not a plain name", "no path separator")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]  # no storage, no folder: refused first
    assert fake_train[1] == []


@pytest.mark.parametrize("module, hint", [("psycopg", "the database driver psycopg is not installed: pip install "
                                                      "-e '.[postgres]'"),
                                          ("MySQLdb", "the database driver MySQLdb is not installed: pip install "
                                                      "mysqlclient"),
                                          (None, "its database driver is not installed: install the driver of the "
                                                 "URL's database")])
def test_a_missing_database_driver_is_named(monkeypatch, module, hint):
    """Optuna re-raises SQLAlchemy's ModuleNotFoundError as a bare ImportError: the message read "the driver its
    database driver is not installed"."""
    def rdb_storage(*args, **kwargs):  # what optuna.storages.RDBStorage raises without the driver
        try:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)
        except ModuleNotFoundError as e:
            raise ImportError("Failed to import DB access module for the specified storage URL.") from e

    monkeypatch.setattr(optuna.storages, "RDBStorage", rdb_storage)
    with pytest.raises(UserError) as e:
        storage.make_storage("postgresql://me:secret@db/optuna")
    assert f"--storage postgresql://me:***@db/optuna: cannot open it ({hint};" in str(e.value)
    assert "driver its" not in str(e.value) and "secret" not in str(e.value)


def test_the_losing_parent_run_of_an_election_ends_killed_before_it_is_deleted(tmp_path, monkeypatch):
    """Two workers that start a study together each create a parent run; the later one's run is deleted. It was
    deleted RUNNING: restored (mlflow gc, the UI's trash), it showed a study running for ever."""
    from argparse import Namespace

    from mlflow.entities import ViewType

    from tracking import Tracker

    monkeypatch.setattr(study_runs.time, "sleep", lambda s: None)
    cfg = Config(mlflow=True, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", output_dir=str(tmp_path / "s"))
    args = Namespace(storage="sqlite:///o.db", stage="coarse", pruner="median", n_trials=2)
    study = optuna.create_study(study_name="s")
    study.set_user_attr("search_space", {})
    first = Tracker(cfg, True)  # the other worker's parent run, created a moment earlier
    first.client.set_tag(first.run_id, study_runs.PARENT_TAG, "sqlite:///o.db#s")
    tracker = study_runs.open_parent_run(args, cfg, study, tmp_path / "s", "f1_macro")
    assert tracker.run_id == first.run_id == study.user_attrs["mlflow_parent_run_id"]
    runs = tracker.client.search_runs([tracker.client.get_experiment_by_name("redsm5").experiment_id],
                                      run_view_type=ViewType.ALL)
    assert sorted((r.info.run_id == first.run_id, r.info.status, r.info.lifecycle_stage) for r in runs) == \
        [(False, "KILLED", "deleted"), (True, "RUNNING", "active")]


@pytest.mark.parametrize("change, needles", [
    (["--early_stopping_metric", "auroc"], ["metric 'f1_macro' -> 'auroc'"]),
    (["--data_dir", "CORPUS"], ["the data's content (sha256 "]),
    (["--demo_posts", "50"], ["demo_posts 40 -> 50", "the data's content"]),
], ids=["metric", "data_dir", "demo_posts"])
def test_a_study_continued_with_another_objective_or_corpus_is_refused(cli, tmp_path, fake_train, change, needles):
    """Rerun with --early_stopping_metric auroc, a study warned once, added auroc trials to its f1_macro ones and
    reported "best trial 0: val auroc 0.665", 0.665 being trial 0's f1_macro."""
    url = f"sqlite:///{tmp_path}/o.db"
    code, err = cli(hpo.main, hpo_argv(tmp_path, url, n=1))
    assert code == 0, err
    corpus = write_corpus(tmp_path / "corpus", [(f"p{i}", f"I cannot sleep, night {i}.") for i in range(40)],
                          [(f"p{i}", f"p{i}_0", f"I cannot sleep, night {i}.", "SLEEP_ISSUES", "1") for i in range(40)])
    code, err = cli(hpo.main, hpo_argv(tmp_path, url, n=2, extra=[str(corpus) if a == "CORPUS" else a for a in change]))
    assert_one_line_error(code, err, "study 'criteria-coarse' was created with another base config", *needles,
                          "another --study_name (e.g. criteria-coarse-2")
    assert states(tmp_path) == ["COMPLETE"] and fake_train[1] == [0]  # nothing ran
    code, err = cli(hpo.main, hpo_argv(tmp_path, url, n=2, extra=["--early_stopping_metric", "f1_macro"]))
    assert code == 0, err  # the study's own metric, named: it goes on
    assert states(tmp_path) == ["COMPLETE"] * 2
    study = optuna.load_study(study_name="criteria-coarse", storage=url)
    study.set_user_attr("fingerprint", None)  # a study made before fingerprints: its base config and metric decide
    code, err = cli(hpo.main, hpo_argv(tmp_path, url, n=3, extra=["--early_stopping_metric", "auroc"]))
    assert_one_line_error(code, err, "metric 'f1_macro' -> 'auroc'")


# ---------------------------------------------------------------- issue 31: --predict streams; nothing to read

LONG = " ".join(f"On day {i} I could not sleep and felt empty all day." for i in range(30))  # several windows


def test_predict_in_chunks_writes_the_bytes_of_one_chunk(cli, checkpoint, tmp_path, monkeypatch):
    """--predict read the whole file and scored it at once (2,000 posts: 4.8 GB); it streams now, a chunk of posts at
    a time. The file it writes must not depend on the chunk size: batches of one shape give every post its own bits
    (with dynamic batches a probability moved in its 8th digit with the posts beside it)."""
    posts = tmp_path / "new.csv"
    texts = ["I can't sleep.", LONG, "\u200e\u200f", "We went hiking, it was fun.", LONG[:300], "I feel worthless.",
             "Tired. " * 40, "ok"]
    posts.write_text("post_id,text\n" + "".join(f'p{i},"{t}"\n' for i, t in enumerate(texts)), encoding="utf-8")
    real, chunks = evaluate.predict_posts, []
    monkeypatch.setattr(evaluate, "predict_posts", lambda *a, **k: chunks.append(list(a[4])) or real(*a, **k))
    written = {}
    for size in (3, 1000):
        monkeypatch.setattr(evaluate, "PREDICT_CHUNK_POSTS", size)
        out = tmp_path / f"p{size}.jsonl"
        code, err = cli(evaluate.main, ["--checkpoint", checkpoint, "--predict", posts, "--output", out])
        assert code == 0, err
        written[size] = out.read_bytes()
    assert chunks == [["p0", "p1", "p3"], ["p4", "p5", "p6"], ["p7"], ["p0", "p1", "p3", "p4", "p5", "p6", "p7"]]
    assert written[3] == written[1000]
    rows = [json.loads(line) for line in written[3].decode().splitlines()]
    assert [(r["post_id"], r["criterion"]) for r in rows] == [(f"p{i}", c) for i in (0, 1, 3, 4, 5, 6, 7)
                                                              for c in data.SYMPTOMS]


@pytest.mark.parametrize("nothing", ["\u200e\u200f\u202e", "\u2066\u2069 \u061c", "\u0301\u0301", "\x01\x02",
                                     "\ufffd\ufffd", "\ue000"], ids=["bidi", "isolates", "lone_accents", "controls",
                                                                    "replacement", "private_use"])
def test_a_post_with_nothing_to_read_is_dropped_by_the_loader_and_skipped_by_predict(cli, checkpoint, tmp_path,
                                                                                     nothing):
    """A post of bidi marks gave no token, and a criteria model scored it DEPRESSED_MOOD 0.870 (an evidence model
    refused the whole file): such a post is counted and never scored, by the loader as by --predict."""
    folder = write_corpus(tmp_path / "d", [("p1", nothing), ("p2", "I cannot sleep. I feel empty.")],
                          [("p1", "p1_0", nothing, "SLEEP_ISSUES", "1"), ("p2", "p2_0", "I cannot sleep.",
                                                                          "SLEEP_ISSUES", "1"),
                           ("p2", "p2_1", nothing, "DEPRESSED_MOOD", "1")])
    corpus = data.load_corpus(folder)
    assert list(corpus.posts) == ["p2"] and [r["sentence_id"] for r in corpus.rows] == ["p2_0"]
    assert corpus.report["dropped"] == {"post: empty text": 1, "annotation: post missing or empty": 1,
                                        "annotation: empty sentence_text": 1}
    out = tmp_path / "p.jsonl"
    code, err = cli(evaluate.main, ["--checkpoint", checkpoint, "--predict", folder / "posts.csv", "--output", out])
    assert code == 0, err
    assert "1 rows skipped, not predicted: 0 without post_id, 1 with an empty text or only invisible" in err
    assert {json.loads(line)["post_id"] for line in out.read_text().splitlines()} == {"p2"}


def test_a_post_the_tokenizer_reads_as_nothing_is_skipped_not_scored(checkpoint, caplog):
    """Past data.visible, a tokenizer may still drop all of a text (here one that drops '~'): it was a UserError
    that refused the whole --predict file (and a traceback under `mlflow models serve`); the post is now skipped and
    counted, and a file of such posts alone is an error."""
    from collections import Counter

    from tokenizers import normalizers

    from checkpoint import load_checkpoint
    from utils import make_accelerator

    model, tokenizer, cfg, extra = load_checkpoint(checkpoint)
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Replace("~", ""), backend.normalizer])
    assert features.read_tokens(tokenizer, ["~ ~~", "I can't sleep.", "é"]) == [False, True, True]
    skipped = Counter()
    rows = evaluate.predict_posts(model, tokenizer, cfg, extra, {"p1": "~ ~~", "p2": "I can't sleep."},
                                  make_accelerator(), skipped)
    assert [r["post_id"] for r in rows] == ["p2"] * len(data.SYMPTOMS) and skipped == {"no token": 1}
    with caplog.at_level(logging.WARNING, "redsm5"):
        evaluate.report_tokenless("new.csv", 1, len(rows))
    assert "new.csv: 1 posts skipped, not predicted: the model's tokenizer reads no token in them" in caplog.text
    with pytest.raises(UserError, match="new.csv: the model's tokenizer reads no token in any of its posts"):
        evaluate.report_tokenless("new.csv", 1, 0)


# --------------------------------------------------------------------------- issue 31: test_shift, conflicting rows

def test_a_shift_corpus_that_is_the_training_corpus_is_refused_and_shared_posts_are_counted(cli, tmp_path, caplog):
    """--test_shift_dir equal to --data_dir was scored as "phrasing no training post uses"."""
    from config import make_config

    posts = [(f"p{i}", f"Night {i}: I cannot sleep at all.") for i in range(12)]
    annotations = [(pid, f"{pid}_0", text, "SLEEP_ISSUES", "1") for pid, text in posts]
    folder = write_corpus(tmp_path / "d", posts, annotations)
    shift = write_corpus(tmp_path / "s", posts[:3] + [("new1", posts[3][1]), ("new2", "I sleep well now.")],
                         annotations[:1])
    cfg = make_config(data_dir=str(folder), test_shift_dir=str(shift))
    with caplog.at_level(logging.WARNING, "redsm5"):
        data.load_shift_corpus(cfg, data.load_corpus(folder))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "redsm5"]
    assert f"test_shift ({shift}): 3 of its 5 posts have the post_id of a post of the training corpus, 4 its text" \
        in line
    code, err = cli(train.main, ["--data_dir", folder, "--test_shift_dir", f"{tmp_path}/./d/", "--mlflow", "false",
                                 "--output_dir", tmp_path / "run"])
    assert_one_line_error(code, err, f"--test_shift_dir {tmp_path}/./d/: is the --data_dir folder",
                          "phrasing no training post uses")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_shift_corpus_without_examples_is_not_scored(tmp_path, caplog):
    """A --test_shift_dir of posts without annotations gave criteria no example, and featurizing none was an
    IndexError deep in the tokenizer (a traceback)."""
    from config import make_config

    posts = [(f"p{i}", f"Night {i}: I cannot sleep at all.") for i in range(12)]
    folder = write_corpus(tmp_path / "d", posts, [(pid, f"{pid}_0", t, "SLEEP_ISSUES", "1") for pid, t in posts])
    shift = write_corpus(tmp_path / "s", [("s1", "I went hiking today.")], [])
    with caplog.at_level(logging.WARNING, "redsm5"):
        prepared = train.prepare_data(make_config(data_dir=str(folder), test_shift_dir=str(shift), tiny_vocab=300))
    assert sorted(prepared.features) == ["test", "train", "val"]
    assert "test_shift: no examples for task 'criteria' (no annotation kept?): not scored" in caplog.text


def test_conflicting_annotations_of_one_sentence_are_counted_and_keep_status_1(tmp_path):
    """The same sentence under two sentence_ids (or one and none) with opposite statuses was kept as both, without a
    word: the model read one input with both labels."""
    posts = [("p1", "I cannot sleep. I feel sad. I eat well.")]
    annotations = [("p1", "p1_0", "I cannot sleep.", "SLEEP_ISSUES", "1"),
                   ("p1", "p1_7", "I  cannot sleep.", "SLEEP_ISSUES", "0"),  # another id, the same sentence
                   ("p1", "", "I feel sad.", "DEPRESSED_MOOD", "0"),  # no id: its text
                   ("p1", "p1_1", "I feel sad.", "DEPRESSED_MOOD", "1"),
                   ("p1", "p1_1", "I feel sad.", "DEPRESSED_MOOD", "0"),  # same id: a dropped duplicate, as before
                   ("p1", "p1_2", "I eat well.", "APPETITE_CHANGE", "0"),
                   ("p1", "p1_9", "I eat well.", "APPETITE_CHANGE", "0")]  # agreeing: both kept, no conflict
    corpus = data.load_corpus(write_corpus(tmp_path / "d", posts, annotations))
    assert corpus.report["conflicting_duplicates_resolved_to_1"] == 3
    assert corpus.report["dropped"] == {"annotation: duplicate (post, sentence, symptom)": 1}
    assert sorted((r["sentence_id"], r["symptom"], r["status"]) for r in corpus.rows) == [
        ("", "DEPRESSED_MOOD", 1), ("p1_0", "SLEEP_ISSUES", 1), ("p1_1", "DEPRESSED_MOOD", 1),
        ("p1_2", "APPETITE_CHANGE", 0), ("p1_7", "SLEEP_ISSUES", 1), ("p1_9", "APPETITE_CHANGE", 0)]
    assert "conflicting duplicates resolved to 1: 3" in data.format_report(corpus.report)
