"""Search spaces of HPO studies: config fields with ranges or choices (YAML), narrowed around the best trials, sampled.

A space maps Config fields to {low, high, log} or {choices}, with values parsed like the field's own
(config.coerce); fields trials are compared on or write to (config.HPO_FIXED_FIELDS) cannot be searched.
"""
from __future__ import annotations

import math
from pathlib import Path

from config import HPO_FIXED_FIELDS, coerce
from utils import UserError, read_yaml


def parse_range(name: str, spec, source: str) -> dict:
    """One entry of a search space, checked against the Config field: {low, high, log} or {choices}."""
    if isinstance(spec, list):
        spec = {"choices": spec}
    if name in HPO_FIXED_FIELDS:
        raise UserError(f"{source}: '{name}' cannot be searched (trials are compared on it or write to it)")
    keys = set(spec) if isinstance(spec, dict) else set()
    if not (keys == {"choices"} or {"low", "high"} <= keys <= {"low", "high", "log"}):
        raise UserError(f"{source}: expected a list of choices or {{low, high[, log]}}, got {spec!r}")
    if "choices" in spec:
        if not spec["choices"]:
            raise UserError(f"{source}: no choices")
        return {"choices": [coerce(name, c, source) for c in spec["choices"]]}
    low, high, log_scale = coerce(name, spec["low"], source), coerce(name, spec["high"], source), spec.get("log", False)
    if isinstance(low, bool) or not isinstance(low, (int, float)):
        raise UserError(f"{source}: '{name}' is not numeric: give a list of choices")
    if not low < high:
        raise UserError(f"{source}: low ({low}) must be below high ({high})")
    if log_scale is not False and (log_scale is not True or low <= 0):
        raise UserError(f"{source}: log must be true or false, and a log range needs low > 0")
    return {"low": low, "high": high, "log": log_scale}


def load_space(path: str | Path) -> dict:
    path = Path(path)
    raw = read_yaml(path, "search space")
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{path}: expected a mapping of config fields to ranges or choices")
    return {name: parse_range(name, spec, f"{path}: {name}") for name, spec in raw.items()}


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
