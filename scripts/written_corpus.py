"""The written corpus (corpora/written): check its writers' drafts, build its two CSV files, print its statistics.

Writers draft posts in plain text, one batch file per sitting (DRAFTS/<writer>/*.txt):

    === POST w3_001
    meta: 19, college sophomore, r/college, lowercase run-ons
    <the post, exactly as posted; blank lines between paragraphs>
    === LABELS
    DEPRESSED_MOOD | 1 | <one whole sentence of the post, copied exactly> | <the annotator's explanation>
    SLEEP_ISSUES | 0 | <a sentence on the topic that is not evidence> | <why not>
    === END

    python scripts/written_corpus.py check --drafts DRAFTS [--writer w3]   # errors, quotas, shared 6-word runs
    python scripts/written_corpus.py build --drafts DRAFTS --out corpora/written
    python scripts/written_corpus.py stats --data_dir corpora/written      # the data card's table

A label's sentence must be one whole sentence as `alignment.sentence_spans` splits the post, so every row aligns
exactly; its `sentence_id` is `<post_id>_<index>` with that sentence's 0-based index (as in corpora/handwritten).
No stdlib-external import: it runs before the environment is installed.
"""
from __future__ import annotations

import argparse
import csv
import re
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from alignment import sentence_spans  # noqa: E402

SYMPTOMS = ["DEPRESSED_MOOD", "ANHEDONIA", "APPETITE_CHANGE", "SLEEP_ISSUES", "PSYCHOMOTOR", "FATIGUE",
            "WORTHLESSNESS", "COGNITIVE_ISSUES", "SUICIDAL_THOUGHTS"]
# ReDSM5 (Bao et al., 2025): positive posts per symptom among its 1,484 posts, and its other published figures.
REDSM5 = {"posts": 1484, "no_symptom": 392, "mean_words": 294.7, "max_words": 6990,
          "positives": {"DEPRESSED_MOOD": 328, "WORTHLESSNESS": 311, "SUICIDAL_THOUGHTS": 165, "FATIGUE": 124,
                        "ANHEDONIA": 124, "SLEEP_ISSUES": 102, "COGNITIVE_ISSUES": 59, "APPETITE_CHANGE": 44,
                        "PSYCHOMOTOR": 35}}
RUN = 6  # no run of this many words may appear in two posts
_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("\u2019", "'"))


def parse(path: Path) -> tuple[list[dict], list[str]]:
    """The posts of one draft file, and its errors ('file:line: what')."""
    posts, errors, cur, mode = [], [], None, None
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        where = f"{path}:{n}"
        if line.startswith("=== POST"):
            if cur is not None:
                errors.append(f"{where}: a new POST before the last one's === END")
            pid = line[len("=== POST"):].strip()
            if not re.fullmatch(r"w\d+_\d{3}", pid):
                errors.append(f"{where}: post id {pid!r} is not w<writer>_<3 digits>")
            cur, mode = {"post_id": pid, "meta": "", "text_lines": [], "labels": [], "where": where}, "text"
        elif cur is None:
            if line.strip():
                errors.append(f"{where}: text outside a POST block")
        elif line.startswith("=== LABELS"):
            mode = "labels"
        elif line.startswith("=== END"):
            cur["text"] = "\n".join(cur.pop("text_lines")).strip()
            posts.append(cur)
            cur, mode = None, None
        elif mode == "text":
            if not cur["text_lines"] and not cur["meta"] and line.startswith("meta:"):
                cur["meta"] = line[5:].strip()
            else:
                cur["text_lines"].append(line)
        elif mode == "labels" and line.strip():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) < 4:
                errors.append(f"{where}: a label needs 'SYMPTOM | status | sentence | explanation'")
                continue
            symptom, status, explanation, sentence = parts[0], parts[1], parts[-1], "|".join(parts[2:-1]).strip()
            if symptom not in SYMPTOMS:
                errors.append(f"{where}: unknown symptom {symptom!r}")
            if status not in ("0", "1"):
                errors.append(f"{where}: status {status!r} is not 0 or 1")
            if not explanation:
                errors.append(f"{where}: empty explanation")
            cur["labels"].append({"symptom": symptom, "status": status, "sentence": sentence,
                                  "explanation": explanation, "where": where})
    if cur is not None:
        errors.append(f"{path}: post {cur['post_id']} has no === END")
    for post in posts:
        spans = sentence_spans(post["text"])
        sentences = [post["text"][s:e] for s, e in spans]
        post["sentences"] = sentences
        if not post["text"]:
            errors.append(f"{post['where']}: empty post")
        seen = {}
        for lab in post["labels"]:
            s = lab["sentence"]
            if s in sentences:
                lab["index"] = sentences.index(s)
            else:
                hint = ""
                at = post["text"].find(s)
                if at >= 0:
                    parts = [x for (a, b), x in zip(spans, sentences) if a < at + len(s) and b > at]
                    hint = " the splitter cuts it as: " + " || ".join(repr(x) for x in parts)
                else:
                    hint = " (not in the post at all: copy it exactly)"
                errors.append(f"{lab['where']}: not one whole sentence of {post['post_id']}:{hint}")
                continue
            key = (lab["index"], lab["symptom"])
            if key in seen:
                errors.append(f"{lab['where']}: sentence {lab['index']} labelled twice for {lab['symptom']}")
            seen[key] = lab["status"]
    return posts, errors


