"""The error page: one self-contained HTML file (inline CSS, a few lines of inline JS, nothing fetched) of a split's
posts, the worst errors first, with each gold and predicted evidence sentence and symptom marked (hit, missed, false
alarm) and its probability. runner.py writes error_page.html for a run's test split; evaluate.py for any split:

    python evaluate.py --checkpoint outputs/run/checkpoints/best --html errors.html

Reading order: a decision's outcome and weight -> the marks of one prediction row -> posts as cards, worst first ->
the counts beside metrics.json's -> HTML. The page reads only the prediction rows (what predictions.jsonl holds) and
the examples' texts, and counts every decision that metrics.json scores, so its counts are metrics.json's.
"""
from __future__ import annotations

import collections
import html
import math
from pathlib import Path

from alignment import sentence_spans
from files import write_text_atomic

# the worst posts shown: a 200-post split then stays a few hundred KB; the rest are counted in a note
MAX_POSTS = 100
# unmarked sentences shown on either side of a marked one; longer unmarked runs fold into one line
CONTEXT = 1
# characters of a text shown where no sentence is marked (criteria --unit post), and of any one sentence
MAX_CHARS = 1200

# kind -> (symbol, what it means): the symbol keeps the page readable without its colours
KINDS = {"hit": ("✓", "hit: gold and predicted"), "missed": ("−", "missed: gold, not predicted"),
         "false_alarm": ("+", "false alarm: predicted, not gold"), "correct": ("·", "correct no: neither")}
WRONG = ("missed", "false_alarm")

Mark = collections.namedtuple("Mark", "level criterion kind prob where")  # level: "criteria" or "evidence"


def outcome(gold: bool, predicted: bool) -> str:
    """A decision as hit, missed, false_alarm or correct (a right "no")."""
    if gold:
        return "hit" if predicted else "missed"
    return "false_alarm" if predicted else "correct"


def error_weight(mark: Mark) -> float:
    """How wrong a decision is: the probability the model gave its wrong answer (p for a false alarm, 1 - p for a
    miss; 0 for a right one). A confident mistake weighs near 1, a coin toss 0.5: the page orders posts by it."""
    return {"missed": 1 - mark.prob, "false_alarm": mark.prob}.get(mark.kind, 0.0)


def sentence_prob(score, threshold: float) -> float:
    """A sentence's evidence score (decoding.sentence_scores) as a probability whose 0.5 is the decision threshold
    tuned on validation: sigmoid(score - threshold), so it reads like a classifier's probability at 0.5. A sentence
    that no window reads (score None or -inf) gets 0."""
    if score is None or not math.isfinite(score):
        return 0.0
    return 0.5 * (1 + math.tanh((score - threshold) / 2))  # sigmoid, without overflow


def row_marks(row: dict, threshold: float) -> list[Mark]:
    """The decisions of one prediction row: its classification (criteria, joint) and, for every sentence gold or
    predicted, its evidence decision. joint's evidence counts only on pairs with gold evidence, as metrics.json
    scores it (scoring.score_spans)."""
    marks = []
    if "prob" in row:
        kind = outcome(row["label"] == 1, row["pred"] == 1)
        marks.append(Mark("criteria", row["criterion"], kind, row["prob"], row.get("sentence_id")))
    if "gold_sentences" in row and ("prob" not in row or row["gold_texts"]):
        gold, pred = set(row["gold_sentences"]), set(row["pred_sentences"])
        for k in sorted(gold | pred):
            p = sentence_prob(row["sentence_scores"][k], threshold)
            marks.append(Mark("evidence", row["criterion"], outcome(k in gold, k in pred), p, k))
    return marks


