"""Search spaces of HPO studies: config fields with ranges or choices (YAML), narrowed around the best trials, sampled.

A space maps Config fields to {low, high, log} or {choices}, with values parsed and range-checked like the field's
own (config.coerce, config.check_range: an infinite bound is refused when the space is loaded); fields trials are
compared on or write to (config.HPO_FIXED_FIELDS) cannot be searched.
A study keeps the space it was created with (study_space: the YAML, or the coarse study's narrowed; a
different --space on it is refused, check_same_space), and the fingerprint of its base config (what a trial's value
means: the metric, and the data it is measured on; another one is refused, check_same_fingerprint); trial n samples
with seed + n (TrialSeededTPE).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import optuna

import data
from auto_defaults import AUTO_DEFAULTS, resolve_auto
from config import DATA_FIELDS, HPO_FIXED_FIELDS, Config, check_range, coerce, pretrained
from utils import UserError, read_yaml

SPACE_DIR = Path(__file__).resolve().parent / "configs" / "hpo"


def parse_range(name: str, spec, source: str, cfg: Config | None = None) -> dict:
    """One entry of a search space, checked against the Config field: {low, high, log} or {choices}. With
    `times_auto: true`, low and high are multiples of what `auto` gives this field for cfg's encoder (lr: the rate
    auto_defaults.auto_lr takes from the encoder's width), so one space suits MiniLM and bert-base alike."""
    if isinstance(spec, list):
        spec = {"choices": spec}
    if name in HPO_FIXED_FIELDS:
        raise UserError(f"{source}: '{name}' cannot be searched (trials are compared on it or write to it)")
    keys = set(spec) if isinstance(spec, dict) else set()
    if not (keys == {"choices"} or {"low", "high"} <= keys <= {"low", "high", "log", "times_auto"}):
        raise UserError(f"{source}: expected a list of choices or {{low, high[, log, times_auto]}}, got {spec!r}")
    if spec.get("times_auto", False) is not False:
        if spec["times_auto"] is not True or name not in AUTO_DEFAULTS or cfg is None:
            raise UserError(f"{source}: times_auto must be true, on a field with an auto value "
                            f"({', '.join(AUTO_DEFAULTS)})")
        base = getattr(resolve_auto(dataclasses.replace(cfg, **{name: "auto"})), name)
        spec = {k: coerce(name, v, source) * base if k in ("low", "high") else v
                for k, v in spec.items() if k != "times_auto"}
    if "choices" in spec:
        if not spec["choices"]:
            raise UserError(f"{source}: no choices")
        choices = [coerce(name, c, source) for c in spec["choices"]]
        for c in choices:
            check_range(name, c, f"{source}: choice {c!r}")
        return {"choices": choices}
    low, high, log_scale = coerce(name, spec["low"], source), coerce(name, spec["high"], source), spec.get("log", False)
    if isinstance(low, bool) or not isinstance(low, (int, float)):
        raise UserError(f"{source}: '{name}' is not numeric: give a list of choices")
    if not low < high:
        raise UserError(f"{source}: low ({low}) must be below high ({high})")
    if log_scale is not False and (log_scale is not True or low <= 0):
        raise UserError(f"{source}: log must be true or false, and a log range needs low > 0")
    for bound, value in (("low", low), ("high", high)):  # a trial may draw either end (inf: every trial overflows)
        check_range(name, value, f"{source}: {bound}")
    return {"low": low, "high": high, "log": log_scale}


def load_space(path: str | Path, cfg: Config | None = None) -> dict:
    """A space file, its `times_auto` ranges made absolute for cfg's encoder."""
    path = Path(path)
    raw = read_yaml(path, "search space")
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path}: expected a mapping of config fields to ranges or choices")
    return {name: parse_range(name, spec, f"{path}: {name}", cfg) for name, spec in raw.items()}


def narrow_space(space: dict, best_params: list[dict], margin: float = 0.1) -> dict:
    """The space around the best trials' values: choices they used; ranges spanning their values,
    widened by `margin` of the coarse range on each side (on the log scale for log ranges)."""
    fine = {}
    for name, spec in space.items():
        values = [p[name] for p in best_params if name in p]
        if not values:
            fine[name] = spec
        elif "choices" in spec:
            fine[name] = {"choices": [c for c in spec["choices"] if c in values]}
        else:
            scale, unscale = (math.log, math.exp) if spec["log"] else (float, float)
            lo, hi = scale(spec["low"]), scale(spec["high"])
            pad = margin * (hi - lo)
            low = spec["low"] if scale(min(values)) - pad <= lo else unscale(scale(min(values)) - pad)
            high = spec["high"] if scale(max(values)) + pad >= hi else unscale(scale(max(values)) + pad)
            if isinstance(spec["low"], int):
                low, high = math.floor(low), math.ceil(high)
            fine[name] = {"low": low, "high": high, "log": spec["log"]}
    return fine


