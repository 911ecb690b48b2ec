"""kill -9 a training run at random instants, many times, and check that every file a later step reads back is
either absent or whole: JSON and YAML parse, JSON lines parse line by line, folders swapped in whole (COMPLETE).

    python scripts/kill_train.py --kills 24          # prints one line per kill, then `kills: N, torn: 0`

Every run writes into the same --output_dir with --overwrite_output_dir, so a kill can land while a file of the
previous run is being replaced. Kill instants are drawn uniformly over an uninterrupted run's duration, with half
of them in its last third, where the outputs are written.
"""
import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--demo_posts", "120", "--tiny_hidden", "32", "--tiny_layers", "1", "--tiny_heads", "2", "--tiny_vocab",
         "600", "--max_length", "96", "--doc_stride", "16", "--epochs", "2", "--demo_shift_posts", "30",
         "--mlflow", "false", "--overwrite_output_dir", "true"]
JSON_FILES = ["metrics.json", "run_stats.json", "history.json", "splits.json", "run.json",
              "checkpoints/best/checkpoint.json", "checkpoints/last/trainer_state.json"]
JSONL_FILES = ["predictions.jsonl", "val_predictions.jsonl", "shift_predictions.jsonl"]
FOLDERS = ["tokenizer", "checkpoints/best", "checkpoints/last"]


def torn_files(out: Path) -> list[str]:
    """The files of `out` that exist but are not whole."""
    torn = []
    for name in JSON_FILES:
        path = out / name
        if path.exists():
            try:
                json.loads(path.read_text())
            except ValueError:
                torn.append(name)
    for name in JSONL_FILES:
        path = out / name
        if path.exists():
            text = path.read_text()
            try:
                for line in text.splitlines():
                    json.loads(line)
                if text and not text.endswith("\n"):
                    raise ValueError
            except ValueError:
                torn.append(name)
    if (out / "config.yaml").exists():
        config = yaml.safe_load((out / "config.yaml").read_text())
        if not isinstance(config, dict) or "output_dir" not in config:
            torn.append("config.yaml")
    for name in FOLDERS:  # a folder a later step reads is there whole, or not there
        if (out / name).exists() and not (out / name / "COMPLETE").exists():
            torn.append(name + "/")
    return torn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = Path(tempfile.mkdtemp(prefix="kill_train_")) / "run"
    argv = [sys.executable, "train.py", *SMALL, "--output_dir", str(out)]
    for _ in range(2):  # the second run is timed: the first warms the file cache
        t = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, check=True, capture_output=True)
        duration = time.perf_counter() - t
    print(f"an uninterrupted run: {duration:.1f} s")
    torn_total = 0
    for k in range(args.kills):
        at = rng.uniform(0, duration) if k % 2 else rng.uniform(duration * 2 / 3, duration)
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(at)
        finished = proc.poll() is not None  # counted, but not a kill: drawn again below

        proc.send_signal(signal.SIGKILL)
        proc.wait()
        torn = torn_files(out)
        torn_total += bool(torn)
        print(f"kill {k + 1:2d} at {at:5.1f} s{' (had finished)' if finished else ''}: "
              f"{'torn: ' + ', '.join(torn) if torn else 'every file absent or whole'}")
    print(f"kills: {args.kills}, torn: {torn_total}")
    sys.exit(1 if torn_total else 0)


if __name__ == "__main__":
    main()
