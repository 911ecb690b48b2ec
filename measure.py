"""How bench.py measures: clocks that wait for the GPU only where asked, peak memory, the batches a loader
really gave (real tokens and padding), FLOPs of a step, MFU against a dense matmul peak measured on this machine,
and where a profiled step spends its time.
"""
from __future__ import annotations

import resource
import time

import numpy as np
import torch


def matmul_peak(threads: int, device: str = "cpu", precision: str = "no", repeats: int = 10) -> float:
    """Best dense matmul GFLOP/s: fp32 with `threads` threads on the CPU, the run's precision on a GPU.
    The denominator of MFU."""
    torch.set_num_threads(threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    best = 0.0
    for n in (1024, 2048) if device == "cpu" else (4096, 8192):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        for _ in range(repeats):
            t = clock(sync=True)[0]
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (clock(sync=True)[0] - t) / 1e9)
    return best


def clock(sync: bool = False) -> np.ndarray:
    """(wall, CPU time of all this process's threads); `sync` first waits for queued GPU work."""
    if sync and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return np.array([time.perf_counter(), time.process_time()])


def edges(job: dict) -> set[int]:
    """Indices of the optimizer steps whose end is read (the first: time to first step; the edges of the
    timed span): only there does the clock wait for the GPU."""
    return {0, job["warmup"] - 1, job["warmup"] + job["steps"] - 1}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_gpu_mib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None


class BatchRecorder:
    """Wraps a collate function; keeps each batch's (rows, width, real tokens, sum of squared lengths)."""

    def __init__(self, collate_fn):
        self.collate_fn, self.shapes = collate_fn, []

    def __call__(self, features):
        batch = self.collate_fn(features)
        lengths = batch["attention_mask"].sum(1)  # on the host: no device sync
        self.shapes.append((*batch["input_ids"].shape, int(lengths.sum()), int((lengths**2).sum())))
        return batch


def n_params_of(model) -> int:
    """Weights that multiply every token: the encoder's matrices less the embedding tables (lookups) and
    the unused pooler. The task heads add under 1%."""
    encoders = [m for m in (model.encoder, model.span_encoder) if m is not None]
    return sum(p.numel() for e in encoders for n, p in e.named_parameters()
               if p.ndim > 1 and "embeddings" not in n and "pooler" not in n)


def flops(shapes, n_params: int, n_layers: int, hidden: int, padded: bool, train: bool = True) -> float:
    """FLOPs of the batches `shapes`: per token, 2 per weight and 4 * layers * hidden * length for the
    attention, forward; x3 with the backward (PaLM's 6N + 12 L d T). Within 0.2% of
    torch.utils.flop_counter on these models. `padded` counts the pad tokens too."""
    s = np.array(shapes, dtype=np.float64).reshape(-1, 4)
    tokens, tokens_sq = (s[:, 0] * s[:, 1], s[:, 0] * s[:, 1] ** 2) if padded else (s[:, 2], s[:, 3])
    return (3 if train else 1) * (2 * n_params * tokens.sum() + 4 * n_layers * hidden * tokens_sq.sum())


def batch_stats(shapes, seconds: np.ndarray, model_shape: tuple, train: bool = True) -> dict:
    """Throughput, padding and GFLOP/s of the batches `shapes`, processed in `seconds` = (wall, CPU)."""
    s = np.array(shapes, dtype=np.float64).reshape(-1, 4)
    rows, slots, real = s[:, 0].sum(), (s[:, 0] * s[:, 1]).sum(), s[:, 2].sum()
    wall, cpu = seconds
    return {"seconds": wall, "cpu_seconds": cpu, "batches": len(s), "samples_per_s": rows / wall,
            "real_tokens_per_s": real / wall, "real_tokens_per_cpu_s": real / cpu,
            "padding_fraction": 1 - real / slots, "mean_width": slots / rows,
            "model_gflop_per_s": flops(shapes, *model_shape, padded=False, train=train) / wall / 1e9,
            "hardware_gflop_per_s": flops(shapes, *model_shape, padded=True, train=train) / wall / 1e9}


def step_breakdown(prof, wall: float, hardware_flops: float) -> dict:
    """Shares of profiled wall time: matmul (mm/addmm/bmm, fused attention: all the FLOPs, and their
    GFLOP/s), other ops (element-wise, dropout masks, softmax, layer norm, loss), the AdamW step, and
    the rest: Python, autograd engine, data loading, the profiler itself."""
    matmuls = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "scaled_dot_product")
    out = dict.fromkeys(["matmul", "other_ops", "optimizer"], 0.0)
    for e in prof.key_averages():
        if e.key.startswith("Optimizer.step"):
            out["optimizer"] += e.cpu_time_total / 1e6
            out["other_ops"] -= (e.cpu_time_total - e.self_cpu_time_total) / 1e6  # its ops are counted below
        elif e.key.startswith("aten::"):
            out["matmul" if any(m in e.key for m in matmuls) else "other_ops"] += e.self_cpu_time_total / 1e6
    out["python_and_framework"] = wall - sum(out.values())
    return {"time_share": {k: v / wall for k, v in out.items()},
            "matmul_gflop_per_s": hardware_flops / out["matmul"] / 1e9}
