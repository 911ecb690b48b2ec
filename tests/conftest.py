"""Shared fixtures: tiny CSV corpora with ReDSM5's quirks, a tiny tokenizer, an in-process CLI runner.

Nothing here reads /work/shared: the quirky corpus below imitates the real sample (paraphrased
sentences that are not substrings of their post, curly apostrophes, quoted newlines) by hand.
"""
from __future__ import annotations

import csv
import io
import logging
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the modules are flat files at the repository root

ANNOTATION_HEADER = ["post_id", "sentence_id", "sentence_text", "DSM5_symptom", "status", "explanation"]


def write_csv(path: Path, header: list[str], rows: list, bom: bool = False) -> Path:
    """A CSV written like pandas writes ReDSM5's files (quotes only where needed); `rows` are lists."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buf.getvalue().encode("utf-8"))
    return path


def write_corpus(folder: Path, posts: list, annotations: list, names=("posts.csv", "annotations.csv")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / names[0], ["post_id", "text"], posts)
    write_csv(folder / names[1], ANNOTATION_HEADER, [list(a) + ["why"] * (6 - len(a)) for a in annotations])
    return folder


# The quirky corpus. Sentence indices of P_MAIN: 0 sleep, 1 cat, 2 focus, 3 exhausted, 4 beach.
P_MAIN = ("I can’t sleep at night. My cat is fine.\nI can’t focus at work.   "
          "Honestly I am exhausted and have no energy every single day! We went to the beach last summer.")
P_NL = 'First line.\n\nShe said "I give up" and left.\nLast line.'
P_DUP = "I hate myself. I feel like a failure at everything."
P_LATIN_BYTES = "Caf\u00e9 visits make me tired. I sleep too much.".encode("latin-1")  # not UTF-8: é is 0xE9
P_LATIN = "Caf\ufffd visits make me tired. I sleep too much."  # what the loader reads (replacement char)

QUIRKY_ANNOTATIONS = [  # (post_id, sentence_id, sentence_text, DSM5_symptom, status) -> expected fate
    ("p_main", "p_main_0", "I can’t sleep at night.", "SLEEP_ISSUES", "1"),  # exact
    ("p_main", "p_main_2", "i  CAN’T focus\n at WORK.", "COGNITIVE_ISSUES", "1"),  # normalized
    ("p_main", "p_main_3", "I’m totally exhausted and I have zero energy every day.", "FATIGUE", "1"),  # fuzzy
    ("p_main", "p_main_9", "My grandmother loves gardening on Sundays.", "DEPRESSED_MOOD", "0"),  # unaligned
    ("p_nl", "p_nl_2", "Last line.", "LEEP_ISSUES", "1.0"),  # label fixed, status 1.0 accepted
    ("p_main", "p_main_1", "My cat is fine.", "HAPPINESS", "0"),  # unknown label: dropped
    ("p_main", "p_main_1", "My cat is fine.", "SPECIAL_CASE", "1"),  # dropped unless include_special_case
    ("p_dup", "p_dup_0", "I hate myself.", "WORTHLESSNESS", "1"),
    ("p_dup", "p_dup_0", "I hate myself.", "WORTHLESSNESS", "1"),  # exact duplicate: dropped
    ("p_dup", "p_dup_1", "I feel like a failure at everything.", "worthlessness", "0"),  # lower-case label
    ("p_dup", "p_dup_1", "I feel like a failure at everything.", "WORTHLESSNESS", "1"),  # conflicting duplicate
    ("p_missing", "p_missing_0", "Some text.", "FATIGUE", "1"),  # post not in posts.csv
    ("p_empty", "p_empty_0", "Nothing here.", "FATIGUE", "1"),  # post with empty text
    ("p_dup", "p_dup_0", "I hate myself.", "DEPRESSED_MOOD", "yes"),  # non-0/1 status
    ("p_dup", "p_dup_0", "I hate myself.", "SUICIDAL_THOUGHTS", ""),  # empty status (pandas' NaN)
    ("p_nl", "p_nl_0", "First line.", "ANHEDONIA", "nan"),  # NaN written out
    ("p_nl", "p_nl_1", 'She said "I give up" and left.', "DEPRESSED_MOOD", "1"),  # exact, quotes inside
    ("p_nl", "p_nl_0", "", "FATIGUE", "0"),  # empty sentence_text
    ("p_latin", "p_latin_1", "I sleep too much.", "SLEEP_ISSUES", "1"),  # exact, in a non-UTF-8 post
]


def write_quirky(folder: Path, names=("posts.csv", "annotations.csv")) -> Path:
    """Posts: 7 rows, 5 kept. Annotations: 19 rows, 9 kept (see test_data for every count)."""
    folder.mkdir(parents=True, exist_ok=True)
    posts = [("p_main", P_MAIN), ("p_nl", P_NL), ("p_empty", ""), ("p_noann", "Just saying hi to everyone."),
             ("p_dup", P_DUP), ("p_noann", "A second row with the same post_id."), ("p_latin", "@LATIN@")]
    raw = write_csv(folder / names[0], ["post_id", "text"], posts, bom=True).read_bytes()
    (folder / names[0]).write_bytes(raw.replace(b"@LATIN@", P_LATIN_BYTES))
    rows = [list(a) + ["Explanation, with a comma."] for a in QUIRKY_ANNOTATIONS]
    write_csv(folder / names[1], ANNOTATION_HEADER, rows, bom=True)
    return folder


@pytest.fixture
def quirky_dir(tmp_path):
    return write_quirky(tmp_path / "redsm5")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """WordPiece tokenizer of the tiny model, trained on a few texts (curly apostrophes included)."""
    import data
    import models

    texts = list(data.CRITERIA.values()) + [
        P_MAIN, P_NL, P_DUP, "I can’t sleep at night anymore and it’s ruining me.",
        "On day 12 we walked to the old store and bought 3 green apples.",
        "My brother didn’t call, so I watched a film about ships instead."]
    return models.train_tiny_tokenizer(texts, vocab_size=400)


@pytest.fixture
def cli(capsys):
    """run(main, argv) -> (exit code, stderr): a script's main in-process, as `run_main` wraps it.

    The scripts reconfigure logging (basicConfig(force=True)) onto the captured stderr; the
    root logger is restored afterwards so later tests do not log into a closed capture.
    """
    import utils

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def run(main, argv):
        capsys.readouterr()
        try:
            utils.run_main(main, [str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err

    yield run
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real (untrained) criteria checkpoint of a very small model, as train.py saves it: --unit post, the criteria
    model that scores whole posts (--predict)."""
    import data
    import models
    from checkpoint import save_checkpoint
    from config import make_config

    cfg = make_config(task="criteria", unit="post", tiny_hidden=16, tiny_layers=1, tiny_heads=1, max_length=64,
                      doc_stride=16)
    tokenizer = models.train_tiny_tokenizer(list(data.CRITERIA.values()) + ["I can’t sleep."], 200)
    path = tmp_path_factory.mktemp("run") / "checkpoints" / "best"
    save_checkpoint(models.build_model(cfg, tokenizer), tokenizer, cfg, path, {"null_threshold": None})
    return path
