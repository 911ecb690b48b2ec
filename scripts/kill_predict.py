#!/usr/bin/env python
"""Is `evaluate.py --predict`'s output whole or absent, whatever instant it is killed at?

    python scripts/kill_predict.py [--kills 24] [--posts 1500] [--seed 0] [--keep DIR]

Trains a demo checkpoint (train.py --max_steps 2 --mlflow false; criteria --unit post, a small encoder) and
writes a posts CSV of --posts demo posts into a temporary folder, runs `evaluate.py --predict` once to the end
(the reference: its row count, when its writing starts, how long it runs), then starts it again and kill -9's it
until --kills runs were killed: half at a random instant of the run, half inside the writing of the predictions
(once the output or its temp file appears, after a random delay up to the reference's writing time). After each
kill the output must be absent or whole: every line valid JSON and the reference's row count.
Prints `kills: N, torn: T` last; exits 1 if any output was torn.
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(args: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, **kwargs)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(map(str, args))}\n{done.stderr[-2000:]}")
    return done


def state(path: Path, rows: int | None) -> str:
    """'absent', 'whole' or 'torn (why)'."""
    if not path.exists():
        return "absent"
    lines = path.read_bytes().split(b"\n")
    if lines[-1] != b"":
        return f"torn (no newline at the end, {len(lines)} lines)"
    try:
        for line in lines[:-1]:
            json.loads(line)
    except ValueError as e:
        return f"torn (a line is not JSON: {e})"
    if rows is not None and len(lines) - 1 != rows:
        return f"torn ({len(lines) - 1} rows, expected {rows})"
    return "whole"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=24)
    parser.add_argument("--posts", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="work in this folder (kept) instead of a temporary one")
    args = parser.parse_args()
    if args.kills < 1 or args.posts < 1:
        parser.error("--kills and --posts must be >= 1")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="kill_predict_") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        # a small post-level model: a prediction run of ~1,500 posts takes seconds, not the sentence model's minutes
        run(["train.py", "--output_dir", work / "run", "--max_steps", "2", "--epochs", "1", "--mlflow", "false",
             "--demo_posts", "200", "--demo_shift_posts", "0", "--task", "criteria", "--unit", "post",
             "--tiny_hidden", "32", "--tiny_layers", "1", "--tiny_heads", "1", "--max_length", "128",
             "--doc_stride", "32"])
        run(["data.py", "--make_demo", work / "new", "--n_posts", args.posts, "--seed", 1, "--shift_posts", 0])
        out = work / "predictions.jsonl"
        predict = [sys.executable, "evaluate.py", "--checkpoint", str(work / "run" / "checkpoints" / "best"),
                   "--predict", str(work / "new" / "posts.csv"), "--output", str(out)]
        def writing() -> bool:  # the output, or a temp file of it, is there: the writing has begun
            return out.exists() or any(work.glob(f".{out.name}.*.tmp"))

        t0, proc, write_at = time.perf_counter(), subprocess.Popen(predict, cwd=ROOT, stdout=subprocess.DEVNULL,
                                                                    stderr=subprocess.PIPE, text=True), None
        seen, write_end = None, None
        while proc.poll() is None:  # when the writing starts, and when the files last changed: the writing's span
            now = (out.stat().st_size if out.exists() else -1, sorted(work.glob(f".{out.name}.*.tmp")))
            if write_at is None and writing():
                write_at = time.perf_counter() - t0
            if now != seen:
                seen, write_end = now, time.perf_counter() - t0
            time.sleep(0.001)
        duration = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"the reference run failed ({proc.returncode}):\n{proc.stderr.read()[-2000:]}")
        rows = sum(1 for _ in out.open())
        assert state(out, rows) == "whole", state(out, None)
        write_at = duration if write_at is None else write_at
        span = max(0.01, write_end - write_at)  # from the first byte written to the last
        print(f"reference: {rows} rows in {duration:.1f} s, writing from {write_at:.2f} s for {span:.3f} s", flush=True)
        counts, torn, kills, tries, during_write = {"absent": 0, "whole": 0}, [], 0, 0, 0
        while kills < args.kills and tries < 3 * args.kills:  # a run that ended before its instant is no kill
            tries += 1
            out.unlink(missing_ok=True)  # a torn write must show, not hide behind the last run's whole file
            t0 = time.perf_counter()
            proc = subprocess.Popen(predict, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if tries % 2:  # anywhere in the run
                time.sleep(rng.uniform(0, duration))
            else:  # inside the writing: its start seen (run times vary with the machine's load), then a random delay
                while proc.poll() is None and not writing():
                    time.sleep(0.001)
                time.sleep(rng.uniform(0, span))
            at = time.perf_counter() - t0
            if proc.poll() is not None:
                print(f"try {tries:2d} at {at:5.2f} s: had finished ({state(out, rows)}), not counted", flush=True)
                continue
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            temps = list(work.glob(f".{out.name}.*.tmp"))
            during_write += bool(temps)
            for t in temps:  # what a killed writer leaves: its temp file, never a torn output
                t.unlink()
            found = state(out, rows)
            if found.startswith("torn"):
                torn.append(f"kill {kills} at {at:.2f} s: {found}")
            else:
                counts[found] += 1
            print(f"kill {kills:2d} at {at:5.2f} s: {found}{' (killed while writing)' if temps else ''}", flush=True)
        for line in torn:
            print(line)
        print(f"absent {counts['absent']}, whole {counts['whole']}, killed while writing the temp file {during_write}")
        print(f"kills: {kills}, torn: {len(torn)}")
    return 1 if torn else 0


if __name__ == "__main__":
    sys.exit(main())
