"""bench.py's accounting (measure.py): padding and token counts of a hand-made batch, and its FLOP formula."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import bench
import measure
from features import collate
from models import TASKS, TaskModel


def test_batch_recorder_counts_real_tokens_and_padding():
    features = [{"idx": 0, "input_ids": np.array([2, 7, 3], dtype=np.int32), "label": 0},
                {"idx": 1, "input_ids": np.array([2, 7, 8, 9, 3], dtype=np.int32), "label": 1}]
    recorder = measure.BatchRecorder(lambda f: collate(f, pad_id=0))
    batch = recorder(features)
    assert batch["input_ids"].shape == (2, 5)
    assert recorder.shapes == [(2, 5, 8, 3**2 + 5**2)]  # rows, width, real tokens, sum of squared lengths
    stats = measure.batch_stats(recorder.shapes * 2, np.array([2.0, 4.0]), (10, 1, 4))
    assert stats["padding_fraction"] == pytest.approx(1 - 8 / 10)
    assert stats["samples_per_s"] == pytest.approx(4 / 2.0)
    assert stats["real_tokens_per_s"] == pytest.approx(16 / 2.0)
    assert stats["real_tokens_per_cpu_s"] == pytest.approx(16 / 4.0)


@pytest.mark.parametrize("arch", ["bert", "modernbert"])
def test_training_flops_match_torch_flop_counter(arch):
    from torch.utils.flop_counter import FlopCounterMode

    from config import make_config
    from models import build_encoder

    torch.manual_seed(0)
    cfg = make_config(tiny_arch=arch, tiny_hidden=32, tiny_layers=2, tiny_heads=2, max_length=64, doc_stride=16)
    model = TaskModel(TASKS["criteria"], build_encoder(cfg, 100))
    rows, width = 4, 48
    batch = {"input_ids": torch.randint(5, 100, (rows, width)),
             "attention_mask": torch.ones(rows, width, dtype=torch.long),
             "criterion_ids": torch.tensor([0, 3, 3, 8])}
    with FlopCounterMode(display=False) as counter:
        out = model(**batch)
        torch.nn.functional.cross_entropy(out["cls_logits"], torch.zeros(rows, dtype=torch.long)).backward()
    shapes = [(rows, width, rows * width, rows * width**2)]
    expected = measure.flops(shapes, measure.n_params_of(model), 2, 32, padded=False)
    if arch == "modernbert":  # torch's counter has no formula for SDPA with ModernBERT's sliding-window mask
        expected -= 3 * 4 * 2 * 32 * rows * width**2
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.02)


def test_bench_end_to_end_writes_ratios(tmp_path):
    """Two settings, two timed steps each: the JSON holds the ratios the README quotes, from these runs."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root, out = Path(bench.__file__).parent, tmp_path / "bench.json"
    args = ["--workloads", "evidence", "--settings", "ours", "trainer_best", "--steps", "2", "--warmup", "1",
            "--eval_examples", "16", "--n_posts", "40", "--batch_size", "8", "--eval_batch_size", "8",
            "--max_length", "96", "--threads", "1", "--minilm_steps", "0", "--no_train_py"]
    proc = subprocess.run([sys.executable, "bench.py", *args, "--output", str(out)], cwd=root, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    ours, trainer = (next(r for r in result["runs"] if r["setting"] == s) for s in ("ours", "trainer_best"))
    ratio = result["speedup_vs_trainer_best"]["evidence"]
    assert ratio["train"] == pytest.approx(ours["train"]["real_tokens_per_s"] / trainer["train"]["real_tokens_per_s"])
    assert ratio["eval"] == pytest.approx(ours["eval"]["real_tokens_per_s"] / trainer["eval"]["real_tokens_per_s"])
    assert ours["train"]["batches"] == trainer["train"]["batches"] == 2 and result["machine"]["device"] == "cpu"
    assert result["speedup_vs_trainer_padded"] == {}  # no padded run, no ratio
    refused = subprocess.run([sys.executable, "bench.py", "--device", "cpu", "--mixed_precision", "bf16"], cwd=root,
                             capture_output=True, text=True, check=False)
    assert refused.returncode == 2 and "--mixed_precision: bf16/fp16 autocast is for --device cuda" in refused.stderr
