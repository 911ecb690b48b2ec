"""hpo.py (with search_space.py and storage.py): search spaces, the fine-stage narrowing, failed and dead trials,
resume, and the best-config round trip."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml

import hpo
import search_space
import storage
from cli import parse_config
from config import Config, load_yaml_config
from utils import UserError

ROOT = Path(__file__).resolve().parents[1]
# A study small enough for a test: ~130 training sentences, 4 optimizer steps a trial.
TINY = ["--task", "criteria", "--demo_posts", "80", "--tiny_hidden", "32", "--tiny_layers", "1", "--tiny_vocab", "600",
        "--max_steps", "4", "--epochs", "1", "--eval_batch_size", "64", "--threads", "1", "--mlflow", "false",
        "--demo_shift_posts", "10"]
SPACE = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "dropout": {"low": 0.0, "high": 0.3},
         "batch_size": [8, 16], "scheduler": ["linear", "cosine", "constant"]}


def write_space(path: Path, space: dict) -> Path:
    path.write_text(yaml.safe_dump(space))
    return path


def history(study_dir: Path) -> dict:
    return json.loads((study_dir / "trials_history.json").read_text())


# --------------------------------------------------------------------------- search spaces

def test_shipped_spaces_load_with_config_types():
    spaces = {task: search_space.load_space(ROOT / "configs" / "hpo" / f"{task}.yaml")
              for task in ("criteria", "evidence", "joint")}
    assert spaces["criteria"]["lr"] == {"low": 1e-4, "high": 5e-3, "log": True}
    assert spaces["criteria"]["batch_size"] == {"choices": [16, 32, 64]}
    assert spaces["criteria"]["class_weights"] == {"choices": [False, True]}
    assert spaces["joint"]["loss_weight_evidence"] == {"low": 0.25, "high": 4.0, "log": True}
    for space in spaces.values():
        assert set(space) <= set(Config.__dataclass_fields__)
        for name in ("lr", "weight_decay", "warmup_ratio", "dropout"):
            assert isinstance(space[name]["low"], float) and isinstance(space[name]["high"], float)
        assert all(isinstance(c, int) for c in space["max_length"]["choices"] + space["batch_size"]["choices"])
        assert set(space["scheduler"]["choices"]) == {"linear", "cosine", "constant"}
        for length in space["max_length"]["choices"]:  # every choice must make a valid config with the defaults
            assert Config.doc_stride < length // 2


def test_space_values_are_parsed_like_config_values(tmp_path):
    path = write_space(tmp_path / "s.yaml", {"lr": {"low": "1e-4", "high": "1e-3", "log": True},
                                             "tiny_layers": {"low": 1, "high": 4.0}})
    space = search_space.load_space(path)
    assert space == {"lr": {"low": 1e-4, "high": 1e-3, "log": True}, "tiny_layers": {"low": 1, "high": 4, "log": False}}
    assert isinstance(space["tiny_layers"]["high"], int)


@pytest.mark.parametrize("entry, message", [
    ({"learning_rate": [1e-3]}, "unknown config key 'learning_rate'"),
    ({"seed": [1, 2]}, "'seed' cannot be searched"),
    ({"lr": {"low": 1e-2, "high": 1e-3}}, "must be below high"),
    ({"lr": {"low": 0.0, "high": 1e-3, "log": True}}, "log range needs low > 0"),
    ({"scheduler": {"low": 0, "high": 1}}, "invalid value 0 for 'scheduler'"),
    ({"class_weights": {"low": False, "high": True}}, "not numeric"),
    ({"batch_size": [16, "big"]}, "invalid value 'big' for 'batch_size'"),
    ({"lr": {"low": 1e-4}}, "expected a list of choices or {low, high[, log, times_auto]}"),
    ({"dropout": []}, "no choices"),
    # each bound and choice in the field's own range (config.check_range): an infinite bound failed every trial
    ({"lr": {"low": 1e-4, "high": float("inf"), "log": True}}, "lr: high: must be a finite number, got inf"),
    ({"weight_decay": {"low": -0.1, "high": 0.1}}, "weight_decay: low: must be >= 0, got -0.1"),
    ({"adam_beta2": [0.99, 1.0]}, "adam_beta2: choice 1.0: must be in [0, 1), got 1.0"),
])
def test_bad_space_is_a_user_error_naming_file_and_field(tmp_path, entry, message):
    path = write_space(tmp_path / "bad.yaml", entry)
    with pytest.raises(UserError) as e:
        search_space.load_space(path)
    assert message in str(e.value) and str(path) in str(e.value)


# --------------------------------------------------------------------------- fine stage

def test_narrow_space_hand_computed():
    coarse = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "dropout": {"low": 0.0, "high": 0.3, "log": False},
              "epochs": {"low": 1, "high": 11, "log": False}, "warmup_ratio": {"low": 0.0, "high": 0.2, "log": False},
              "batch_size": {"choices": [16, 32, 64]}, "scheduler": {"choices": ["linear", "cosine", "constant"]},
              "weight_decay": {"low": 0.0, "high": 0.1, "log": False}}
    best = [{"lr": 1e-3, "dropout": 0.10, "epochs": 4, "warmup_ratio": 0.005, "batch_size": 32, "scheduler": "cosine"},
            {"lr": 2e-3, "dropout": 0.12, "epochs": 5, "warmup_ratio": 0.010, "batch_size": 32, "scheduler": "linear"}]
    fine = search_space.narrow_space(coarse, best, margin=0.1)
    # lr: log width ln(100), 10% of it = a factor 10**0.2 on each side of [1e-3, 2e-3]
    assert fine["lr"]["low"] == pytest.approx(1e-3 / 10**0.2) and fine["lr"]["high"] == pytest.approx(2e-3 * 10**0.2)
    assert fine["lr"]["log"] is True
    assert fine["dropout"]["low"] == pytest.approx(0.07) and fine["dropout"]["high"] == pytest.approx(0.15)
    assert fine["epochs"] == {"low": 3, "high": 6, "log": False}  # 4 - 1.0 and 5 + 1.0
    assert fine["warmup_ratio"]["low"] == 0.0 and fine["warmup_ratio"]["high"] == pytest.approx(0.03)  # clipped, exact
    assert fine["batch_size"] == {"choices": [32]}
    assert fine["scheduler"] == {"choices": ["linear", "cosine"]}  # coarse order kept
    assert fine["weight_decay"] == coarse["weight_decay"]  # no best trial sampled it: unchanged
    for name in ("lr", "dropout", "warmup_ratio"):  # every best value is still inside its fine range
        assert all(fine[name]["low"] <= b[name] <= fine[name]["high"] for b in best)


def test_sampled_params_stay_in_space_with_field_types():
    import optuna

    space = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "tiny_layers": {"low": 1, "high": 3, "log": False},
             "batch_size": {"choices": [8, 16]}}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        params = search_space.sample_params(study.ask(), space)
        assert 1e-4 <= params["lr"] <= 1e-2 and isinstance(params["lr"], float)
        assert params["tiny_layers"] in (1, 2, 3) and params["batch_size"] in (8, 16)
    fixed = {"lr": 3e-3, "tiny_layers": 2, "batch_size": 16}
    assert search_space.sample_params(optuna.trial.FixedTrial(fixed), space) == fixed


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_trial_seeded_sampler_same_draws_for_one_worker_or_two(tmp_path):
    import optuna

    space = {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "batch_size": {"choices": [8, 16, 32, 64]}}

    def draw(study):
        trial = study.ask()
        return trial.number, search_space.sample_params(trial, space)

    one = optuna.create_study(sampler=search_space.TrialSeededTPE(42, n_startup_trials=10))
    alone = dict(draw(one) for _ in range(6))
    shared = storage.make_storage(f"sqlite:///{tmp_path}/o.db")
    workers = [optuna.create_study(storage=shared, study_name="s", load_if_exists=True,
                                   sampler=search_space.TrialSeededTPE(42, n_startup_trials=10)) for _ in range(2)]
    together = dict(draw(workers[i % 2]) for i in range(6))  # two workers asking in turn, nothing finished yet
    assert together == alone
    assert len({p["lr"] for p in alone.values()}) == 6  # a worker-wide seed would repeat the first draws


# --------------------------------------------------------------------------- studies (real trials, tiny model)

@pytest.fixture(scope="module")
def coarse_study(tmp_path_factory):
    """A 3-trial coarse study, shared by the tests below: (folder, storage url, space file)."""
    tmp = tmp_path_factory.mktemp("hpo")
    storage, space = f"sqlite:///{tmp}/optuna.db", write_space(tmp / "space.yaml", SPACE)
    summary = hpo.main(TINY + ["--n_trials", "3", "--storage", storage, "--space", str(space),
                               "--output_dir", str(tmp / "coarse")])
    assert summary["counts"]["COMPLETE"] == 3
    return tmp, storage, space


def test_best_config_reproduces_best_trial_in_fresh_process(coarse_study):
    tmp, _, _ = coarse_study
    summary = history(tmp / "coarse")
    best = next(t for t in summary["trials"] if t["number"] == summary["best_trial"])
    assert summary["best_value"] == max(t["value"] for t in summary["trials"]) == best["value"]
    config_file = tmp / "coarse" / "best_config.yaml"
    config = load_yaml_config(config_file)
    trial_config = load_yaml_config(tmp / "coarse" / f"trial_{best['number']}" / "config.yaml")
    # config.yaml records what ran: mixed_precision auto as the precision it resolved to on this machine
    assert config["mixed_precision"] == "auto" and trial_config["mixed_precision"] in ("no", "fp16", "bf16")
    assert {k: v for k, v in config.items() if k not in ("output_dir", "run_name", "mixed_precision")} == \
           {k: v for k, v in trial_config.items() if k not in ("output_dir", "run_name", "mixed_precision")}
    assert all(config[k] == v for k, v in best["params"].items())
    cfg, _ = parse_config(["--config", str(config_file)])  # accepted as is
    assert cfg.output_dir == str(tmp / "coarse" / "best")
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config_file)], check=True, cwd=tmp,
                   capture_output=True)
    val = json.loads((tmp / "coarse" / "best" / "metrics.json").read_text())["val"]
    assert abs(val["f1_macro"] - best["value"]) < 1e-6


def test_trial_records_and_cleanup(coarse_study):
    tmp, _, _ = coarse_study
    summary = history(tmp / "coarse")
    assert [t["number"] for t in summary["trials"]] == [0, 1, 2]
    for t in summary["trials"]:
        assert t["state"] == "COMPLETE" and t["train_steps"] == 4 and set(t["params"]) == set(SPACE)
        assert list(t["intermediate"]) == ["0"] and t["intermediate"]["0"] == pytest.approx(t["value"])
        trial_dir = tmp / "coarse" / f"trial_{t['number']}"
        assert (trial_dir / "checkpoints" / "best" / "heads.safetensors").exists()
        assert not (trial_dir / "checkpoints" / "last").exists()  # trials are never resumed
    assert summary["train_steps"] == 12
    _, storage, _ = coarse_study
    study = optuna.load_study(study_name="criteria-coarse", storage=storage)
    assert study.metric_names == ["val f1_macro"]  # optuna-dashboard's label of the objective


def test_fine_stage_narrows_around_coarse_best_and_starts_there(coarse_study):
    tmp, storage, _ = coarse_study
    hpo.main(TINY + ["--n_trials", "1", "--stage", "fine", "--top_k", "2", "--storage", storage,
                     "--coarse_study", "criteria-coarse", "--output_dir", str(tmp / "fine")])
    coarse, fine = history(tmp / "coarse"), history(tmp / "fine")
    top2 = sorted(coarse["trials"], key=lambda t: -t["value"])[:2]
    assert fine["search_space"] == search_space.narrow_space(coarse["search_space"], [t["params"] for t in top2])
    used = {t["params"]["batch_size"] for t in top2}
    assert fine["search_space"]["batch_size"]["choices"] == [c for c in (8, 16) if c in used]
    lr = fine["search_space"]["lr"]
    assert lr["low"] >= 1e-4 and lr["high"] <= 1e-2 and lr["high"] / lr["low"] < 100
    first = fine["trials"][0]
    assert first["params"] == top2[0]["params"]  # the coarse optimum is the fine study's first trial
    assert first["value"] == pytest.approx(top2[0]["value"], abs=1e-6)  # same config, same seed, same score


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_resume_adds_only_missing_trials_and_reruns_dead_ones(coarse_study, monkeypatch):
    import optuna

    tmp, _, space = coarse_study
    url = f"sqlite:///{tmp}/resume.db"
    args = TINY + ["--storage", url, "--space", str(space), "--output_dir", str(tmp / "resume")]
    hpo.main(args + ["--n_trials", "1"])
    # A worker that died mid-trial: a RUNNING trial whose last heartbeat is older than the grace period.
    monkeypatch.setattr(storage, "GRACE_S", 1)
    study = optuna.load_study(study_name="criteria-coarse", storage=storage.make_storage(url))
    dead = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(3.2)  # sqlite stores heartbeats in whole seconds: well past the 1 s grace
    summary = hpo.main(args + ["--n_trials", "3"])
    trials = summary["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2]  # no number twice; the dead trial counts toward 3
    assert trials[1]["state"] == "FAIL" and "heartbeat" in trials[1]["fail_reason"]
    assert trials[2]["state"] == "COMPLETE" and trials[2]["retry_of"] == 1  # rerun with the dead trial's lr
    assert trials[2]["params"]["lr"] == trials[1]["params"]["lr"]
    assert summary["counts"]["RUNNING"] == 0
    again = hpo.main(args + ["--n_trials", "3"])  # a finished study runs nothing more
    assert [t["number"] for t in again["trials"]] == [0, 1, 2]


def test_pruned_trial_stops_at_its_first_validation_and_counts_its_steps(tmp_path, monkeypatch):
    import optuna

    import train

    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    monkeypatch.setattr(hpo, "make_pruner", lambda name, cfg: AlwaysPrune())
    space = write_space(tmp_path / "s.yaml", {"batch_size": [32]})

    def argv(epochs: int, name: str) -> list:
        return TINY + ["--max_steps", "-1", "--epochs", str(epochs), "--n_trials", "1", "--space", str(space),
                       "--storage", f"sqlite:///{tmp_path}/{name}.db", "--output_dir", str(tmp_path / name)]

    (trial,) = hpo.main(argv(3, "three"))["trials"]
    cfg, _ = parse_config(argv(3, "three"), prog="hpo.py", extra=hpo.add_hpo_flags)
    n_train = len(train.prepare_data(cfg)[2]["train"][1])
    assert trial["state"] == "PRUNED" and list(trial["intermediate"]) == ["0"]
    assert trial["train_steps"] == math.ceil(n_train / 32)  # one epoch of three
    assert not (tmp_path / "three" / "trial_0" / "checkpoints").exists()
    # The last validation is never pruned: the training it would save is already spent.
    (trial,) = hpo.main(argv(1, "one"))["trials"]
    assert trial["state"] == "COMPLETE" and trial["train_steps"] == math.ceil(n_train / 32)


def test_failed_trial_is_recorded_with_reason_and_study_goes_on(tmp_path):
    """Every trial fails: the study runs them all, records each reason, then exits 2 with the first one (not 0)."""
    space = write_space(tmp_path / "s.yaml", {"max_length": [64], "lr": {"low": 1e-4, "high": 1e-3}})
    with pytest.raises(UserError) as e:
        hpo.main(TINY + ["--n_trials", "2", "--storage", f"sqlite:///{tmp_path}/o.db", "--space", str(space),
                         "--output_dir", str(tmp_path / "study")])
    assert str(e.value) == ("study 'criteria-coarse': no trial completed, 2 failed, so there is no best config; the "
                            "first failure (trial 0): UserError: --doc_stride: must be below max_length/2 (32), got 64")
    summary = history(tmp_path / "study")
    assert summary["counts"]["FAIL"] == 2 and summary["best_trial"] is None
    for t in summary["trials"]:
        assert t["fail_reason"] == "UserError: --doc_stride: must be below max_length/2 (32), got 64"
    assert not (tmp_path / "study" / "best_config.yaml").exists()


def test_existing_study_of_another_task_is_refused(coarse_study):
    _, storage, space = coarse_study
    with pytest.raises(UserError, match="exists for task criteria"):
        hpo.main(TINY[2:] + ["--task", "evidence", "--study_name", "criteria-coarse", "--storage", storage,
                             "--space", str(space), "--n_trials", "1"])


def test_pruners_are_built_from_their_names():
    import optuna

    cfg = Config(epochs=4)
    assert isinstance(hpo.make_pruner("median", cfg), optuna.pruners.MedianPruner)
    assert isinstance(hpo.make_pruner("halving", cfg), optuna.pruners.SuccessiveHalvingPruner)
    assert isinstance(hpo.make_pruner("hyperband", cfg), optuna.pruners.HyperbandPruner)
    assert isinstance(hpo.make_pruner("none", cfg), optuna.pruners.NopPruner)
    with pytest.raises(UserError, match="invalid choice: 'asha'"):
        parse_config(["--pruner", "asha"], prog="hpo.py", extra=hpo.add_hpo_flags)
    assert math.isclose(parse_config(["--timeout", "90"], prog="hpo.py", extra=hpo.add_hpo_flags)[1].timeout, 90)


def test_study_plots_history_and_importances(coarse_study, cli):
    import report

    tmp, storage, _ = coarse_study
    for name in ("hpo_history.png", "hpo_importances.png"):  # hpo.py drew them at the end of the study
        assert (tmp / "coarse" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, err = cli(report.main, ["--hpo_study", "criteria-coarse", "--storage", storage,
                                  "--output_dir", tmp / "plots"])
    assert code == 0, err
    assert sorted(p.name for p in (tmp / "plots").iterdir()) == ["hpo_history.png", "hpo_importances.png"]


# --------------------------------------------------------------------------- bad flags and dead workers

@pytest.mark.parametrize("argv, needles", [
    (["--storage", "foo://bar"], ["--storage foo://bar", "cannot open it"]),
    (["--storage", "not a url"], ["--storage not a url", "cannot open it"]),
    (["--storage", "postgresql://me:secret@localhost/db"], ["--storage postgresql://me:***@localhost/db"]),
    (["--n_trials", "-3"], ["--n_trials", "must be >= 1, got -3"]),
    (["--n_trials", "0"], ["--n_trials", "must be >= 1, got 0"]),
    (["--top_k", "0"], ["--top_k", "must be >= 1"]),
    (["--timeout", "-5"], ["--timeout", "> 0"]),
    (["--early_stopping_metric", "f1_macroo"], ["--early_stopping_metric", "'f1_macroo' is not a criteria metric",
                                                "f1_macro", "auroc"]),
    (["--task", "evidence", "--early_stopping_metric", "f1_macro"], ["'f1_macro' is not a evidence metric",
                                                                     "span_f1"]),
])
def test_bad_hpo_flags(cli, tmp_path, argv, needles):
    from test_cli import assert_one_line_error

    argv = ["--storage", f"sqlite:///{tmp_path}/o.db", "--output_dir", str(tmp_path / "study"), *TINY, *argv]
    code, err = cli(hpo.main, argv)
    assert_one_line_error(code, err, *needles)
    assert "secret" not in err
    assert not (tmp_path / "study").exists()  # refused before any trial


def test_metric_names_hold_every_main_metric():
    import models

    for task in models.TASKS:
        assert models.TASKS[task].main_metric in hpo.metric_names(Config(task=task))
    assert "no_answer_accuracy" in hpo.metric_names(Config(task="evidence", include_negatives=True))
    assert "no_answer_accuracy" not in hpo.metric_names(Config(task="evidence"))


def test_a_metric_every_trial_fails_on_stops_the_study(cli, tmp_path, monkeypatch):
    """Past the up-front check (here switched off), the first trial's error ends the study with exit 2."""
    from test_cli import assert_one_line_error

    monkeypatch.setattr(hpo, "check_args", lambda args, cfg: None)
    code, err = cli(hpo.main, TINY + ["--n_trials", "3", "--early_stopping_metric", "f1_macroo", "--storage",
                                      f"sqlite:///{tmp_path}/o.db", "--output_dir", str(tmp_path / "study")])
    assert_one_line_error(code, err, "--early_stopping_metric", "'f1_macroo' is not a criteria metric", "f1_macro")
    assert [t["state"] for t in history(tmp_path / "study")["trials"]] == ["FAIL"]  # not three


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
@pytest.mark.parametrize("storage_kind", ["sqlite", "journal"])
def test_recover_dead_trials_fails_and_requeues_a_dead_local_worker(tmp_path, storage_kind):
    import socket

    import optuna

    url = f"sqlite:///{tmp_path}/o.db" if storage_kind == "sqlite" else f"journal:{tmp_path}/journal.log"
    study = optuna.create_study(storage=storage.make_storage(url), study_name="s")
    dist = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    dead, alive, elsewhere = (study.ask(dist) for _ in range(3))
    for trial, host, pid in [(dead, socket.gethostname(), dead_pid()), (alive, socket.gethostname(), os.getpid()),
                             (elsewhere, "another-host", dead_pid())]:
        trial.set_user_attr("worker_host", host)
        trial.set_user_attr("worker_pid", pid)
    assert storage.recover_dead_trials(study) == [dead.number]
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING", "RUNNING", "WAITING"]
    assert trials[3].params == trials[0].params and trials[3].system_attrs["failed_trial"] == dead.number
    assert "process" in trials[0].user_attrs["fail_reason"] and "gone" in trials[0].user_attrs["fail_reason"]
    assert not hpo.counts_toward_n_trials(trials[0]) and hpo.n_finished(study) == 0
    assert storage.recover_dead_trials(study) == []  # done once
    assert hpo.trial_record(trials[3])["retry_of"] == dead.number


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_rerun_at_once_after_a_kill_reruns_the_dead_trial(coarse_study):
    """A worker killed mid-trial and the command rerun within the heartbeat's grace period."""
    import socket

    import optuna

    tmp, _, space = coarse_study
    url = f"sqlite:///{tmp}/dead.db"
    args = TINY + ["--storage", url, "--space", str(space), "--output_dir", str(tmp / "dead")]
    hpo.main(args + ["--n_trials", "1"])
    study = optuna.load_study(study_name="criteria-coarse", storage=storage.make_storage(url))
    dead = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    dead.set_user_attr("worker_host", socket.gethostname())
    dead.set_user_attr("worker_pid", dead_pid())
    summary = hpo.main(args + ["--n_trials", "2"])  # no sleep: its heartbeat is fresh
    trials = summary["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2]["retry_of"] == 1 and trials[2]["params"]["lr"] == trials[1]["params"]["lr"]
    assert summary["counts"]["RUNNING"] == 0  # the dead trial is not one of the two