def sample_params(trial, space: dict) -> dict:
    params = {}
    for name, spec in space.items():
        if "choices" in spec:
            params[name] = trial.suggest_categorical(name, spec["choices"])
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int):
            params[name] = trial.suggest_int(name, spec["low"], spec["high"], log=spec["log"])
        else:
            params[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=spec["log"])
    return params


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE whose draws for trial n come from seed + n.

    One seed per worker would make workers started together draw the same random startup
    trials; seeded per trial, a study is a function of (seed, trial numbers, history) however
    many workers run it.
    """

    def __init__(self, seed: int, n_startup_trials: int):
        self.seed, self.n_startup_trials, self.tpe = seed, n_startup_trials, None

    def before_trial(self, study, trial):  # called before any sampling for the trial
        seed = (self.seed + trial.number) % 2**32  # numpy takes 0 .. 2**32 - 1
        self.tpe = optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.n_startup_trials)
        self.tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, name, distribution):
        return self.tpe.sample_independent(study, trial, name, distribution)

    def after_trial(self, study, trial, state, values):
        if self.tpe is not None:  # None: a trial told from outside optimize (recover_dead_trials)
            self.tpe.after_trial(study, trial, state, values)


def best_trials(study, k: int) -> list:
    """The k best complete trials of a study, best first: the fine stage narrows around them."""
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    return sorted(done, key=lambda t: t.value, reverse=study.direction.name == "MAXIMIZE")[:k]


def as_stored(space: dict) -> dict:
    """A space as Optuna stores a user attribute (JSON): what a study's stored space is compared with."""
    return json.loads(json.dumps(space))


def check_same_space(args, study, name: str, cfg: Config | None = None) -> None:
    """--space on an existing study: it must be the space the study was created from (the YAML of a coarse
    study; the coarse space a fine study narrowed), or it is an error naming the study and the fields that differ."""
    given = as_stored(load_space(args.space, cfg))
    stored = study.user_attrs.get("space_given", study.user_attrs["search_space"] if args.stage == "coarse" else None)
    if stored is None or given == stored:  # None: a fine study of an older version, its coarse space not stored
        return
    fields = sorted(k for k in set(given) | set(stored) if given.get(k) != stored.get(k))
    raise UserError(f"--space {args.space}: differs from the search space study '{name}' was created with (fields "
                    f"{', '.join(fields)}), and a study keeps its space: give a new --study_name to search this one, "
                    "or leave --space out to continue the study")


# The data fields (config.DATA_FIELDS) whose value is not what a trial is measured on: the corpus and split files are
# in the fingerprint by their content (workers on machines with other paths share a study), and the shifted test set
# and remote code do not change the validation metric a trial returns.
NOT_IN_FINGERPRINT = ("data_dir", "splits_file", "test_shift_dir", "demo_shift_posts", "trust_remote_code")


def fingerprint(cfg: Config, metric: str, space: dict) -> dict:
    """What a trial's value means, stored by a study at its creation: the metric and its direction, the data fields
    the search space leaves fixed, and the content of the data (the corpus, its split file)."""
    fields = [f for f in DATA_FIELDS if f not in NOT_IN_FINGERPRINT and f not in space]
    return {"metric": metric, "early_stopping_mode": cfg.early_stopping_mode, **{f: getattr(cfg, f) for f in fields},
            "data_sha256": data.data_sha256(dataclasses.replace(cfg, test_shift_dir=None))}


def check_same_fingerprint(study, cfg: Config, metric: str, name: str) -> None:
    """A study continues only with the fingerprint it was created with: trials of another metric or corpus would be
    ranked together ("best trial 0: val auroc 0.665", the 0.665 an f1_macro). A study made before fingerprints were
    stored is compared on what it recorded: its metric and base config, the corpus by its path."""
    mine, stored = fingerprint(cfg, metric, study.user_attrs["search_space"]), study.user_attrs.get("fingerprint")
    if stored is None:
        base = study.user_attrs.get("base_config", {})
        mine.update(data_dir=cfg.data_dir, splits_file=cfg.splits_file)
        stored = {"metric": study.user_attrs.get("metric", metric), **{k: base[k] for k in mine if k in base}}
    differ = [k for k in mine if k in stored and as_stored(mine[k]) != stored[k]]
    if differ:
        shown = ", ".join(f"{k} {stored[k]!r} -> {mine[k]!r}" if k != "data_sha256" else
                          f"the data's content (sha256 {stored[k][:12]} -> {mine[k][:12]})" for k in differ)
        raise UserError(f"study '{name}' was created with another base config: {shown}; its trials' values would not "
                        f"compare with this command's: start a new study with another --study_name (e.g. {name}-2; "
                        "and another --output_dir if you give one), or continue this one with its own settings")


def default_space(cfg: Config) -> Path:
    """configs/hpo/<task>.yaml for the tiny encoder trained from scratch, <task>_pretrained.yaml for any other
    --model: the rates that suit one wreck or starve the other."""
    return SPACE_DIR / (f"{cfg.task}_pretrained.yaml" if pretrained(cfg) else f"{cfg.task}.yaml")


def study_space(args, cfg: Config, storage) -> tuple[dict, dict | None, dict | None]:
    """(search space, params to try first, the space it comes from) of a new study: the YAML, or the coarse study
    narrowed (the coarse study's space, which a --space must then equal)."""
    if args.stage == "coarse":
        space = load_space(args.space or default_space(cfg), cfg)
        return space, None, as_stored(space)
    coarse_name = args.coarse_study or f"{cfg.task}-coarse"
    try:
        coarse = optuna.load_study(study_name=coarse_name, storage=storage)
    except KeyError:
        raise UserError(f"--stage fine: no study '{coarse_name}' in {args.storage} (run --stage coarse first)") \
            from None
    top = best_trials(coarse, args.top_k)
    if not top:
        raise UserError(f"--stage fine: study '{coarse_name}' has no completed trial to narrow around")
    space = coarse.user_attrs.get("search_space")
    if space is None:
        space = load_space(args.space or default_space(cfg), cfg)
    elif args.space and as_stored(load_space(args.space, cfg)) != space:
        raise UserError(f"--space {args.space}: differs from the search space of study '{coarse_name}', which the "
                        "fine stage narrows: leave --space out (or run a coarse study over it first)")
    return narrow_space(space, [t.params for t in top]), top[0].params, as_stored(space)