def load_drafts(drafts: Path) -> tuple[list[dict], list[str]]:
    posts, errors = [], []
    for path in sorted(drafts.glob("*/*.txt")):
        p, e = parse(path)
        for post in p:
            post["writer"] = path.parent.name
        posts += p
        errors += e
    ids = Counter(p["post_id"] for p in posts)
    errors += [f"post id {pid} appears {n} times" for pid, n in ids.items() if n > 1]
    return posts, errors


def shared_runs(posts: list[dict]) -> dict[str, list[tuple[str, str]]]:
    """post_id -> [(other post_id, 'the six words')] for every RUN-word sequence found in two posts."""
    where = defaultdict(set)
    for p in posts:
        w = words(p["text"])
        for i in range(len(w) - RUN + 1):
            where[" ".join(w[i:i + RUN])].add(p["post_id"])
    out = defaultdict(list)
    for gram, ids in where.items():
        if len(ids) > 1:
            for pid in ids:
                out[pid] += [(other, gram) for other in sorted(ids - {pid})]
    return out


def summary(posts: list[dict]) -> dict:
    """The shape figures of a list of parsed posts (or of posts built from the CSV files)."""
    n = len(posts)
    lengths = sorted(len(p["text"].split()) for p in posts)
    pos = Counter()
    per_post, set_sizes, hard, multi = [], Counter(), 0, 0
    for p in posts:
        ev = defaultdict(set)
        for lab in p["labels"]:
            if lab["status"] == "1" and "index" in lab:
                ev[lab["symptom"]].add(lab["index"])
        for s in ev:
            pos[s] += 1
            set_sizes[min(len(ev[s]), 4)] += 1
        per_post.append(len(ev))
        hard += any(lab["status"] == "0" for lab in p["labels"])
        idx = Counter(lab["index"] for lab in p["labels"] if lab["status"] == "1" and "index" in lab)
        multi += any(c > 1 for c in idx.values())
    symptomatic = [k for k in per_post if k]
    pairs = sum(set_sizes.values())
    return {
        "posts": n, "no_symptom": n - len(symptomatic), "positives": pos, "pairs": pairs,
        "symptoms_per_symptomatic_post": sum(symptomatic) / max(len(symptomatic), 1),
        "symptoms_per_post_counts": Counter(per_post),
        "mean_words": statistics.mean(lengths) if lengths else 0,
        "median_words": statistics.median(lengths) if lengths else 0,
        "max_words": lengths[-1] if lengths else 0, "over_700": sum(x > 700 for x in lengths),
        "over_1500": sum(x > 1500 for x in lengths), "set_sizes": set_sizes, "hard_negative_posts": hard,
        "posts_with_a_sentence_for_two_symptoms": multi,
        "bands": Counter(next(b for b in BANDS if x <= b[1]) for x in lengths),
    }


