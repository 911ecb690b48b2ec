"""Throughput benchmark: our training loop and evaluation against transformers.Trainer, on the same work.

    python bench.py --output bench.json          # 5 workloads x their settings + MiniLM MFU + train.py start-up
    python bench.py --workloads joint_pair joint_post --no_train_py --minilm_steps 0   # post vs pair encoding
    python bench.py --threads 1 --repeats 2      # steadier on a machine shared with other jobs
    python bench.py --workloads evidence --steps 50 --n_posts 5000 --settings ours trainer_best
    python bench.py --device cuda --mixed_precision bf16 --steps 200   # on a GPU: bf16 autocast, both loops

Workloads: criteria (sentence unit), criteria (post unit, windows), evidence (windows), joint with pair
encoding and with post encoding (ours only: a Trainer row holds one criterion), compared in (post,
criterion) decisions per second: rows per second x the decisions a row carries. Each setting
trains --steps timed optimizer steps after --warmup untimed ones, then evaluates --eval_examples
inputs (taken from the training split: throughput only), with the same features (train.py's
prepare_data), model config and initial weights, AdamW and schedule, batch sizes, seed and threads:
  ours            features.make_loader + TaskModel (loss in forward) + accelerate: train.py's loop;
                  scoring.model_outputs
  trainer_best    transformers.Trainer, dynamic padding, length-grouped batches; Trainer.predict
  trainer_padded  Trainer, inputs padded to max_length at tokenisation (run_glue's classic default)
Each run is a fresh process: its peak RSS and time to first step are its own. Speed-ups compare real
(non-pad) tokens/s, as the timed steps of two samplers hold different batches. MFU = FLOPs of the
real tokens per second / a dense matmul peak measured here (fp32; on a GPU in the precision of the
run); HFU counts the padding too; a profile of our step (CPU) says where the rest goes. CPU time
hardly moves when other processes share the cores: with --threads 1, tokens per CPU-second are what an
idle machine would give. On a GPU the clock waits for the device only at the edges of the timed span.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from bench_trainer import run_trainer
from measure import (
    BatchRecorder,
    batch_stats,
    clock,
    edges,
    flops,
    matmul_peak,
    n_params_of,
    peak_gpu_mib,
    peak_rss_mib,
    step_breakdown,
)

WORKLOADS = {"criteria_sentence": {"task": "criteria", "unit": "sentence"},
             "criteria_post": {"task": "criteria", "unit": "post", "encoding": "pair"},
             "evidence": {"task": "evidence", "encoding": "pair", "evidence_head": "span"},
             # joint, every post x 9 criteria: (criterion text, post) read per pair, or each post window read once
             "joint_pair": {"task": "joint", "encoding": "pair", "evidence_head": "span"},
             "joint_post": {"task": "joint", "encoding": "post", "evidence_head": "span"}}
SETTINGS = ["ours", "trainer_best", "trainer_padded"]
SIZES = {"tiny": {}, "minilm": {"tiny_hidden": 384, "tiny_layers": 6, "tiny_heads": 12},  # MiniLM-L6-H384's shape
         "base": {"tiny_hidden": 768, "tiny_layers": 12, "tiny_heads": 12}}  # bert-base's shape


# --------------------------------------------------------------------------- one (workload, setting) per process

PROFILED_STEPS = 3  # our steps run again under the profiler (CPU), after the timed ones


def endless(loader):
    """The loader's batches epoch after epoch."""
    for epoch in range(10**9):
        loader.set_epoch(epoch)
        yield from loader


class OurLoop:
    """train.py's training step itself (train.train_step: forward with its loss, backward, clip, optimizer and
    scheduler step) on batches drawn epoch after epoch, its loss read on the host at every optimizer step
    (train.step_loss), as train.train does."""

    def __init__(self, model, optimizer, scheduler, train_loader, accelerator, cfg):
        self.model, self.optimizer, self.scheduler, self.accelerator, self.cfg = (model, optimizer, scheduler,
                                                                                  accelerator, cfg)
        self.batches, self.losses, self.steps = endless(train_loader), [], 0

    def step(self) -> None:
        from train import step_loss, train_step

        loss, _ = train_step(self.model, next(self.batches), self.optimizer, self.scheduler, self.accelerator,
                             self.cfg)
        self.losses += [loss] if loss is not None else []
        if self.accelerator.sync_gradients and self.losses:
            self.steps += 1
            step_loss(self.losses, self.steps)
            self.losses = []


