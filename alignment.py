"""Sentence splitting, and alignment of annotated sentences to character spans of their post.

`sentence_spans` splits a text into sentences; `align_sentence` finds one annotated sentence in its post (exact,
then up to case and whitespace, then the fuzzy best sentence); `align_rows` does it for a corpus' annotation rows,
once per (post, sentence). data.py's `build_corpus` calls it; decoding and evaluation split texts with
`sentence_spans`.
"""
from __future__ import annotations

import difflib
import functools
import re
from collections import Counter

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


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def _normalized_pattern(sentence: str) -> re.Pattern | None:
    """The sentence as a pattern that matches it in a post up to case and the length of its whitespace runs."""
    parts = sentence.split()
    return re.compile(r"\s+".join(map(re.escape, parts)), re.IGNORECASE) if parts else None


def _match_ratio(a: int, b: int, matches: int) -> float:
    return 2.0 * matches / (a + b) if a + b else 1.0  # difflib's ratio of `matches` common items


def align_sentence(sentence: str, post: str, threshold: float, split=None) -> tuple[int, int, str]:
    """(start, end, method) of `sentence` in `post`: exact, then normalized (case and whitespace runs), then the fuzzy
    best sentence of the post. `split`: sentence_spans, or a cached one (align_rows: once per post).

    Linear in the post: the normalized match is one regex search, and the fuzzy pass compares word counts before it
    builds a SequenceMatcher (a 50 MB post once took 47 s and 5.6 GB here, a char-by-char copy of it per sentence)."""
    sentence = sentence.strip()
    start = post.find(sentence)
    if start >= 0:
        return start, start + len(sentence), "exact"
    pattern = _normalized_pattern(sentence)
    m = pattern.search(post) if pattern else None
    if m:
        return m.start(), m.end(), "normalized"
    best, best_span, words = 0.0, None, _words(sentence)
    counts = Counter(words)
    for s, e in (split or sentence_spans)(post):
        # paraphrases keep words more than characters: compare word lists. The bounds difflib's real_quick_ratio
        # and quick_ratio give, computed here without a SequenceMatcher; the same choice as the matcher's own.
        other = _words(post[s:e])
        if _match_ratio(len(words), len(other), min(len(words), len(other))) <= best:
            continue
        avail, common = dict(counts), 0
        for w in other:
            n = avail.get(w, 0)
            if n > 0:
                avail[w], common = n - 1, common + 1
        if _match_ratio(len(words), len(other), common) <= best:
            continue
        ratio = difflib.SequenceMatcher(None, words, other, autojunk=False).ratio()
        if ratio > best:
            best, best_span = ratio, (s, e)
    if best_span and best >= threshold:
        return best_span[0], best_span[1], "fuzzy"
    return -1, -1, "unaligned"


def align_rows(rows: list[dict], posts: dict, fuzzy_threshold: float) -> Counter:
    """Set each row's start/end/align in its post; the count per alignment method."""
    alignment, cache, spans = Counter(), {}, {}

    def split(pid: str, text: str) -> list:  # a post's sentences, found once (the fuzzy pass needs them)
        if pid not in spans:
            spans[pid] = sentence_spans(text)
        return spans[pid]

    for r in rows:
        ck, pid = (r["post_id"], r["sentence_text"]), r["post_id"]
        if ck not in cache:
            cache[ck] = align_sentence(r["sentence_text"], posts[pid], fuzzy_threshold,
                                       functools.partial(split, pid))
        r["start"], r["end"], r["align"] = cache[ck]
        alignment[r["align"]] += 1
    return alignment