BANDS = [(0, 80), (81, 180), (181, 350), (351, 700), (701, 1500), (1501, 10**6)]


def print_summary(s: dict, quota: dict | None = None) -> None:
    n = max(s["posts"], 1)
    print(f"posts {s['posts']}" + (f" (quota {quota['posts']})" if quota else ""))
    print(f"no symptom {s['no_symptom']} ({s['no_symptom'] / n:.1%}; target 25-30%)")
    print(f"posts with a hard negative (status-0 row) {s['hard_negative_posts']} ({s['hard_negative_posts'] / n:.1%};"
          " target >= 25%)")
    print(f"symptoms per symptomatic post {s['symptoms_per_symptomatic_post']:.2f} (target 1.0-1.2); "
          f"posts by number of symptoms {dict(sorted(s['symptoms_per_post_counts'].items()))}")
    print("positive posts per symptom:" + "".join(
        f"\n  {k:18s} {s['positives'][k]:4d}" + (f"  (quota {quota['symptoms'][k]})" if quota else "")
        for k in SYMPTOMS))
    sizes = s["set_sizes"]
    tot = max(sum(sizes.values()), 1)
    print("evidence sentences per (post, symptom): " + ", ".join(
        f"{k if k < 4 else '4+'}: {sizes[k]} ({sizes[k] / tot:.0%})" for k in (1, 2, 3, 4))
        + " (target about half 1, the rest 2-3)")
    print(f"words mean {s['mean_words']:.0f} (target 250-320) median {s['median_words']:.0f} (>= 150) "
          f"max {s['max_words']}; over 700: {s['over_700']} ({s['over_700'] / n:.1%}, >= 5%), "
          f"over 1500: {s['over_1500']} ({s['over_1500'] / n:.1%}, >= 1%)")
    print("length bands: " + ", ".join(f"{a}-{b if b < 10**6 else ''}: {s['bands'][(a, b)]}" for a, b in BANDS))


def check(args) -> int:
    posts, errors = load_drafts(Path(args.drafts))
    mine = [p for p in posts if args.writer is None or p["writer"] == args.writer]
    mine_errors = [e for e in errors if args.writer is None or f"/{args.writer}/" in e or e.startswith("post id")]
    print(f"== {len(mine)} posts of {args.writer or 'all writers'} ({len(posts)} in all drafts)")
    print(f"== {len(mine_errors)} errors")
    for e in mine_errors:
        print("  " + e)
    print("== shape")
    print_summary(summary(mine))
    steer(summary(mine))
    runs = shared_runs(posts)
    ids = {p["post_id"] for p in mine}
    hits = {pid: r for pid, r in runs.items() if pid in ids}
    print(f"== {sum(len(r) for r in hits.values())} shared {RUN}-word runs in {len(hits)} of these posts "
          "(rephrase the run in YOUR post)")
    for pid in sorted(hits):
        for other, gram in hits[pid][:20]:
            print(f"  {pid}: '{gram}' also in {other}")
    return 1 if mine_errors else 0


QUOTA = {"posts": 132, "DEPRESSED_MOOD": 29, "WORTHLESSNESS": 28, "SUICIDAL_THOUGHTS": 15, "FATIGUE": 11,
         "ANHEDONIA": 11, "SLEEP_ISSUES": 9, "COGNITIVE_ISSUES": 5, "APPETITE_CHANGE": 4, "PSYCHOMOTOR": 3}