def prepare_ours(job, cfg, model, tokenizer, train_feats) -> tuple:
    """(our loop, the recorder of its training batches, loader keywords): accelerate set up as train.py does."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    from features import make_loader
    from train import make_optimizer
    from utils import dataloader_kwargs

    accelerator = Accelerator(cpu=job["device"] == "cpu", mixed_precision=job["mixed_precision"])
    total = job["warmup"] + job["steps"]
    dl_kwargs = dataloader_kwargs(cfg, accelerator.device.type == "cuda")
    pad = tokenizer.pad_token_id
    train_loader = make_loader(train_feats, cfg.batch_size, True, pad, cfg.seed, **dl_kwargs)
    train_loader.collate_fn = recorder = BatchRecorder(train_loader.collate_fn)
    model, optimizer, train_loader = accelerator.prepare(model, make_optimizer(model, cfg), train_loader)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=round(cfg.warmup_ratio * total),
                              num_training_steps=total + PROFILED_STEPS)
    return OurLoop(model, optimizer, scheduler, train_loader, accelerator, cfg), recorder, dl_kwargs


def time_our_eval(model, eval_feats, accelerator, cfg, pad: int, dl_kwargs: dict) -> tuple[np.ndarray, list]:
    """(wall and CPU seconds, batch shapes) of scoring.model_outputs over eval_feats, after a warm-up."""
    from features import make_loader
    from scoring import model_outputs

    warm = eval_feats[: 2 * cfg.eval_batch_size]
    warm_loader = make_loader(warm, cfg.eval_batch_size, False, pad, **dl_kwargs)
    model_outputs(model, accelerator.prepare(warm_loader), accelerator, cfg)
    eval_loader = make_loader(eval_feats, cfg.eval_batch_size, False, pad, **dl_kwargs)
    eval_loader.collate_fn = eval_recorder = BatchRecorder(eval_loader.collate_fn)
    t = clock(sync=True)
    model_outputs(model, accelerator.prepare(eval_loader), accelerator, cfg)
    return clock(sync=True) - t, eval_recorder.shapes


def profile_our_steps(loop: OurLoop, recorder: BatchRecorder, first: int) -> dict:
    """step_breakdown of PROFILED_STEPS more of our steps under the CPU profiler: where the time goes.
    `first`: the index of their first batch (the recorder may hold a batch the loader fetched ahead)."""
    loop.model.train()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(PROFILED_STEPS):
            loop.step()
        wall = time.perf_counter() - t
    unwrapped = loop.accelerator.unwrap_model(loop.model)
    hardware_flops = flops(recorder.shapes[first : first + PROFILED_STEPS], n_params_of(unwrapped),
                           unwrapped.encoder.config.num_hidden_layers, unwrapped.encoder.config.hidden_size,
                           padded=True)
    return step_breakdown(prof, wall, hardware_flops)


def run_ours(job, cfg, model, tokenizer, train_feats, eval_feats, t_process) -> dict:
    """train.py's loop with timestamps, then scoring.model_outputs."""
    loop, recorder, dl_kwargs = prepare_ours(job, cfg, model, tokenizer, train_feats)
    total, sync_at, step_ends = job["warmup"] + job["steps"], edges(job), []
    loop.model.train()
    for step in range(total):
        loop.step()
        step_ends.append(clock(sync=step in sync_at))
        if step == 0:
            first_step = time.time() - t_process
    eval_seconds, eval_shapes = time_our_eval(loop.model, eval_feats, loop.accelerator, cfg, tokenizer.pad_token_id,
                                              dl_kwargs)
    out = {"step_ends": step_ends, "train_shapes": recorder.shapes, "first_step_s": first_step,
           "eval_seconds": eval_seconds, "eval_shapes": eval_shapes}
    if job["profile"] and loop.accelerator.device.type == "cpu":  # a few more steps under the profiler
        out["breakdown"] = profile_our_steps(loop, recorder, first=total)
    return out


