"""ReDSM5 data: loading with a report, sentence alignment, post-level splits, features, demo corpus.

    python data.py --make_demo DIR [--n_posts N] [--seed S]   # write the synthetic demo corpus
    python data.py --data_dir DIR                             # print the load report of a corpus

Reading order: constants -> CSV reading and validation (`load_corpus`) -> alignment of annotated
sentences to character spans of their post -> splits -> examples per task -> tokenised features
(windows over long posts) -> batching -> the synthetic demo corpus.
"""
from __future__ import annotations

import csv
import difflib
import functools
import io
import itertools
import json
import logging
import math
import random
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils import UserError

log = logging.getLogger("redsm5")
csv.field_size_limit(2**31 - 1)  # real posts run to ~7,000 words; csv's default cap is 131,072 chars

# The nine DSM-5 A-criteria, each with a one-sentence description in this project's own words.
# The description is the first text of every (criterion, text) pair the encoder sees.
CRITERIA = {
    "DEPRESSED_MOOD": "A.1 Depressed mood: feeling sad, empty, hopeless or tearful most of the day.",
    "ANHEDONIA": "A.2 Anhedonia: lost interest or pleasure in activities that used to be enjoyable.",
    "APPETITE_CHANGE": "A.3 Appetite or weight change: eating much less or much more, losing or gaining weight.",
    "SLEEP_ISSUES": "A.4 Sleep problems: insomnia, waking at night, or sleeping far too much.",
    "PSYCHOMOTOR": "A.5 Psychomotor change: restless agitation or visibly slowed movement and speech.",
    "FATIGUE": "A.6 Fatigue: tired, drained or without energy nearly every day.",
    "WORTHLESSNESS": "A.7 Worthlessness or guilt: feeling worthless, a failure, or excessively guilty.",
    "COGNITIVE_ISSUES": "A.8 Cognitive problems: trouble thinking, concentrating, remembering or deciding.",
    "SUICIDAL_THOUGHTS": "A.9 Suicidal thoughts: thoughts of death, wanting to die, or plans to end one's life.",
}
SYMPTOMS = list(CRITERIA)
SPECIAL_CASE = "SPECIAL_CASE"
LABEL_FIXES = {"LEEP_ISSUES": "SLEEP_ISSUES"}  # misspellings seen in the real corpus
FILE_PAIRS = [("posts.csv", "annotations.csv"), ("redsm5_posts.csv", "redsm5_annotations.csv")]
POST_COLUMNS = ["post_id", "text"]
ANNOTATION_COLUMNS = ["post_id", "sentence_id", "sentence_text", "DSM5_symptom", "status"]


# --------------------------------------------------------------------------- loading

