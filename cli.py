"""The command line of every script: a flag per Config field (its help, choices, range and default from the field's
knob), `--config FILE` beneath the flags, and argparse errors as one line with exit code 2 that names the flag a
mistyped or earlier-guide name most likely meant (`--lrr` -> `--lr`, `--num_epochs` -> `--epochs`).

Precedence: dataclass defaults < --config YAML < --field flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

from config import (
    Config,
    allowed_range,
    coerce,
    config_fields,
    literal_choices,
    load_yaml_config,
    make_config,
    seed_hint,
    seed_name,
)
from utils import UserError


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2 through utils.run_main), and --help that opens with the first
    line of the script's docstring (its `description`), then the usage, then the rest of the docstring."""

    def format_help(self) -> str:
        if not self.description:
            return super().format_help()
        whole = self.description
        first, _, self.description = whole.strip().partition("\n")
        try:
            return f"{first}\n\n{super().format_help()}"
        finally:
            self.description = whole

    def error(self, message):  # one line, exit code 2, no usage dump
        if message.startswith("unrecognized arguments"):  # name the valid flags, or the likely one
            words = message.split()[2:]
            hints = [seed_hint(w.split("=")[0].lstrip("-"), True) for w in words if w.startswith("--")]
            for w in (w for w in words if "=" in w and not w.startswith("-")):  # training.epochs=20
                key, value = w.split("=", 1)
                ours = seed_name(key)
                hints.append(f"{w} is --{ours} {value} here" if ours and " " not in ours else None)
            dotted = [w for w in words if "." in w.split("=")[0] and "=" in w and not w.startswith("-")]
            if dotted and not any(hints):
                hints = [f"{dotted[0]}: settings are flags here (--name value), not key=value"]
            if any(hints):
                raise UserError(f"{self.prog}: {message} ({'; '.join(h for h in hints if h)})")
            flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
            unknown = [w.split("=")[0] for w in words if w.startswith("--")]
            close = sorted({m for w in unknown for m in closest(w, flags)})
            message += f" (did you mean {' or '.join(close)}?)" if close else f" (valid: {', '.join(flags)})"
        raise UserError(f"{self.prog}: {message}")


def closest(word: str, names: list[str]) -> list[str]:
    """The names a mistyped `word` most likely meant: difflib's close matches as close as the best one (within 0.1 of
    its similarity): --lrr is --lr, not also --lora."""
    import difflib

    scored = sorted(((difflib.SequenceMatcher(None, word, n).ratio(), n) for n in names), reverse=True)[:3]
    return [n for ratio, n in scored if ratio >= max(0.6, scored[0][0] - 0.1)] if scored else []


def field_help(name: str, f: dataclasses.Field) -> str:
    """--help text of a field: what it does, its choices, its range, its default."""
    tp = typing.get_type_hints(Config)[name]
    choices = literal_choices(tp) or tuple(w for arg in typing.get_args(tp) for w in (literal_choices(arg) or ()))
    text = f.metadata["help"]
    if choices:
        text += f" (choices: {', '.join(map(str, choices))}{'' if literal_choices(tp) else ', or a number'})"
    allowed = allowed_range(name)
    text = f"{text} [{f'{allowed}; ' if allowed else ''}default: {f.default}]"
    return text.replace("%", "%%")  # argparse %-formats help: '27% slower' printed the action's dict


def parse_config(argv: list[str] | None = None, prog: str = "train.py", extra=None,
                 doc: str | None = None) -> tuple[Config, argparse.Namespace]:
    """Config from defaults < --config YAML < --field flags. `extra(parser)` adds script-only flags; `doc` (the
    script's docstring) opens --help."""
    parser = Parser(prog=prog, allow_abbrev=False, description=doc,
                     usage=f"{prog} [--config FILE] [--FIELD VALUE ...]",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of config fields (flags override it)")
    hints = typing.get_type_hints(Config)
    group = parser.add_argument_group("config fields (also YAML keys of --config)")
    for name, f in config_fields().items():
        # a bare boolean flag means true, as users expect of store_true flags: `--resume` = `--resume true`
        bare = {"nargs": "?", "const": "true"} if hints[name] is bool else {}
        group.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar=name.upper(),
                           help=field_help(name, f), **bare)
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    values = load_yaml_config(args.config) if args.config else {}
    for name in config_fields():
        if hasattr(args, name):
            values[name] = coerce(name, getattr(args, name), f"--{name}")
    return make_config(**values), args
