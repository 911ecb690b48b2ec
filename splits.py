"""Which posts train, validate and test: by post (no post in two splits), stratified by the post's rarest positive
symptom, as one train/val/test split (`split_posts`), k folds (`kfold_splits`, `fold_splits` with a validation slice
of the other folds, what report.py cross-validates over) or a user's --splits_file (`load_splits`, checked whole).
"""
from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

from data import Corpus
from utils import UserError

log = logging.getLogger("redsm5")


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


def fold_splits(corpus: Corpus, k: int, seed: int, val_ratio: float = 0.1,
                test_ratio: float = 0.1) -> list[dict[str, list[str]]]:
    """{train, val, test} post ids per fold: test = fold k, val = a stratified slice of the other folds.
    k = 1: the usual split_posts split (every seed refits on it)."""
    from sklearn.model_selection import train_test_split

    if k == 1:
        return [split_posts(corpus, seed, val_ratio, test_ratio)]
    if not 2 <= k <= len(corpus.posts) // 2:
        raise UserError(f"--cv_folds: must be 1 or between 2 and {len(corpus.posts) // 2} (posts / 2), got {k}")
    largest = max(Counter(post_strata(corpus, sorted(corpus.posts))).values())
    if k > largest:  # scikit-learn's stratified folds need one group with a post for every fold
        raise UserError(f"--cv_folds: at most {largest} on this corpus (folds are stratified by symptom profile, "
                        f"and its largest group has {largest} posts), got {k}")
    n_val = max(1, round(val_ratio * len(corpus.posts)))
    folds = []
    for rest, test in kfold_splits(corpus, k, seed):
        try:
            fit, val = train_test_split(rest, test_size=n_val, random_state=seed,
                                        stratify=post_strata(corpus, rest))
        except ValueError:  # too few posts per stratum (tiny corpora): an unstratified slice
            fit, val = train_test_split(rest, test_size=n_val, random_state=seed)
        folds.append({"train": sorted(fit), "val": sorted(val), "test": sorted(test)})
    return folds


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
    for name in ("train", "val", "test"):
        bad = next((pid for pid in splits[name] if not isinstance(pid, str)), None)
        if bad is not None:
            raise UserError(f"{path}: '{name}' holds {bad!r}, not a post id (expected a list of strings)")
        if not splits[name]:
            raise UserError(f"{path}: '{name}' is empty (every split needs posts)")
    seen = {}
    for name in ("train", "val", "test"):
        for pid in splits[name]:
            if pid in seen:
                raise UserError(f"{path}: post {pid!r} is in both '{seen[pid]}' and '{name}'")
            seen[pid] = name
    unlisted = [p for p in corpus.posts if p not in seen]
    if unlisted:  # a split file of a corpus that has grown since would otherwise train on less, silently
        raise UserError(f"{path}: {len(unlisted)} of the corpus' {len(corpus.posts)} posts are in no split (first: "
                        f"{unlisted[0]!r}); they would silently go unused (a corpus that grew since the file was "
                        "made?): add them to a split, or drop --splits_file to split anew")
    missing = [p for p in seen if p not in corpus.posts]
    if missing:
        log.warning("%s: %d post ids are not in the corpus and are skipped", path, len(missing))
    out = {k: [p for p in splits[k] if p in corpus.posts] for k in ("train", "val", "test")}
    empty = next((k for k in out if not out[k]), None)
    if empty:
        raise UserError(f"{path}: none of the posts of '{empty}' is in the corpus (every split needs posts)")
    return out