def read_csv(path: Path, required: list[str]) -> tuple[list[dict], int]:
    """Rows of a CSV as dicts; returns (rows, undecodable_rows). Structural problems are UserErrors."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    raw = path.read_bytes()
    try:
        text, bad = raw.decode("utf-8-sig"), 0
    except UnicodeDecodeError:  # keep the rows, replace the bytes, and say so in the report
        text = raw.decode("utf-8-sig", errors="replace")
        bad = 1
    if not text.strip():
        raise UserError(f"{path}: file is empty (expected a header with columns {', '.join(required)})")
    # Strict parsing, and a row with more fields than the header is an error, not a guess: an unquoted comma
    # (`p1,I cannot sleep, I wake at 3am`) would otherwise cut the text, and an unclosed quote would swallow
    # the rows after it into one post. Either one means the file is not what it claims, and a drop of the
    # row would hide that: real ReDSM5 texts are quoted, so the fix is on the file's side.
    reader, start = csv.reader(io.StringIO(text, newline=""), strict=True), 1
    try:
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise UserError(f"{path}: missing column '{missing[0]}' (found: {', '.join(header)})")
        rows, start = [], reader.line_num + 1
        for fields in reader:
            if not fields:  # a blank line, as csv.DictReader skips it
                start = reader.line_num + 1
                continue
            if len(fields) > len(header):
                raise UserError(f"{path}: line {start}: {len(fields)} fields where the header has {len(header)} "
                                "(an unquoted comma in a text? quote the field)")
            rows.append(dict(zip(header, fields + [""] * (len(header) - len(fields)))))
            start = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"{path}: malformed CSV at line {start} ({e}; "
                        "an unclosed quote?)") from None
    if bad:
        bad = sum("\ufffd" in "".join(r.values()) for r in rows)
    return rows, bad


def find_files(data_dir: str | Path) -> tuple[Path, Path]:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: data directory not found")
    for posts, annotations in FILE_PAIRS:
        if (data_dir / posts).exists() or (data_dir / annotations).exists():
            return data_dir / posts, data_dir / annotations
    names = " or ".join(f"{p} + {a}" for p, a in FILE_PAIRS)
    raise UserError(f"{data_dir}: no ReDSM5 files found (expected {names})")


@dataclass
class Corpus:
    posts: dict[str, str]  # post_id -> text
    rows: list[dict]  # kept annotation rows, with aligned char spans where alignment succeeded
    report: dict = field(default_factory=dict)

    def positives(self) -> dict[tuple[str, str], list[dict]]:
        """(post_id, symptom) -> its status-1 rows: the evidence of that pair."""
        out = defaultdict(list)
        for r in self.rows:
            if r["status"] == 1:
                out[(r["post_id"], r["symptom"])].append(r)
        return out


def load_corpus_from_config(cfg, data_dir=...) -> Corpus:
    """The corpus a config names (its data_dir, or the demo corpus it describes); `data_dir` overrides."""
    return load_corpus(cfg.data_dir if data_dir is ... else data_dir, demo_posts=cfg.demo_posts,
                       demo_seed=cfg.demo_seed, include_special_case=cfg.include_special_case,
                       fuzzy_threshold=cfg.fuzzy_threshold)


def load_corpus(data_dir=None, *, demo_posts=1000, demo_seed=0, include_special_case=False,
                fuzzy_threshold=0.3) -> Corpus:
    """Load and validate a ReDSM5 folder (or generate the demo corpus); log one report."""
    if data_dir is None:
        post_rows, ann_rows = make_demo(demo_posts, demo_seed)
        source, bad_bytes = f"demo corpus (synthetic, {demo_posts} posts, seed {demo_seed})", 0
    else:
        posts_path, ann_path = find_files(data_dir)
        post_rows, bad_posts = read_csv(posts_path, POST_COLUMNS)
        ann_rows, bad_ann = read_csv(ann_path, ANNOTATION_COLUMNS)
        source, bad_bytes = str(data_dir), bad_posts + bad_ann
    return build_corpus(post_rows, ann_rows, source=source, include_special_case=include_special_case,
                        fuzzy_threshold=fuzzy_threshold, undecodable_rows=bad_bytes)


_INVISIBLE = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))  # zero-width and soft-hyphen


def visible(text: str) -> bool:
    """Whether a text has anything to read: zero-width characters alone give a tokenizer no token."""
    return bool(text.translate(_INVISIBLE).strip())


def valid_posts(post_rows: list[dict], dropped: Counter) -> dict[str, str]:
    """post_id -> text; the first copy of a duplicated id wins, every other row dropped is counted."""
    posts = {}
    for r in post_rows:
        pid, text = r.get("post_id", "").strip(), r.get("text", "")
        if not pid:
            dropped["post: missing post_id"] += 1
        elif pid in posts:
            dropped["post: duplicate post_id"] += 1
        elif not visible(text):
            dropped["post: empty text"] += 1
        else:
            posts[pid] = text
    return posts


def annotation_problem(r: dict, label: str, status, posts: dict, symptoms: set) -> str | None:
    """Why an annotation row is dropped, or None to keep it."""
    if label == SPECIAL_CASE and SPECIAL_CASE not in symptoms:
        return "annotation: SPECIAL_CASE (ignored by default)"
    if label not in symptoms:
        return f"annotation: unknown symptom label {label!r}"
    if status is None:
        return f"annotation: status not 0/1 ({r['status']!r})"
    if r["post_id"].strip() not in posts:
        return "annotation: post missing or empty"
    if not r["sentence_text"].strip():
        return "annotation: empty sentence_text"
    return None


def valid_annotations(ann_rows: list[dict], posts: dict, symptoms: set, dropped: Counter) -> tuple[list, int, int]:
    """(kept rows, labels fixed, conflicting duplicates). A duplicate (post, sentence, symptom) is counted;
    when its copies disagree, evidence wins."""
    kept: dict[tuple, dict] = {}
    fixed_labels = conflicts = 0
    for r in ann_rows:
        pid, label = r["post_id"].strip(), r["DSM5_symptom"].strip().upper()
        if label in LABEL_FIXES:
            label, fixed_labels = LABEL_FIXES[label], fixed_labels + 1
        status = {"1": 1, "0": 0, "1.0": 1, "0.0": 0}.get(str(r["status"]).strip())
        problem = annotation_problem(r, label, status, posts, symptoms)
        if problem:
            dropped[problem] += 1
            continue
        # a blank sentence_id must not make every such sentence of the post one duplicate: key it by its text
        sentence_key = r["sentence_id"].strip() or "text:" + " ".join(r["sentence_text"].split())
        key = (pid, sentence_key, label)
        if key in kept:
            dropped["annotation: duplicate (post, sentence, symptom)"] += 1
            if kept[key]["status"] != status:
                conflicts += 1
                kept[key]["status"] = 1
            continue
        kept[key] = {"post_id": pid, "sentence_id": r["sentence_id"].strip(), "sentence_text": r["sentence_text"],
                     "symptom": label, "status": status}
    return list(kept.values()), fixed_labels, conflicts


def align_rows(rows: list[dict], posts: dict, fuzzy_threshold: float) -> Counter:
    """Set each row's start/end/align in its post; the count per alignment method."""
    alignment, cache = Counter(), {}
    for r in rows:
        ck = (r["post_id"], r["sentence_text"])
        if ck not in cache:
            cache[ck] = align_sentence(r["sentence_text"], posts[r["post_id"]], fuzzy_threshold)
        r["start"], r["end"], r["align"] = cache[ck]
        alignment[r["align"]] += 1
    return alignment


