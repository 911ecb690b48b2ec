"""Functions of a screenful (STYLE.md): no function or method in the project is over 60 lines.

    python tests/test_function_lengths.py      # every function's length, longest first
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 60


def function_lengths(root: Path = ROOT) -> list[tuple[int, str]]:
    """(lines, "file:line name") of every def, from its `def` line to its last line, longest first."""
    rows = []
    for path in sorted(root.glob("*.py")) + sorted((root / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(root)}:{node.lineno} {node.name}"))
    return sorted(rows, reverse=True)


def test_no_function_is_over_60_lines():
    long = [f"{where} ({n} lines)" for n, where in function_lengths() if n > LIMIT]
    assert not long, "name the parts of: " + ", ".join(long)


def test_the_counter_counts_def_to_last_line(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "m.py").write_text("def f():\n    x = 1\n\n    return x\n\n\n"
                                   "class C:\n    def g(self):\n        pass\n")
    assert function_lengths(tmp_path) == [(4, "m.py:1 f"), (2, "m.py:8 g")]


if __name__ == "__main__":
    for n, where in function_lengths():
        print(f"{n:4d}  {where}")
