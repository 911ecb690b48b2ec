"""Two hpo.py workers started at the same moment share one study: every trial run once, one MLflow parent run.
On sqlite always; on PostgreSQL when a server is reachable (REDSM5_TEST_POSTGRES, default
postgresql://redsm5:redsm5@127.0.0.1/optuna_test), skipped with the reason otherwise."""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--task", "criteria", "--demo_posts", "60", "--tiny_hidden", "16", "--tiny_layers", "1", "--tiny_heads", "1",
        "--tiny_vocab", "400", "--max_steps", "2", "--epochs", "1", "--threads", "1", "--demo_shift_posts", "0"]
POSTGRES = os.environ.get("REDSM5_TEST_POSTGRES", "postgresql://redsm5:redsm5@127.0.0.1/optuna_test")


def postgres_or_skip() -> str:
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(POSTGRES).connect():
            return POSTGRES
    except ImportError as e:
        pytest.skip(f"no PostgreSQL driver ({e.name}): pip install -e '.[postgres]'")
    except Exception as e:  # no server there: nothing to test against
        pytest.skip(f"no PostgreSQL server at {POSTGRES.split('@')[-1]} ({str(e).splitlines()[0][:80]})")


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_two_workers_started_together_share_one_study_and_one_parent_run(tmp_path, kind):
    from mlflow.tracking import MlflowClient

    storage = f"sqlite:///{tmp_path / 'optuna.db'}" if kind == "sqlite" else postgres_or_skip()
    study_name = f"two-workers-{uuid.uuid4().hex[:8]}"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = [sys.executable, "hpo.py", *TINY, "--n_trials", "4", "--storage", storage, "--study_name", study_name,
            "--output_dir", str(tmp_path / "study"), "--tracking_uri", tracking]
    workers = [subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    errors = [w.communicate(timeout=900)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [e[-1500:] for e in errors]
    study = optuna.load_study(study_name=study_name, storage=storage)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") >= 4 and set(states) == {"COMPLETE"}, states  # each finishes its own trial
    assert len({t.number for t in study.trials}) == len(study.trials)
    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("redsm5").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [(r.info.run_name, r.info.run_id) for r in parents]
    assert study.user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(study.trials)
    if kind == "postgresql":
        optuna.delete_study(study_name=study_name, storage=storage)