def build_corpus(post_rows, ann_rows, *, source="", include_special_case=False, fuzzy_threshold=0.3,
                 undecodable_rows=0) -> Corpus:
    """Validate raw rows into a Corpus. Every dropped row is counted under a reason."""
    dropped = Counter()
    posts = valid_posts(post_rows, dropped)
    symptoms = set(SYMPTOMS) | ({SPECIAL_CASE} if include_special_case else set())
    rows, fixed_labels, conflicts = valid_annotations(ann_rows, posts, symptoms, dropped)
    alignment = align_rows(rows, posts, fuzzy_threshold)
    annotated = {r["post_id"] for r in rows}
    report = {
        "source": source,
        "posts_read": len(post_rows),
        "posts_kept": len(posts),
        "posts_without_annotations": len(set(posts) - annotated),
        "annotations_read": len(ann_rows),
        "annotations_kept": len(rows),
        "dropped": dict(sorted(dropped.items())),
        "labels_fixed": fixed_labels,
        "conflicting_duplicates_resolved_to_1": conflicts,
        "undecodable_rows_kept_with_replacement_chars": undecodable_rows,
        "per_symptom": {s: {"status_1": sum(r["status"] == 1 and r["symptom"] == s for r in rows),
                            "status_0": sum(r["status"] == 0 and r["symptom"] == s for r in rows)}
                        for s in sorted(symptoms)},
        "alignment": {m: alignment[m] for m in ("exact", "normalized", "fuzzy", "unaligned")},
    }
    return Corpus(posts, rows, report)