def run_job(job: dict) -> dict:
    """Prepare the data as train.py does, build the model, run one setting, summarise it."""
    import psutil

    t_process = psutil.Process().create_time()
    torch.set_num_threads(job["threads"])
    logging.disable(logging.WARNING)
    import train
    from config import Config, make_config
    from models import build_model
    from utils import set_seed, use_cudnn_attention

    cfg = make_config(**WORKLOADS[job["workload"]], **SIZES[job["size"]], demo_posts=job["n_posts"], seed=job["seed"],
                      batch_size=job["batch_size"], eval_batch_size=job["eval_batch_size"],
                      max_length=job["max_length"],
                      doc_stride=min(Config.doc_stride, job["max_length"] // 4), mlflow=False)
    if job["device"] == "cuda":  # the same attention kernels and fp32 matmul precision for every setting
        use_cudnn_attention(job["cudnn_attention"])
        torch.set_float32_matmul_precision("high" if job["tf32"] else "highest")
    _, tokenizer, features, _ = train.prepare_data(cfg)
    train_examples, train_feats = features["train"]
    eval_feats = train_feats[: job["eval_examples"]]  # their "idx" is their position: valid as is
    set_seed(cfg.seed)
    model = build_model(cfg, tokenizer)
    run = run_ours if job["setting"] == "ours" else run_trainer
    r = run(job, cfg, model, tokenizer, train_feats, eval_feats, t_process)
    enc, w, n = model.encoder.config, job["warmup"], job["steps"]
    shape = (n_params_of(model), enc.num_hidden_layers, enc.hidden_size)
    out = {**{k: job[k] for k in ("workload", "setting", "size")}, "non_embedding_params": shape[0],
           "train": batch_stats(r["train_shapes"][w : w + n], r["step_ends"][w + n - 1] - r["step_ends"][w - 1], shape),
           "eval": batch_stats(r["eval_shapes"], r["eval_seconds"], shape, train=False),
           "time_to_first_step_s": r["first_step_s"], "peak_rss_mib": peak_rss_mib(), "peak_gpu_mib": peak_gpu_mib(),
           # (post, criterion) decisions an input row carries on average: 1 / windows per pair, or 9 / windows per post
           "decisions_per_row": len(train_examples) / len(train_feats)}
    for part in ("train", "eval"):
        out[part]["decisions_per_s"] = out[part]["samples_per_s"] * out["decisions_per_row"]
    if "breakdown" in r:
        out["train"]["breakdown"] = r["breakdown"]
    return out


# --------------------------------------------------------------------------- the benchmark

def spawn(job: dict) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--job", json.dumps(job)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"bench job {job['workload']}/{job['setting']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_of(runs: list[dict]) -> dict:
    """The fastest of repeated runs, for training and evaluation separately (noise only ever slows)."""
    best = dict(max(runs, key=lambda r: r["train"]["real_tokens_per_s"]))
    best["eval"] = max((r["eval"] for r in runs), key=lambda e: e["real_tokens_per_s"])
    return {**best, "time_to_first_step_s": min(r["time_to_first_step_s"] for r in runs), "repeats": len(runs)}


def time_train_py(args) -> dict:
    """Wall time from `python train.py` to its first optimizer step, and that process's peak RSS."""
    cmd = [sys.executable, "train.py", "--max_steps", "5", "--mlflow", "false", "--demo_posts", str(args.n_posts),
           "--threads", str(args.threads), "--mixed_precision", args.mixed_precision,
           "--output_dir", tempfile.mkdtemp(prefix="bench_train_py_")]
    t, first = time.perf_counter(), None
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    for line in proc.stderr:
        if first is None and "first optimizer step" in line:
            first = time.perf_counter() - t
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the max over all children
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"command": " ".join(["python", *cmd[1:]]), "seconds_to_first_step": first, "exit_code": proc.returncode,
            "total_seconds": time.perf_counter() - t, "peak_rss_mib": usage.ru_maxrss / 1024}


def report_line(r: dict) -> str:
    tr, ev = r["train"], r["eval"]
    return (f"{r['workload']:<18} {r['setting']:<15} {tr['samples_per_s']:>15.1f} {tr['real_tokens_per_s']:>8.0f} "
            f"{tr['padding_fraction']:>5.2f} {ev['samples_per_s']:>14.1f} {ev['real_tokens_per_s']:>8.0f} "
            f"{ev['padding_fraction']:>5.2f} {r['time_to_first_step_s']:>7.1f}s {r['peak_rss_mib']:>5.0f} MiB"
            f" {tr['decisions_per_s']:>11.1f} {ev['decisions_per_s']:>10.1f}"
            + (f" (GPU {r['peak_gpu_mib']:.0f} MiB)" if r.get("peak_gpu_mib") else ""))


def describe(breakdown: dict, peak: float) -> str:
    share, gflops = breakdown["time_share"], breakdown["matmul_gflop_per_s"]
    return (f"matmuls {share['matmul']:.0%} of the time (at {gflops:.0f} GFLOP/s, {gflops / peak:.0%} of peak), "
            f"other ops {share['other_ops']:.0%}, optimizer {share['optimizer']:.0%}, "
            f"Python/autograd/data {share['python_and_framework']:.0%}")


def make_parser() -> argparse.ArgumentParser:
    from cli import Parser

    p = Parser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=SETTINGS)
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps before them")
    p.add_argument("--eval_examples", type=int, default=1000, help="model inputs evaluated")
    p.add_argument("--n_posts", type=int, default=1000, help="size of the demo corpus")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--eval_batch_size", type=int, default=64)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every setting")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when there is one")
    p.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="no",
                   help="autocast of every setting (accelerate's for ours, Trainer's bf16/fp16 flags)")
    p.add_argument("--size", choices=list(SIZES), default="tiny", help="encoder shape of the compared runs")
    p.add_argument("--cudnn_attention", action="store_true", help="GPU: let SDPA use cuDNN's attention (train.py's "
                   "--cudnn_attention); every setting gets the same kernels")
    p.add_argument("--tf32", type=int, choices=[0, 1], default=1, help="GPU: TF32 matmuls in fp32 (train.py's --tf32)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved runs per setting, the fastest kept")
    p.add_argument("--minilm_steps", type=int, default=10, help="our loop with a 6-layer, 384-wide encoder; 0: skip")
    p.add_argument("--no_train_py", action="store_true", help="skip timing `python train.py` to its first step")
    p.add_argument("--output", help="write every figure to this JSON file")
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one (workload, setting) in this process
    return p


