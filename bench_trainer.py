"""bench.py's comparison: the same work under transformers.Trainer (dynamic padding with length-grouped batches,
or inputs padded to max_length), timed as our loop is. Trainer's rows hold one criterion and one gold start/end
each: pair encoding and the span head.
"""
from __future__ import annotations

import tempfile
import time

import torch

from measure import BatchRecorder, clock, edges


class LossModel(torch.nn.Module):
    """Trainer takes the loss from the model's output: the TaskModel, given Trainer's one-position span targets."""

    def __init__(self, model, cfg):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, input_ids, attention_mask, token_type_ids=None, criterion_ids=None, labels=None,
                start_positions=None, end_positions=None):
        targets = {"labels": labels}
        if start_positions is not None:  # one gold position a window, as a Trainer dataset column holds it
            width = input_ids.shape[1]
            targets["start_targets"] = torch.nn.functional.one_hot(start_positions, width).bool()
            targets["end_targets"] = torch.nn.functional.one_hot(end_positions, width).bool()
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                          criterion_ids=criterion_ids, **targets)


def step_timer(sync_at: set[int], t_process: float):
    """A TrainerCallback that keeps the clock at each optimizer step's end (waiting for the GPU at
    `sync_at`) and the time from process start to the first."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends, self.first_step = [], None

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(clock(sync=len(self.ends) in sync_at))
            if self.first_step is None:
                self.first_step = time.time() - t_process

    return StepTimes()


def trainer_rows(feats, pad_id: int, width: int | None) -> list[dict]:
    """What a tokenised `datasets` column would hold; padded to `width` (None: each row's own length)."""
    out = []
    for f in feats:
        n = len(f["input_ids"])
        pad = (width or n) - n
        row = {"input_ids": f["input_ids"].tolist() + [pad_id] * pad, "attention_mask": [1] * n + [0] * pad,
               "labels": f["label"], "criterion_ids": f["criterion_id"]}
        if "token_type_ids" in f:
            row["token_type_ids"] = f["token_type_ids"].tolist() + [0] * pad
        if "start" in f:
            row.update(start_positions=f["start"], end_positions=f["end"])
        out.append(row)
    return out


def trainer_args(job, cfg, padded: bool, spans: bool):
    """TrainingArguments with our optimizer settings, schedule, batch sizes, seed and precision."""
    from transformers import TrainingArguments

    total, precision = job["warmup"] + job["steps"], job["mixed_precision"]
    new_api = "train_sampling_strategy" in TrainingArguments.__dataclass_fields__  # transformers >= 5
    sampling = ({"train_sampling_strategy": "random" if padded else "group_by_length"} if new_api
                else {"group_by_length": not padded})
    return TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench_trainer_"), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size, max_steps=total, learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_epsilon=cfg.adam_eps,
        lr_scheduler_type="linear", warmup_steps=round(cfg.warmup_ratio * total), max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed, use_cpu=job["device"] == "cpu", bf16=precision == "bf16", fp16=precision == "fp16",
        dataloader_num_workers=0, remove_unused_columns=False, report_to="none",
        save_strategy="no", logging_steps=cfg.log_every, disable_tqdm=True,
        label_names=["start_positions", "end_positions"] if spans else ["labels"], **sampling)


def run_trainer(job, cfg, model, tokenizer, train_feats, eval_feats, t_process) -> dict:
    """transformers.Trainer around the same TaskModel, with the same optimizer settings, schedule and features."""
    from transformers import DataCollatorWithPadding, Trainer, default_data_collator

    padded = job["setting"] == "trainer_padded"
    width = cfg.max_length if padded else None
    args = trainer_args(job, cfg, padded, spans="start" in train_feats[0])
    collate = default_data_collator if padded else DataCollatorWithPadding(tokenizer)
    recorder, timer = BatchRecorder(collate), step_timer(edges(job), t_process)
    trainer = Trainer(model=LossModel(model, cfg), args=args,
                      train_dataset=trainer_rows(train_feats, tokenizer.pad_token_id, width), data_collator=recorder,
                      callbacks=[timer])
    trainer.train()
    eval_rows = trainer_rows(eval_feats, tokenizer.pad_token_id, width)
    trainer.predict(eval_rows[: 2 * cfg.eval_batch_size])  # warm-up
    trainer.data_collator = eval_recorder = BatchRecorder(collate)
    t = clock(sync=True)
    trainer.predict(eval_rows)
    return {"step_ends": timer.ends, "train_shapes": recorder.shapes, "first_step_s": timer.first_step,
            "eval_seconds": clock(sync=True) - t, "eval_shapes": eval_recorder.shapes}
