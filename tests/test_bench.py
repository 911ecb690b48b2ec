"""bench.py's accounting: padding and token counts of a hand-made batch, and its FLOP formula."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import bench
import data
from models import TASKS, TaskModel


def test_batch_recorder_counts_real_tokens_and_padding():
    features = [{"idx": 0, "input_ids": np.array([2, 7, 3], dtype=np.int32), "label": 0},
                {"idx": 1, "input_ids": np.array([2, 7, 8, 9, 3], dtype=np.int32), "label": 1}]
    recorder = bench.BatchRecorder(lambda f: data.collate(f, pad_id=0))
    batch = recorder(features)
    assert batch["input_ids"].shape == (2, 5)
    assert recorder.shapes == [(2, 5, 8, 3**2 + 5**2)]  # rows, width, real tokens, sum of squared lengths
    stats = bench.batch_stats(recorder.shapes * 2, np.array([2.0, 4.0]), (10, 1, 4))
    assert stats["padding_fraction"] == pytest.approx(1 - 8 / 10)
    assert stats["samples_per_s"] == pytest.approx(4 / 2.0)
    assert stats["real_tokens_per_s"] == pytest.approx(16 / 2.0)
    assert stats["real_tokens_per_cpu_s"] == pytest.approx(16 / 4.0)


def test_training_flops_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    enc = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64)
    model = TaskModel(TASKS["criteria"], BertModel(enc, add_pooling_layer=False))
    rows, width = 4, 48
    batch = {"input_ids": torch.randint(5, 100, (rows, width)), "attention_mask": torch.ones(rows, width, dtype=torch.long),
             "criterion_ids": torch.tensor([0, 3, 3, 8])}
    with FlopCounterMode(display=False) as counter:
        out = model(**batch)
        torch.nn.functional.cross_entropy(out["cls_logits"], torch.zeros(rows, dtype=torch.long)).backward()
    shapes = [(rows, width, rows * width, rows * width**2)]
    expected = bench.flops(shapes, bench.n_params_of(model), 2, 32, padded=False)
    assert counter.get_total_flops() == pytest.approx(expected, rel=0.02)