def speedup(ours: dict, other: dict) -> dict:
    """Our real tokens/s over another setting's, by wall and by CPU time, training and evaluation."""
    return {f"{part}{suffix}": ours[part][key] / other[part][key] for part in ("train", "eval")
            for suffix, key in (("", "real_tokens_per_s"), ("_cpu_time", "real_tokens_per_cpu_s"))}


def compare_settings(args, base: dict) -> tuple[list[dict], dict]:
    """(the best run of every workload x setting, our speed-ups over the Trainer settings), printed as they come."""
    results, speedups = [], {"speedup_vs_trainer_best": {}, "speedup_vs_trainer_padded": {}}
    for workload in args.workloads:
        settings = ["ours"] if WORKLOADS[workload].get("encoding") == "post" else args.settings
        runs = {s: [] for s in settings}  # Trainer rows hold one criterion each: pair encoding only
        for _ in range(args.repeats):  # interleaved: a busy spell on a shared machine hits every setting
            for setting in settings:
                job = {**base, "workload": workload, "setting": setting, "size": args.size,
                       "profile": setting == "ours"}
                runs[setting].append(spawn(job))
        best = {s: best_of(rs) for s, rs in runs.items()}
        for r in best.values():
            results.append(r)
            print(report_line(r), flush=True)
        for name in ("trainer_best", "trainer_padded"):
            if "ours" in best and name in best:
                ratio = speedup(best["ours"], best[name])
                speedups[f"speedup_vs_{name}"][workload] = ratio
                print(f"  ours vs {name}: training {ratio['train']:.2f}x (by CPU time {ratio['train_cpu_time']:.2f}x), "
                      f"evaluation {ratio['eval']:.2f}x (by CPU time {ratio['eval_cpu_time']:.2f}x)", flush=True)
    speedups["joint_decisions"] = joint_decisions(results)
    return results, speedups


