"""What a reader of one of our entry points must read: the files of ours it imports, transitively, and their lines;
and the size of train.py's `train()`.

    python scripts/training_path.py            # train.py
    python scripts/training_path.py evaluate   # another module

"module level": imports at the top of each file (what `import train` loads); "any": imports inside functions too.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = {p.stem for p in ROOT.glob("*.py")}


def imported(name: str, top_only: bool) -> list[str]:
    tree = ast.parse((ROOT / f"{name}.py").read_text(encoding="utf-8"))
    out = []
    for node in tree.body if top_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module.split(".")[0])
    return [n for n in out if n in OURS]


def closure(start: str, top_only: bool) -> list[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += imported(name, top_only)
    return sorted(seen)


def function_size(module: str, name: str) -> tuple[int, int]:
    """(lines, local names) of a top-level function."""
    for node in ast.parse((ROOT / f"{module}.py").read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            return node.end_lineno - node.lineno + 1, len(names | {a.arg for a in node.args.args})
    raise SystemExit(f"{module}.py has no function {name}")


def main() -> None:
    start = sys.argv[1] if len(sys.argv) > 1 else "train"
    for label, top_only in (("module level", True), ("any", False)):
        files = closure(start, top_only)
        lines = sum(len((ROOT / f"{f}.py").read_text(encoding="utf-8").splitlines()) for f in files)
        print(f"{start}.py imports ({label}): {len(files)} files, {lines} lines: {' '.join(files)}")
    if start == "train":
        print("train(): %d lines, %d locals" % function_size("train", "train"))


if __name__ == "__main__":
    main()