def post_cards(predictions: list[dict], examples: list[dict], threshold: float = 0.0) -> list[dict]:
    """One card per post: its text (or its annotated sentences, criteria --unit sentence), its marks, the number of
    wrong decisions and their summed error_weight; worst first (weight, then count, then post_id)."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} prediction rows for {len(examples)} examples")
    cards = {}
    for row, ex in zip(predictions, examples):
        card = cards.setdefault(row["post_id"], {"post_id": row["post_id"], "text": "", "sentences": {}, "marks": []})
        if "sentence_id" in row:
            card["sentences"][row["sentence_id"]] = ex["text"]
        else:
            card["text"] = ex["text"]
        card["marks"] += row_marks(row, threshold)
    for card in cards.values():
        wrong = [m for m in card["marks"] if m.kind in WRONG]
        card["n_wrong"], card["error"] = len(wrong), sum(error_weight(m) for m in wrong)
    return sorted(cards.values(), key=lambda c: (-c["error"], -c["n_wrong"], c["post_id"]))


def decision_counts(cards: list[dict]) -> collections.Counter:
    """(level, kind) -> the number of such decisions over every card, shown or not."""
    return collections.Counter((m.level, m.kind) for card in cards for m in card["marks"])


def against_metrics(counts: collections.Counter, metrics: dict) -> list[str]:
    """Lines that set the page's counts beside metrics.json's numbers (they must agree: a test checks it)."""
    lines = []
    if any(level == "criteria" for level, _ in counts):
        tp, fn, fp, tn = (counts["criteria", k] for k in ("hit", "missed", "false_alarm", "correct"))
        lines.append(f"Symptom decisions: {tp} hits, {fn} missed, {fp} false alarms, {tn} correct no "
                     f"(metrics.json confusion_matrix [[tn, fp], [fn, tp]]: {metrics.get('confusion_matrix')}).")
    if any(level == "evidence" for level, _ in counts):
        tp, fn, fp = (counts["evidence", k] for k in ("hit", "missed", "false_alarm"))
        precision, recall = (tp / (tp + fp) if tp + fp else 0.0), (tp / (tp + fn) if tp + fn else 0.0)
        lines.append(f"Evidence sentences: {tp} hits, {fn} missed, {fp} false alarms: precision {precision:.4f}, "
                     f"recall {recall:.4f} (metrics.json sentence_precision {metrics.get('sentence_precision', 0):.4f}"
                     f", sentence_recall {metrics.get('sentence_recall', 0):.4f}).")
    return lines


# --------------------------------------------------------------------------- HTML

def esc(text) -> str:
    """Every text from the data (posts, ids, symptom names) goes through here: posts are user text."""
    return html.escape(str(text), quote=True)


def clip(text: str) -> str:
    """At most MAX_CHARS characters, saying how many more there are."""
    return text if len(text) <= MAX_CHARS else f"{text[:MAX_CHARS]} … ({len(text) - MAX_CHARS:,} more characters)"


def render_mark(m: Mark) -> str:
    symbol, meaning = KINDS[m.kind]
    return (f'<span class="mark {m.kind}" data-level="{m.level}" data-kind="{m.kind}" title="{meaning}">'
            f'{symbol} {esc(m.criterion)} <b>{m.prob:.2f}</b></span>')


def worst_kind(marks: list[Mark]) -> str:
    """The kind that colours a line: a miss over a false alarm over a hit."""
    kinds = {m.kind for m in marks}
    return next((k for k in ("missed", "false_alarm", "hit") if k in kinds), "correct")


def line(label, text: str, marks: list[Mark]) -> str:
    chips = "".join(render_mark(m) for m in marks)
    return (f'<li class="{worst_kind(marks)}"><span class="n">{esc(label)}</span>'
            f'<span class="t">{esc(clip(text))}</span>{chips}</li>')


def evidence_lines(text: str, marks: list[Mark]) -> list[str]:
    """The post's sentences (alignment.sentence_spans, the indices of gold_sentences / pred_sentences), each with its
    evidence marks; only marked sentences and CONTEXT around them, the other runs folded into a count."""
    spans, by_sentence = sentence_spans(text), collections.defaultdict(list)
    for m in marks:
        by_sentence[m.where].append(m)
    shown = {k + d for k in by_sentence for d in range(-CONTEXT, CONTEXT + 1)}
    lines, folded = [], 0
    for k, (a, b) in enumerate(spans):
        if k not in shown:
            folded += 1
            continue
        if folded:
            lines.append(f'<li class="fold">… {folded} unmarked sentence{"s" * (folded > 1)}</li>')
            folded = 0
        lines.append(line(k, text[a:b], by_sentence.get(k, [])))
    if folded:
        lines.append(f'<li class="fold">… {folded} unmarked sentence{"s" * (folded > 1)}</li>')
    return lines


def render_card(rank: int, card: dict) -> str:
    """One post: its rank and error weight, its symptom decisions (wrong and hits), then its text with the marks."""
    marks = card["marks"]
    post_level = [m for m in marks if m.level == "criteria" and m.where is None and m.kind != "correct"]
    evidence = [m for m in marks if m.level == "evidence"]
    if card["sentences"]:  # criteria --unit sentence: the annotated sentences, each with its decisions
        body = [line(sid, text, [m for m in marks if m.where == sid]) for sid, text in card["sentences"].items()]
    elif evidence:
        body = evidence_lines(card["text"], evidence)
    else:
        body = [f'<li class="text">{esc(clip(card["text"]))}</li>']
    symptoms = " ".join(sorted({m.criterion for m in marks if m.kind in WRONG}))
    head = (f'<h2>#{rank} <code>{esc(card["post_id"])}</code> <small>error weight {card["error"]:.2f}, '
            f'{card["n_wrong"]} wrong decision{"s" * (card["n_wrong"] != 1)}</small></h2>')
    verdicts = f'<p class="symptoms">symptoms: {"".join(render_mark(m) for m in post_level)}</p>' if post_level else ""
    return (f'<section class="card" data-symptoms="{esc(symptoms)}">{head}{verdicts}'
            f'<ol class="lines">{"".join(body)}</ol></section>')


CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1300px;padding:0 1em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em} h2{font-size:1.05em;margin:0 0 .4em} small{color:#666;font-weight:normal}
.about p{margin:.25em 0} .card{border:1px solid #ccc;border-radius:6px;padding:.6em .9em;margin:1em 0}
.lines{list-style:none;padding:0;margin:0} .lines li{padding:.2em .5em;border-left:5px solid #eee;margin:2px 0}
.lines .n{display:inline-block;min-width:2.2em;margin-right:.4em;color:#888;font-size:.85em}
.lines .t{margin-right:.5em} .lines li.text{border:0}
.lines li.hit{border-color:#2e8b57;background:#f1faf3} .lines li.missed{border-color:#c0392b;background:#fdf0ef}
.lines li.false_alarm{border-color:#7d3cbd;background:#f6f0fc} .lines li.fold{color:#888;font-style:italic}
.mark,.key{display:inline-block;border-radius:4px;padding:0 .45em;margin:1px 3px;font-size:.82em;white-space:nowrap}
.mark.hit,.key.hit{background:#cdeed6;color:#14532d} .mark.missed,.key.missed{background:#f9cfcb;color:#7f1d1d}
.mark.false_alarm,.key.false_alarm{background:#e6d6f7;color:#4c1d95}
.mark.correct,.key.correct{background:#eee;color:#555}
.symptoms{margin:.2em 0 .5em} .filters{background:#f6f6f6;padding:.5em .8em;border-radius:6px;margin:.8em 0}
.nohits .mark[data-kind=hit],.nohits .mark[data-kind=correct]{display:none}
"""

