"""Pure evaluation metrics: passage-level retrieval (nDCG, recall, MRR at k) and SQuAD-style
answer metrics (exact match and token F1 with the official normalisation).

Rankings are lists of passage ids, best first. Relevance judgements (qrels) map a passage id
to a graded score; a score >= 1 means relevant, and nDCG uses the score as the gain (linear
gain, as `trec_eval` and BEIR do).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

from rag_app.citations import CITATION

Qrels = Mapping[str, int]  # passage id -> relevance score of one query

# -- retrieval -----------------------------------------------------------------------------


def collapse_to_passages(ids: Iterable[str]) -> list[str]:
    """Chunk-level ranking -> passage-level: each passage keeps the rank of its best chunk."""
    return list(dict.fromkeys(ids))


def relevant(qrels: Qrels) -> set[str]:
    return {pid for pid, score in qrels.items() if score >= 1}


def ndcg_at_k(ranking: Sequence[str], qrels: Qrels, k: int) -> float:
    """Normalised discounted cumulative gain of the top k (0 when nothing is relevant)."""
    gains = {pid: score for pid, score in qrels.items() if score >= 1}
    dcg = sum(gains.get(pid, 0) / math.log2(i + 2) for i, pid in enumerate(ranking[:k]))
    ideal = sorted(gains.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall_at_k(ranking: Sequence[str], qrels: Qrels, k: int) -> float:
    """Share of the relevant passages found in the top k (0 when nothing is relevant)."""
    rel = relevant(qrels)
    return len(rel.intersection(ranking[:k])) / len(rel) if rel else 0.0


def mrr_at_k(ranking: Sequence[str], qrels: Qrels, k: int) -> float:
    """Reciprocal rank of the first relevant passage within the top k, else 0."""
    rel = relevant(qrels)
    for i, pid in enumerate(ranking[:k]):
        if pid in rel:
            return 1.0 / (i + 1)
    return 0.0


def first_rank(ranking: Sequence[str], qrels: Qrels, k: int) -> int | None:
    """1-based rank of the first relevant passage within the top k, else None."""
    rel = relevant(qrels)
    return next((i + 1 for i, pid in enumerate(ranking[:k]) if pid in rel), None)


def hit_at_k(ranking: Sequence[str], qrels: Qrels, k: int) -> float:
    """1 when some relevant passage is in the top k (success@k), else 0: what matters when
    a question has one answer spread over overlapping chunks."""
    return 0.0 if first_rank(ranking, qrels, k) is None else 1.0


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def retrieval_metrics(runs: Sequence[tuple[Sequence[str], Qrels]]) -> dict[str, float]:
    """Mean nDCG@10, recall@1/5/10, MRR@10 and hit@1/4 (some relevant passage in the top 1,
    top 4: the passages the model is given by default) over (passage ranking, qrels) pairs."""
    return {
        "ndcg@10": mean(ndcg_at_k(r, q, 10) for r, q in runs),
        "recall@1": mean(recall_at_k(r, q, 1) for r, q in runs),
        "recall@5": mean(recall_at_k(r, q, 5) for r, q in runs),
        "recall@10": mean(recall_at_k(r, q, 10) for r, q in runs),
        "mrr@10": mean(mrr_at_k(r, q, 10) for r, q in runs),
        "hit@1": mean(hit_at_k(r, q, 1) for r, q in runs),
        "hit@4": mean(hit_at_k(r, q, 4) for r, q in runs),
    }


# -- answers (SQuAD v1.1 conventions) -------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lowercase, drop punctuation, drop the articles
    a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def strip_citations(text: str) -> str:
    """Remove citation markers such as [1] or [1, 2] so they do not count as answer tokens."""
    return CITATION.sub(" ", text)


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1 if the normalised prediction equals any normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:  # as in the SQuAD v2 script: both empty = match
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: Sequence[str]) -> float:
    """Token-overlap F1, the maximum over the gold answers."""
    return max((_f1(prediction, g) for g in golds), default=0.0)


def contains_gold(texts: Iterable[str], golds: Sequence[str]) -> bool:
    """Whether any text contains any gold answer, both normalised (substring match)."""
    norm_golds = [g for g in (normalize_answer(g) for g in golds) if g]
    norm_texts = [normalize_answer(t) for t in texts]
    return any(g in t for g in norm_golds for t in norm_texts)


def is_not_found(answer: str, found: bool, not_found_reply: str) -> bool:
    """A "not found" reply: nothing was retrieved, or the model said it could not answer."""
    return not found or normalize_answer(not_found_reply) in normalize_answer(answer)


def answer_metrics(results: Sequence[Mapping]) -> dict[str, float | int | None]:
    """Aggregate per-question results with keys `answer`, `golds` (empty for a question the
    documents cannot answer), `not_found`, `cited_texts` (texts of the sources the answer
    cites, or the grounded span's source) and optionally `matched_texts` (sources the app
    matched to uncited sentences) and `seconds`.

    Over the answerable questions: exact_match and f1 (a "not found" reply scores 0),
    contains_gold (the answer text holds a gold answer), false_refusals (share answered
    "not found"); over those answered: cited_contains_gold (the model's citations or the
    grounded source) and supported_contains_gold (with the matched sources). Over the
    unanswerable ones: refusal (share answered "not found"), None when there are none.
    """
    answerable = [r for r in results if r["golds"]]
    unanswerable = [r for r in results if not r["golds"]]
    answered = [r for r in answerable if not r["not_found"]]
    seconds = [r["seconds"] for r in results if r.get("seconds") is not None]
    return {
        "questions": len(answerable),
        "exact_match": mean(exact_match(strip_citations(r["answer"]), r["golds"])
                            for r in answerable),
        "f1": mean(token_f1(strip_citations(r["answer"]), r["golds"]) for r in answerable),
        "contains_gold": mean(float(contains_gold([strip_citations(r["answer"])], r["golds"]))
                              for r in answerable),
        "answered": len(answered),
        "cited_contains_gold": mean(float(contains_gold(r["cited_texts"], r["golds"]))
                                    for r in answered),
        "supported_contains_gold": mean(
            float(contains_gold([*r["cited_texts"], *r.get("matched_texts", [])], r["golds"]))
            for r in answered),
        "not_found": mean(float(r["not_found"]) for r in answerable),
        "false_refusals": mean(float(r["not_found"]) for r in answerable),
        "unanswerable": len(unanswerable),
        "refusal": (mean(float(r["not_found"]) for r in unanswerable)
                    if unanswerable else None),
        "seconds_per_question": mean(seconds) if seconds else None,
    }