def steer(s: dict) -> None:
    """Lines that tell a writer where its posts so far drift from the brief's shape (pro rata of 132 posts)."""
    n = s["posts"]
    if not n:
        return
    share = n / QUOTA["posts"]
    notes = []
    tot = max(sum(s["set_sizes"].values()), 1)
    if s["set_sizes"][1] / tot < 0.42:
        notes.append(f"only {s['set_sizes'][1] / tot:.0%} of your (post, symptom) pairs have ONE evidence sentence: "
                     "target about 50%; make most of your next pairs a single sentence")
    if s["mean_words"] < 270:
        notes.append(f"mean length {s['mean_words']:.0f} words is below the target (about 300): write the long posts "
                     "of the brief (351-700, 701-1500, 1501-2000 words) in your next batches")
    for k in SYMPTOMS:
        due = QUOTA[k] * share
        if s["positives"][k] < due - 2:
            notes.append(f"{k}: {s['positives'][k]} positive posts, {due:.0f} due by now (quota {QUOTA[k]})")
    if s["symptoms_per_symptomatic_post"] > 1.22:
        notes.append("too many posts with several symptoms: most symptomatic posts should show exactly one")
    for line in notes:
        print("!! " + line)


def build(args) -> int:
    posts, errors = load_drafts(Path(args.drafts))
    if errors:
        print("\n".join(errors[:50]) + f"\n{len(errors)} errors: nothing written", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    posts.sort(key=lambda p: (int(p["post_id"][1:].split("_")[0]), p["post_id"]))
    with open(out / "posts.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["post_id", "text"])
        w.writerows([p["post_id"], p["text"]] for p in posts)
    with open(out / "annotations.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["post_id", "sentence_id", "sentence_text", "DSM5_symptom", "status", "explanation"])
        for p in posts:
            for lab in sorted(p["labels"], key=lambda x: (x["index"], SYMPTOMS.index(x["symptom"]))):
                w.writerow([p["post_id"], f"{p['post_id']}_{lab['index']}", lab["sentence"], lab["symptom"],
                            lab["status"], lab["explanation"]])
    with open(out / "writers.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["post_id", "writer", "persona"])
        w.writerows([p["post_id"], p["writer"], p["meta"]] for p in posts)
    print(f"wrote {len(posts)} posts, {sum(len(p['labels']) for p in posts)} annotation rows to {out}")
    return 0


def read_corpus(data_dir: Path) -> list[dict]:
    """The posts of a built corpus folder, in the parsed-draft shape (labels with their sentence index)."""
    with open(data_dir / "posts.csv", newline="", encoding="utf-8") as f:
        posts = {r["post_id"]: {"post_id": r["post_id"], "text": r["text"], "labels": []} for r in csv.DictReader(f)}
    with open(data_dir / "annotations.csv", newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            posts[r["post_id"]]["labels"].append({"symptom": r["DSM5_symptom"], "status": r["status"],
                                                  "index": int(r["sentence_id"].rsplit("_", 1)[1])})
    return list(posts.values())


def stats(args) -> int:
    posts = read_corpus(Path(args.data_dir))
    s = summary(posts)
    n, r = s["posts"], REDSM5
    print("| | ReDSM5 (published) | this corpus |\n|---|---|---|")
    print(f"| posts | {r['posts']:,} | {n:,} |")
    print(f"| posts without a symptom | {r['no_symptom']} ({r['no_symptom'] / r['posts']:.1%}) | "
          f"{s['no_symptom']} ({s['no_symptom'] / n:.1%}) |")
    rp = sum(r["positives"].values())
    print(f"| positive (post, symptom) pairs | {rp:,} | {s['pairs']:,} |")
    print(f"| symptoms per symptomatic post | {rp / (r['posts'] - r['no_symptom']):.2f} | "
          f"{s['symptoms_per_symptomatic_post']:.2f} |")
    for k in sorted(SYMPTOMS, key=lambda k: -r["positives"][k]):
        share_r, share = r["positives"][k] / r["posts"], s["positives"][k] / n
        print(f"| {k} | {r['positives'][k]} ({share_r:.1%}) | {s['positives'][k]} ({share:.1%}, "
              f"{share / share_r - 1:+.0%} of ReDSM5's share) |")
    print(f"| words: mean / median / max | {r['mean_words']} / - / {r['max_words']:,} | {s['mean_words']:.1f} / "
          f"{s['median_words']:.0f} / {s['max_words']:,} |")
    print(f"| posts over 700 / 1,500 words | - | {s['over_700']} ({s['over_700'] / n:.1%}) / {s['over_1500']} "
          f"({s['over_1500'] / n:.1%}) |")
    sizes, tot = s["set_sizes"], max(s["pairs"], 1)
    print("| evidence sentences per pair: 1 / 2 / 3 / 4+ | - | " + " / ".join(
        f"{sizes[k]} ({sizes[k] / tot:.0%})" for k in (1, 2, 3, 4)) + " |")
    print(f"| posts with a hard negative (status-0 row) | - | {s['hard_negative_posts']} "
          f"({s['hard_negative_posts'] / n:.1%}) |")
    print(f"| posts with a sentence that is evidence for two symptoms | - | "
          f"{s['posts_with_a_sentence_for_two_symptoms']} |")
    runs = shared_runs(posts)
    grams = {g for r_ in runs.values() for _, g in r_}
    print(f"\n{RUN}-word runs shared by two or more posts: {len(grams)} (in {len(runs)} posts)")
    for g in sorted(grams)[:30]:
        print(f"  '{g}'")
    return 0


def blind(args) -> int:
    """The second annotator's files: n post ids drawn at random (seed) from all writers' planned ids, in groups of 10
    ordered by post number (the early ones are written first); a group's file, each sentence numbered as the splitter
    cuts it and no label, is written once all its posts exist. Run it again as the writers go on."""
    import random

    planned = [f"w{w}_{i:03d}" for w in range(1, args.writers + 1) for i in range(1, args.per_writer + 1)]
    picked = sorted(random.Random(args.seed).sample(planned, args.n), key=lambda pid: (pid.split("_")[1], pid))
    posts = {p["post_id"]: p for p in load_drafts(Path(args.drafts))[0]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for b in range(0, len(picked), 10):
        path, group = out / f"posts_{b // 10 + 1:02d}.txt", picked[b:b + 10]
        if path.exists() or not all(pid in posts for pid in group):
            continue
        with open(path, "w", encoding="utf-8") as f:
            for pid in group:
                f.write(f"=== POST {pid}\n" + "".join(f"[{i}] {x}\n" for i, x in enumerate(posts[pid]["sentences"])))
                f.write("=== END\n\n")
        print(f"wrote {path}")
    return 0


def read_answers(path: Path) -> dict[str, dict[str, set[int]]]:
    """post_id -> {symptom: sentence indices} from the second annotator's 'post_id | SYMPTOM | 0, 3' lines
    ('post_id | NONE' for a post with no symptom)."""
    out = {}
    for f in sorted(path.glob("answers_*.txt")):
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            parts = [x.strip() for x in line.split("|")]
            if len(parts) < 2 or not parts[0]:
                continue
            labels = out.setdefault(parts[0], {})
            if parts[1] == "NONE":
                continue
            if parts[1] not in SYMPTOMS:
                raise SystemExit(f"{f}:{n}: unknown symptom {parts[1]!r}")
            idx = {int(x) for x in re.findall(r"\d+", parts[2])} if len(parts) > 2 else set()
            labels.setdefault(parts[1], set()).update(idx)
    return out


def kappa(a: list[int], b: list[int]) -> float:
    """Cohen's kappa of two binary label lists."""
    n = len(a)
    po = sum(x == y for x, y in zip(a, b)) / n
    pa, pb = sum(a) / n, sum(b) / n
    pe = pa * pb + (1 - pa) * (1 - pb)
    return (po - pe) / (1 - pe) if pe < 1 else float("nan")


def agreement(args) -> int:
    """Per-symptom Cohen's kappa at the post level and agreement on evidence sentences, first annotation (the
    corpus) against the blind second one."""
    posts = {p["post_id"]: p for p in read_corpus(Path(args.data_dir))}
    second = read_answers(Path(args.answers))
    ids = sorted(set(second) & set(posts))
    print(f"posts compared: {len(ids)} (answers for {len(second)}; {len(set(second) - set(posts))} unknown ids)")
    first = {}
    for pid in ids:
        ev = defaultdict(set)
        for lab in posts[pid]["labels"]:
            if lab["status"] == "1":
                ev[lab["symptom"]].add(lab["index"])
        first[pid] = ev
    n_sent = {pid: len(sentence_spans(posts[pid]["text"])) for pid in ids}
    print("| symptom | first: posts | second: posts | both | kappa (post level) | sentence F1 where both | "
          "sentence kappa |\n|---|---|---|---|---|---|---|")
    all_a, all_b, sa_all, sb_all = [], [], [], []
    for s in SYMPTOMS:
        a = [int(s in first[p]) for p in ids]
        b = [int(s in second[p]) for p in ids]
        both = [p for p in ids if s in first[p] and s in second[p]]
        tp = sum(len(first[p][s] & second[p][s]) for p in both)
        den = sum(len(first[p][s]) + len(second[p][s]) for p in both)
        sa = [int(i in first[p].get(s, ())) for p in ids for i in range(n_sent[p])]
        sb = [int(i in second[p].get(s, ())) for p in ids for i in range(n_sent[p])]
        all_a += a
        all_b += b
        sa_all += sa
        sb_all += sb
        f1 = f"{2 * tp / den:.2f}" if den else "-"
        print(f"| {s} | {sum(a)} | {sum(b)} | {len(both)} | {kappa(a, b):.2f} | {f1} | {kappa(sa, sb):.2f} |")
    print(f"| all nine (pooled cells) | {sum(all_a)} | {sum(all_b)} | | {kappa(all_a, all_b):.2f} | | "
          f"{kappa(sa_all, sb_all):.2f} |")
    none_a = [int(not first[p]) for p in ids]
    none_b = [int(not second[p]) for p in ids]
    print(f"posts with no symptom: first {sum(none_a)}, second {sum(none_b)}, kappa {kappa(none_a, none_b):.2f}")
    if args.out:
        with open(args.out, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["post_id", "DSM5_symptom", "first_sentence_ids", "second_sentence_ids", "agree"])
            for p in ids:
                if not first[p] and not second[p]:  # both: no symptom (the post was compared all the same)
                    w.writerow([p, "NONE", "", "", "post and sentences"])
                for s in SYMPTOMS:
                    fa, sb = first[p].get(s), second[p].get(s)
                    if fa is None and sb is None:
                        continue
                    w.writerow([p, s, " ".join(f"{p}_{i}" for i in sorted(fa or ())),
                                " ".join(f"{p}_{i}" for i in sorted(sb or ())),
                                "post and sentences" if fa == sb else "post" if fa and sb else "no"])
        print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--drafts", required=True)
    c.add_argument("--writer")
    b = sub.add_parser("build")
    b.add_argument("--drafts", required=True)
    b.add_argument("--out", required=True)
    s = sub.add_parser("stats")
    s.add_argument("--data_dir", required=True)
    bl = sub.add_parser("blind")
    bl.add_argument("--drafts", required=True)
    bl.add_argument("--out", required=True)
    bl.add_argument("--n", type=int, default=150)
    bl.add_argument("--writers", type=int, default=8)
    bl.add_argument("--per_writer", type=int, default=132)
    bl.add_argument("--seed", type=int, default=0)
    ag = sub.add_parser("agreement")
    ag.add_argument("--data_dir", required=True)
    ag.add_argument("--answers", required=True)
    ag.add_argument("--out")
    args = ap.parse_args(argv)
    return {"check": check, "build": build, "stats": stats, "blind": blind, "agreement": agreement}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