def format_report(report: dict) -> str:
    lines = [f"data: {report['source']}",
             f"  posts: {report['posts_read']} read, {report['posts_kept']} kept "
             f"({report['posts_without_annotations']} without annotations)",
             f"  annotations: {report['annotations_read']} read, {report['annotations_kept']} kept"]
    lines += [f"  dropped {n:>5}  {why}" for why, n in report["dropped"].items()]
    for key in ("labels_fixed", "conflicting_duplicates_resolved_to_1", "undecodable_rows_kept_with_replacement_chars"):
        if report[key]:
            lines.append(f"  {key.replace('_', ' ')}: {report[key]}")
    lines.append("  sentences aligned to their post: " + ", ".join(f"{k} {v}" for k, v in report["alignment"].items()))
    lines.append("  per symptom (status 1 / 0): " + ", ".join(
        f"{s} {c['status_1']}/{c['status_0']}" for s, c in report["per_symptom"].items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------- alignment

_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|\n+")
_WORD = re.compile(r"[\w']+")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Char spans of the sentences of `text` (split after . ! ? and at line breaks)."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if text[start : m.start()].strip():
            spans.append((start, m.start()))
        start = m.end()
    if text[start:].strip():
        spans.append((start, len(text.rstrip())))
    return spans


def _normalized(text: str) -> tuple[str, list[int]]:
    """Lower-cased text with whitespace runs collapsed, and each kept char's index in `text`."""
    chars, index = [], []
    for i, c in enumerate(text):
        if c.isspace():
            if chars and chars[-1] == " ":
                continue
            c = " "
        chars.append(c.lower())
        index.append(i)
    return "".join(chars), index


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def align_sentence(sentence: str, post: str, threshold: float) -> tuple[int, int, str]:
    """(start, end, method) of `sentence` in `post`: exact, then normalized, then fuzzy best sentence."""
    sentence = sentence.strip()
    start = post.find(sentence)
    if start >= 0:
        return start, start + len(sentence), "exact"
    norm_post, index = _normalized(post)
    norm_sent = _normalized(sentence)[0].strip()
    at = norm_post.find(norm_sent)
    if at >= 0 and norm_sent:
        return index[at], index[at + len(norm_sent) - 1] + 1, "normalized"
    best, best_span, words = 0.0, None, _words(sentence)
    for s, e in sentence_spans(post):  # paraphrases keep words more than characters: compare word lists
        matcher = difflib.SequenceMatcher(None, words, _words(post[s:e]), autojunk=False)
        if matcher.real_quick_ratio() > best and matcher.quick_ratio() > best and matcher.ratio() > best:
            best, best_span = matcher.ratio(), (s, e)
    if best_span and best >= threshold:
        return best_span[0], best_span[1], "fuzzy"
    return -1, -1, "unaligned"


# --------------------------------------------------------------------------- splits

def post_strata(corpus: Corpus, post_ids: list[str]) -> list[str]:
    """Stratification key of each post: its rarest positive symptom ('none' without one)."""
    freq = Counter(r["symptom"] for r in corpus.rows if r["status"] == 1)
    per_post = defaultdict(set)
    for r in corpus.rows:
        if r["status"] == 1:
            per_post[r["post_id"]].add(r["symptom"])
    keys = [min(per_post[p], key=lambda s: (freq[s], s)) if per_post[p] else "none" for p in post_ids]
    counts = Counter(keys)  # a stratum too small to split becomes part of one 'rare' stratum
    return [k if counts[k] >= 10 else "rare" for k in keys]


def split_posts(corpus: Corpus, seed: int, val_ratio: float = 0.1, test_ratio: float = 0.1) -> dict[str, list[str]]:
    """Post ids per split: no post in two splits, stratified by the post's symptom profile."""
    from sklearn.model_selection import train_test_split

    ids = sorted(corpus.posts)
    n_holdout = max(2, round(len(ids) * (val_ratio + test_ratio))) if val_ratio + test_ratio > 0 else 0
    if len(ids) < n_holdout + 2:
        raise UserError(f"only {len(ids)} usable posts: too few to split into train/val/test")

    def split(items, n_second, seed):
        strata = post_strata(corpus, items)
        try:
            return train_test_split(items, test_size=n_second, random_state=seed, stratify=strata)
        except ValueError:  # too few posts per stratum (tiny corpora): an unstratified split
            return train_test_split(items, test_size=n_second, random_state=seed)

    train, holdout = split(ids, n_holdout, seed)
    n_test = max(1, round(n_holdout * test_ratio / (val_ratio + test_ratio)))
    val, test = split(holdout, n_test, seed) if n_holdout - n_test > 0 else ([], holdout)
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def kfold_splits(corpus: Corpus, k: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """(train ids, held-out ids) per fold; folds are by post and stratified like `split_posts`."""
    from sklearn.model_selection import StratifiedKFold

    ids = sorted(corpus.posts)
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(ids, post_strata(corpus, ids))
    return [([ids[i] for i in tr], [ids[i] for i in te]) for tr, te in folds]


def load_splits(path: str | Path, corpus: Corpus) -> dict[str, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: splits file not found")
    try:
        splits = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(splits, dict) or not all(isinstance(splits.get(k), list) for k in ("train", "val", "test")):
        raise UserError(f"{path}: expected lists 'train', 'val' and 'test' of post ids")
    seen = {}
    for name in ("train", "val", "test"):
        for pid in splits[name]:
            if pid in seen:
                raise UserError(f"{path}: post {pid!r} is in both '{seen[pid]}' and '{name}'")
            seen[pid] = name
    missing = [p for p in seen if p not in corpus.posts]
    if missing:
        log.warning("%s: %d post ids are not in the corpus and are skipped", path, len(missing))
    return {k: [p for p in splits[k] if p in corpus.posts] for k in ("train", "val", "test")}


# --------------------------------------------------------------------------- examples per task

def sentence_examples(corpus: Corpus, post_ids) -> list[dict]:
    """criteria, unit=sentence: one (criterion, sentence) example per annotation row."""
    keep = set(post_ids)
    return [{"post_id": r["post_id"], "criterion": r["symptom"], "sentence_id": r["sentence_id"],
             "text": r["sentence_text"], "label": r["status"], "spans": []}
            for r in corpus.rows if r["post_id"] in keep]


def post_examples(corpus: Corpus, post_ids, require_evidence: bool = False) -> list[dict]:
    """(criterion, post) examples, every post x 9 criteria; `spans` are the aligned evidence sentences.

    With `require_evidence` (evidence task without negatives) only pairs with a usable span are kept.
    """
    positives = corpus.positives()
    out = []
    for pid in post_ids:
        for symptom in SYMPTOMS:
            rows = positives.get((pid, symptom), [])
            spans = sorted({(r["start"], r["end"]) for r in rows if r["start"] >= 0})
            if require_evidence and not spans:
                continue
            out.append({"post_id": pid, "criterion": symptom, "text": corpus.posts[pid],
                        "label": int(bool(rows)), "spans": spans})
    return out


def span_usability(corpus: Corpus, post_ids) -> dict:
    """How many positive (post, criterion) pairs have at least one aligned span (for the report)."""
    keep, positives = set(post_ids), corpus.positives()
    pairs = [rows for (pid, _), rows in positives.items() if pid in keep]
    usable = sum(any(r["start"] >= 0 for r in rows) for rows in pairs)
    return {"positive_pairs": len(pairs), "with_aligned_span": usable, "without_span_dropped": len(pairs) - usable}


# --------------------------------------------------------------------------- features

def featurize(tokenizer, examples: list[dict], max_length: int, doc_stride: int, windows: bool) -> list[dict]:
    """Tokenise (criterion description, text) pairs into model inputs.

    With `windows`, a long text becomes overlapping windows (`doc_stride` tokens of overlap;
    only the text is truncated), each with char offsets of its text tokens, the span target
    (first gold span wholly inside the window, else the null position 0) and a window label
    (1 if the pair is positive and the window holds evidence, or the pair has no usable span).
    """
    # Checked here: the tokenizer itself raises a bare Exception (no room) or panics (stride >= room).
    longest = max((len(tokenizer(CRITERIA[c], add_special_tokens=False)["input_ids"])
                   for c in {e["criterion"] for e in examples}), default=0)
    room = max_length - longest - tokenizer.num_special_tokens_to_add(pair=True)
    if room <= (doc_stride if windows else 0):
        stride = f", not more than --doc_stride {doc_stride}" if windows else ""
        raise UserError(f"--max_length {max_length}: leaves {room} text tokens beside the longest criterion "
                        f"description ({longest} tokens){stride}")
    enc = tokenizer([CRITERIA[e["criterion"]] for e in examples], [e["text"] for e in examples],
                    truncation="only_second", max_length=max_length, stride=doc_stride if windows else 0,
                    return_overflowing_tokens=windows, return_offsets_mapping=windows,
                    return_token_type_ids="token_type_ids" in tokenizer.model_input_names)
    features = []
    for i, ids in enumerate(enc["input_ids"]):
        example_idx = enc["overflow_to_sample_mapping"][i] if windows else i
        ex = examples[example_idx]
        f = {"idx": i, "input_ids": np.asarray(ids, dtype=np.int32), "example_idx": example_idx, "label": ex["label"],
             "criterion_id": SYMPTOMS.index(ex["criterion"])}
        if "token_type_ids" in enc:
            f["token_type_ids"] = np.asarray(enc["token_type_ids"][i], dtype=np.int8)
        if windows:
            text = np.array(enc.sequence_ids(i), dtype=float) == 1  # None (special tokens) -> nan
            ctx = np.flatnonzero(text)
            offsets = np.asarray(enc["offset_mapping"][i], dtype=np.int32).reshape(-1, 2)
            offsets[~text] = -1  # -1: not a text token
            f["offsets"] = offsets
            f["start"] = f["end"] = 0
            lo, hi = offsets[ctx[0], 0], offsets[ctx[-1], 1]
            inside = [(s, e) for s, e in ex["spans"] if lo <= s and e <= hi]
            if inside:
                s, e = inside[0]
                f["start"] = int(ctx[offsets[ctx, 0] <= s].max())  # the text token holding the span's first char
                f["end"] = int(ctx[offsets[ctx, 1] >= e].min())  # ... and its last
            f["label"] = int(bool(inside)) if ex["spans"] else ex["label"]
        features.append(f)
    if windows:
        check_windows_cover_texts(tokenizer, examples, features)
    return features


def check_windows_cover_texts(tokenizer, examples: list[dict], features: list[dict]) -> None:
    """Every text must reach its last token in some window. tokenizers 0.23.1 and 0.23.2 return at most
    two overflowing windows a text: the rest of a long post would silently never be read."""
    texts = sorted({e["text"] for e in examples})
    ends = {t: (o[-1][1] if o else 0) for t, o in zip(texts, tokenizer(  # verbose: no "longer than 512" warning
        texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"])}
    reached = defaultdict(int)
    for f in features:
        reached[f["example_idx"]] = max(reached[f["example_idx"]], int(f["offsets"][:, 1].max()))
    for i, ex in enumerate(examples):
        if reached[i] < ends[ex["text"]]:
            import tokenizers

            raise UserError(f"post {ex['post_id']}: its windows stop at character {reached[i]} of "
                            f"{ends[ex['text']]} (tokenizers {tokenizers.__version__} returns too few overflowing "
                            "windows; pip install -U 'tokenizers>=0.23.3')")


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest sequence (dynamic padding)."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        input_ids[i, : len(f["input_ids"])] = torch.from_numpy(f["input_ids"])
        attention_mask[i, : len(f["input_ids"])] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "labels": torch.tensor([f["label"] for f in features]),
             "feature_idx": torch.tensor([f["idx"] for f in features])}
    if "criterion_id" in features[0]:
        batch["criterion_ids"] = torch.tensor([f["criterion_id"] for f in features])
    if "token_type_ids" in features[0]:
        batch["token_type_ids"] = torch.zeros_like(input_ids)
        for i, f in enumerate(features):
            batch["token_type_ids"][i, : len(f["token_type_ids"])] = torch.from_numpy(f["token_type_ids"])
    if "offsets" in features[0]:  # which tokens belong to the post: the only ones a span may use
        batch["context_mask"] = torch.zeros_like(input_ids, dtype=torch.bool)
        for i, f in enumerate(features):
            batch["context_mask"][i, : len(f["offsets"])] = torch.from_numpy(f["offsets"][:, 0] >= 0)
    if "start" in features[0]:
        batch["start_positions"] = torch.tensor([f["start"] for f in features])
        batch["end_positions"] = torch.tensor([f["end"] for f in features])
    return batch


class LengthGroupedBatches(torch.utils.data.Sampler):
    """Shuffled batches of similar length: little padding, still random and seeded per epoch.

    Indices are shuffled, cut into groups of `group` batches, sorted by length inside a group,
    batched, and the batches shuffled again. With `shuffle=False` (evaluation) all features are
    sorted by length.
    """

    def __init__(self, lengths, batch_size: int, shuffle: bool, seed: int = 0, group: int = 50):
        self.lengths, self.batch_size, self.shuffle, self.seed, self.group = np.asarray(lengths), batch_size, shuffle, seed, group
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            yield from (order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size))
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        size = self.batch_size * self.group
        batches = []
        for g in range(0, len(order), size):
            chunk = order[g : g + size]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        for i in rng.permutation(len(batches)):
            yield batches[i]

    def __len__(self):
        return math.ceil(len(self.lengths) / self.batch_size)


def make_loader(features: list[dict], batch_size: int, shuffle: bool, pad_id: int, seed: int = 0, **kwargs):
    """DataLoader over pre-tokenised features: length-grouped (train) or length-sorted (eval) batches."""
    sampler = LengthGroupedBatches([len(f["input_ids"]) for f in features], batch_size, shuffle, seed)
    # A generator of its own: a new iterator then draws its base seed here, not from the global
    # RNG that dropout uses, so a resumed run sees the same dropout masks as an uninterrupted one.
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(features, batch_sampler=sampler, collate_fn=functools.partial(collate, pad_id=pad_id),
                                       generator=generator, **kwargs)


# --------------------------------------------------------------------------- demo corpus

DEMO_PHRASES = Path(__file__).resolve().parent / "configs" / "demo_corpus.yaml"


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def make_demo(n_posts: int = 1000, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Generate a SYNTHETIC corpus in the ReDSM5 format (template text, not real Reddit data).

    Returns (posts, annotations). posts: {"post_id", "text"}, the text being its sentences
    joined by single spaces. annotations: {"post_id", "sentence_id", "sentence_text",
    "DSM5_symptom", "status", "explanation"}, with sentence_id f"{post_id}_{i}" (i = 0-based
    sentence index) and status 1 for evidence, 0 for a hard negative (same topic, not
    evidence). About 25% of posts have no symptom, 30% carry 1-2 hard negatives, and post
    lengths have a long tail (~2% of posts have 150-500 sentences). Every sentence occurs
    once per post, so str.find locates sentence_text unambiguously. Deterministic in seed.
    """
    import yaml

    ph = yaml.safe_load(DEMO_PHRASES.read_text())
    symptoms, weights_of = ph["symptoms"], ph["weights"]
    ev_openers, neg_openers = ph["shared_openers"] + ph["evidence_openers"], ph["shared_openers"] + ph["negative_openers"]
    ev_tails, neg_tails = ph["shared_tails"] + ph["evidence_tails"], ph["shared_tails"] + ph["negative_tails"]
    rng = random.Random(seed)
    # All filler forms up front: one rng.sample per post is fast and distinct by construction.
    filler_pool = [_cap(o + c + t + p) for o, c, t, p in itertools.product(
        ph["filler_openers"], ph["filler_clauses"], ph["filler_tails"], ".!")]
    filler_pool = list(dict.fromkeys(filler_pool)) + ph["filler_questions"]
    names = list(symptoms)

    def sentence(openers: list[str], core: str, tails: list[str]) -> str:
        return _cap(rng.choice(openers) + core + rng.choice(tails) + rng.choice("...!"))

    posts, annotations = [], []
    width = max(5, len(str(n_posts - 1)))
    for p in range(n_posts):
        post_id = f"demo_{p:0{width}d}"
        rows = []  # (sentence, symptom, status, explanation)
        positives = []
        if rng.random() >= 0.25:
            pool, weights = names[:], [weights_of[s] for s in names]
            for _ in range(rng.choices((1, 2, 3, 4), weights=(45, 30, 17, 8))[0]):
                i = rng.choices(range(len(pool)), weights=weights)[0]
                positives.append(pool.pop(i))
                weights.pop(i)
        for sym in positives:
            cores, expl = symptoms[sym]["evidence"], symptoms[sym]["evidence_explanations"]
            # A doubled symptom takes two different cores, so neither sentence contains the other.
            for core in rng.sample(cores, 2 if rng.random() < 0.15 else 1):
                rows.append((sentence(ev_openers, core, ev_tails), sym, 1, rng.choice(expl)))
        if rng.random() < 0.30:
            # Hard negatives only for symptoms without evidence, so post-level labels stay clean.
            others = [s for s in names if s not in positives]
            for sym in rng.sample(others, rng.randint(1, 2)):
                cores, expl = symptoms[sym]["negative"], symptoms[sym]["negative_explanations"]
                rows.append((sentence(neg_openers, rng.choice(cores), neg_tails), sym, 0,
                             rng.choice(expl)))

        u = rng.random()
        n = rng.randint(150, 500) if u < 0.02 else rng.randint(20, 80) if u < 0.12 else rng.randint(3, 15)
        n = max(n, len(rows))
        sentences = rng.sample(filler_pool, n)
        # Uniform positions: evidence lands anywhere, including deep into long posts.
        positions = rng.sample(range(n), len(rows))
        for pos, (text, sym, status, expl) in sorted(zip(positions, rows)):
            sentences[pos] = text
            annotations.append({"post_id": post_id, "sentence_id": f"{post_id}_{pos}",
                                "sentence_text": text, "DSM5_symptom": sym, "status": status,
                                "explanation": expl})
        posts.append({"post_id": post_id, "text": " ".join(sentences)})
    return posts, annotations



def write_demo(out_dir: str | Path, n_posts: int, seed: int) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    posts, annotations = make_demo(n_posts, seed)
    for name, rows, cols in (("posts.csv", posts, POST_COLUMNS),
                             ("annotations.csv", annotations, ANNOTATION_COLUMNS + ["explanation"])):
        with open(out_dir / name, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=cols)
            writer.writeheader()
            writer.writerows(rows)


def main(argv=None):
    import argparse

    from utils import _Parser, setup_logging

    parser = _Parser(prog="data.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make_demo", metavar="DIR", help="write the synthetic demo corpus to DIR")
    parser.add_argument("--n_posts", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", help="print the load report of this ReDSM5 folder")
    parser.add_argument("--fuzzy_threshold", type=float, default=0.3)
    args = parser.parse_args(argv)
    setup_logging(True)
    if args.make_demo:
        write_demo(args.make_demo, args.n_posts, args.seed)
        log.info("wrote %d synthetic posts to %s", args.n_posts, args.make_demo)
    else:
        corpus = load_corpus(args.data_dir, fuzzy_threshold=args.fuzzy_threshold)
        log.info("\n%s", format_report(corpus.report))


if __name__ == "__main__":
    from utils import run_main

    run_main(main)
