"""CPU seconds per training step, full fine-tuning against --lora, on the same batches: train.py's own setup and step
(build_training, train_step), one thread, alternating A/B so that both see the same load on a shared machine. CPU
time is what other jobs on the cores hardly move (bench.py's reasoning).

    OMP_NUM_THREADS=1 python scripts/lora_step_time.py --model minilm --data_dir corpora/written --unit post \\
        --splits_file outputs/written/criteria-minilm/splits/fold0.json --steps 10 --rounds 3
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from cli import parse_config  # noqa: E402
from config import make_config  # noqa: E402
from utils import make_accelerator, run_main  # noqa: E402


def step_seconds(cfg, prepared, steps: int) -> tuple[float, int]:
    """(CPU seconds per step over `steps` steps after one untimed, trainable parameters)."""
    torch.manual_seed(cfg.seed)
    accelerator = make_accelerator(cfg)
    model, optimizer, scheduler, loader, _ = train.build_training(cfg, accelerator, prepared)
    batches = iter(loader)
    train.train_step(model, next(batches), optimizer, scheduler, accelerator, cfg)
    start = time.process_time()
    for _ in range(steps):
        train.train_step(model, next(batches), optimizer, scheduler, accelerator, cfg)
    return (time.process_time() - start) / steps, sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(argv=None):
    def extra(parser):
        parser.add_argument("--steps", type=int, default=10)
        parser.add_argument("--rounds", type=int, default=3)

    cfg, args = parse_config(argv, prog="lora_step_time.py", extra=extra, doc=__doc__)
    torch.set_num_threads(1)
    setups = {"full": make_config(**{**dataclasses.asdict(cfg), "lora": False, "lr": "auto"}),
              "lora": make_config(**{**dataclasses.asdict(cfg), "lora": True, "lr": "auto"})}
    prepared = train.prepare_data(setups["full"])
    times = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, setup in setups.items():
            seconds, trainable = step_seconds(setup, prepared, args.steps)
            times[name].append(seconds)
            print(json.dumps({"setting": name, "cpu_s_per_step": round(seconds, 3), "trainable": trainable}))
    print(json.dumps({name: round(min(t), 3) for name, t in times.items()}))


if __name__ == "__main__":
    run_main(main)
