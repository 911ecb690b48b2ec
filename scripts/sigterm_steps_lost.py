"""How many optimizer steps a SIGTERM costs: train.py (of this checkout, or of --root) is sent SIGTERM `--after`
seconds after its first optimizer step, as a cluster scheduler would; the steps it trained (its MLflow loss points)
are compared with the step its checkpoints/last holds, which a --resume continues from.

    python scripts/sigterm_steps_lost.py                       # this code: `trained 23, saved 23, lost 0`
    git worktree add /tmp/old cf7e6d2 && python scripts/sigterm_steps_lost.py --root /tmp/old   # the code before
"""
import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--demo_posts", "400", "--tiny_hidden", "16", "--tiny_layers", "1", "--tiny_heads", "1", "--tiny_vocab",
         "400", "--max_length", "96", "--doc_stride", "16", "--batch_size", "8", "--demo_shift_posts", "0",
         "--epochs", "2", "--save_every", "0"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(ROOT), help="the checkout whose train.py runs")
    parser.add_argument("--after", type=float, default=0.5, help="seconds after the first optimizer step")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sigterm_"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    argv = [sys.executable, "train.py", *SMALL, "--output_dir", str(work / "run"), "--tracking_uri", uri]
    proc = subprocess.Popen(argv, cwd=args.root, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "first optimizer step" not in seen:
        line = proc.stderr.readline()
        if not line:
            sys.exit(f"train.py ended before its first step:\n{seen}")
        seen += line
    time.sleep(args.after)
    proc.send_signal(signal.SIGTERM)
    proc.stderr.read()
    proc.wait()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("redsm5").experiment_id])
    trained = max(m.step for m in client.get_metric_history(run.info.run_id, "1_train/loss"))
    state = work / "run" / "checkpoints" / "last" / "trainer_state.json"
    saved = json.loads(state.read_text())["global_step"] if state.exists() else 0
    print(f"exit code {proc.returncode}; trained {trained}, saved {saved}, lost {trained - saved}")


if __name__ == "__main__":
    main()