def joint_decisions(results: list[dict]) -> dict:
    """Post encoding's (post, criterion) decisions per second over pair encoding's (ours, and Trainer on pairs)."""
    by = {(r["workload"], r["setting"]): r for r in results}
    post = by.get(("joint_post", "ours"))
    out = {}
    for setting in SETTINGS:
        pair = by.get(("joint_pair", setting))
        if post and pair:
            ratio = {part: post[part]["decisions_per_s"] / pair[part]["decisions_per_s"] for part in ("train", "eval")}
            out[f"post_vs_pair_{setting}"] = ratio
            print(f"  joint: post encoding (ours) vs pair encoding ({setting}): {ratio['train']:.2f}x decisions/s in "
                  f"training, {ratio['eval']:.2f}x in evaluation", flush=True)
    return out


def add_utilisation(results: list[dict], peak: float, args) -> None:
    """MFU and HFU of every run against the measured matmul peak, added to its train and eval figures and printed."""
    where = f"{args.threads} threads" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"\nFLOP utilisation against a dense {args.mixed_precision if args.mixed_precision != 'no' else 'fp32'} "
          f"matmul peak of {peak:.1f} GFLOP/s measured here ({where}); MFU counts real tokens, HFU the padding too")
    for r in results:
        for part in ("train", "eval"):
            r[part]["mfu"] = r[part]["model_gflop_per_s"] / peak
            r[part]["hfu"] = r[part]["hardware_gflop_per_s"] / peak
        print(f"  {r['workload']:<18} {r['setting']:<15} {r['size']:<7} training MFU {r['train']['mfu']:.3f} "
              f"(HFU {r['train']['hfu']:.3f}), evaluation MFU {r['eval']['mfu']:.3f}")
        if "breakdown" in r["train"]:
            print(f"    step: {describe(r['train']['breakdown'], peak)}")


def write_json(path: str, args, peak: float, speedups: dict, train_py: dict | None, results: list[dict]) -> None:
    machine = {"threads": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "device": args.device,
               "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
               "matmul_peak_gflops": peak, "load_average_1_5_15_min": os.getloadavg()}
    with open(path, "w") as fh:
        json.dump({**speedups, "machine": machine, "args": vars(args), "train_py": train_py, "runs": results},
                  fh, indent=2)
    print(f"wrote {path}")


def main(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    if args.job:
        print(json.dumps(run_job(json.loads(args.job))))
        return

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and args.mixed_precision != "no":
        p.error("--mixed_precision: bf16/fp16 autocast is for --device cuda (this CPU has no bf16 instructions)")
    peak = matmul_peak(args.threads, args.device, args.mixed_precision)
    shared = ("steps", "warmup", "eval_examples", "n_posts", "batch_size", "eval_batch_size", "max_length", "seed",
              "threads", "device", "mixed_precision", "cudnn_attention", "tf32")
    base = {k: getattr(args, k) for k in shared}
    print(f"{'workload':<18} {'setting':<15} {'train samples/s':>15} {'tokens/s':>8} {'pad':>5} "
          f"{'eval samples/s':>14} {'tokens/s':>8} {'pad':>5} {'1st step':>8} {'peak RSS':>9} "
          f"{'decisions/s':>11} {'(eval)':>10}")
    results, speedups = compare_settings(args, base)
    if args.minilm_steps and "ours" in args.settings:
        workload = "criteria_sentence" if "criteria_sentence" in args.workloads else args.workloads[0]
        results.append(spawn({**base, "workload": workload, "setting": "ours", "size": "minilm", "profile": True,
                              "steps": args.minilm_steps, "warmup": 2}))
    peak = max(peak, matmul_peak(args.threads, args.device, args.mixed_precision))  # the larger is nearer the truth
    add_utilisation(results, peak, args)
    train_py = None if args.no_train_py else time_train_py(args)
    if train_py:
        print(f"\n{train_py['command']}\n  first optimizer step {train_py['seconds_to_first_step']:.1f} s after "
              f"exec, peak RSS {train_py['peak_rss_mib']:.0f} MiB")
    if args.output:
        write_json(args.output, args, peak, speedups, train_py, results)


if __name__ == "__main__":
    from utils import run_main

    run_main(main)