FILTER_JS = """
function applyFilters(){
  const s = document.getElementById('symptom').value;
  document.body.classList.toggle('nohits', document.getElementById('nohits').checked);
  for (const c of document.querySelectorAll('.card'))
    c.hidden = s !== '' && !c.dataset.symptoms.split(' ').includes(s);
}
"""


def legend() -> str:
    return " ".join(f'<span class="key {kind}">{symbol} {meaning}</span>' for kind, (symbol, meaning) in KINDS.items())


def about(cards: list[dict], n_shown: int, metrics: dict) -> list[str]:
    """The page's opening lines: what it shows, how it orders posts, what its numbers are, its counts."""
    n_wrong, counts = sum(1 for c in cards if c["n_wrong"]), decision_counts(cards)
    levels = {level for level, _ in counts}
    left_out = f", the {n_wrong - n_shown} least wrong left out" if n_wrong > n_shown else ""
    probability = {"criteria": "for a symptom, the classifier's probability (yes at p &ge; 0.5)",
                   "evidence": "for an evidence sentence, sigmoid(sentence score &minus; the sentence threshold tuned "
                               f"on validation, {metrics.get('sentence_threshold', 0.0):.4f}), so yes at p &ge; 0.5 "
                               "too (a pair with no sentence above it still gets its best one)"}
    lines = [f"{len(cards)} posts scored: {n_wrong} with at least one wrong decision, shown worst first ({n_shown} "
             f"shown{left_out}); {len(cards) - n_wrong} with none, not shown. Every row is in the split's predictions.",
             "<b>Worst first</b>: a post's <b>error weight</b> is the sum, over its wrong decisions, of the "
             "probability the model gave its wrong answer: p for a false alarm, 1 &minus; p for a miss. Ties: more "
             "wrong decisions first.",
             f"<b>p</b> is the probability of &quot;yes&quot;: {'; '.join(probability[k] for k in sorted(levels))}."]
    if len(levels) == 2:
        lines.append("Evidence is marked on the (post, symptom) pairs with gold evidence: the pairs that the "
                     "evidence metrics score.")
    return [*lines, *against_metrics(counts, metrics), f"Legend: {legend()}"]


def render_page(cards: list[dict], metrics: dict, title: str, max_posts: int = MAX_POSTS) -> str:
    """The whole page: what it shows and how it is ordered, the counts beside metrics.json's, the legend, the
    filters, then the cards of the posts with a wrong decision, worst first, at most `max_posts`. Non-ASCII characters
    are written as character references: the file is ASCII whatever the locale that writes it."""
    shown = [c for c in cards if c["n_wrong"]][:max_posts]
    options = "".join(f'<option value="{esc(s)}">{esc(s)}</option>'
                      for s in sorted({m.criterion for c in shown for m in c["marks"] if m.kind in WRONG}))
    filters = (f'<div class="filters">posts with a wrong <select id="symptom" onchange="applyFilters()">'
               f'<option value="">(any symptom)</option>{options}</select> decision &nbsp; <label><input '
               f'type="checkbox" id="nohits" onchange="applyFilters()"> hide hits and correct no</label></div>')
    cards_html = "\n".join(render_card(rank, card) for rank, card in enumerate(shown, 1))
    lines = "".join(f"<p>{p}</p>" for p in about(cards, len(shown), metrics))
    page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<style>{CSS}</style><script>{FILTER_JS}</script></head><body>\n<h1>{esc(title)}</h1>\n'
            f'<div class="about">{lines}</div>\n{filters}\n{cards_html}\n</body></html>\n')
    return page.encode("ascii", "xmlcharrefreplace").decode("ascii")


def write_error_page(path: Path, predictions: list[dict], examples: list[dict], metrics: dict, title: str) -> Path:
    """The error page of one scored split (scoring.evaluate's predictions, its examples, its metrics), written whole
    or not at all; returns its path."""
    cards = post_cards(predictions, examples, metrics.get("sentence_threshold", 0.0))
    write_text_atomic(Path(path), render_page(cards, metrics, title))
    return Path(path)
