"""A tracking server that goes away mid-run: the run must finish, write every output, equal an untracked run, and
end within seconds (not minutes) of it.

    python scripts/tracking_outage.py     # starts `mlflow server` on 127.0.0.1, kills it after the first validation

Prints the two durations, the cmp of the two metrics.json, and what run_stats.json says was not logged.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--config", "configs/reproducible.yaml", "--demo_posts", "300", "--epochs", "4", "--demo_shift_posts", "50"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    work = Path(tempfile.mkdtemp(prefix="outage_"))
    t = time.perf_counter()
    subprocess.run([sys.executable, "train.py", *RUN, "--mlflow", "false", "--output_dir", str(work / "plain")],
                   cwd=ROOT, check=True, capture_output=True)
    plain_s = time.perf_counter() - t
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--backend-store-uri", f"sqlite:///{work / 'server.db'}",
                               "--default-artifact-root", str(work / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        t = time.perf_counter()
        run = subprocess.Popen([sys.executable, "train.py", *RUN, "--tracking_uri", f"http://127.0.0.1:{port}",
                                "--output_dir", str(work / "tracked")], cwd=ROOT, stderr=subprocess.PIPE, text=True)
        log = ""
        while "epoch 0 step" not in log:
            line = run.stderr.readline()
            if not line:
                break
            log += line
        os.killpg(server.pid, 9)  # the server and its workers, by PID
        server.wait()
        killed_at = time.perf_counter() - t
        log += run.stderr.read()
        run.wait()
        tracked_s = time.perf_counter() - t
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 9)
    same = (work / "plain/metrics.json").read_bytes() == (work / "tracked/metrics.json").read_bytes()
    stats = json.loads((work / "tracked/run_stats.json").read_text())
    print(f"untracked run: {plain_s:.1f} s; tracked run: {tracked_s:.1f} s (server killed at {killed_at:.1f} s), "
          f"exit {run.returncode}, {tracked_s - plain_s:+.1f} s")
    print(f"metrics.json identical to the untracked run's: {same}")
    print("run_stats.json:", {k: v for k, v in stats.items() if k.startswith("mlflow_")})
    print("warnings:", [line for line in log.splitlines() if "WARNING" in line][:3])


if __name__ == "__main__":
    main()
