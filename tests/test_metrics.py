"""Evaluation metrics against values computed by hand on tiny rankings and answers."""

import math

import pytest

from rag_app.metrics import (
    answer_metrics,
    collapse_to_passages,
    contains_gold,
    exact_match,
    first_rank,
    hit_at_k,
    is_not_found,
    mrr_at_k,
    ndcg_at_k,
    normalize_answer,
    recall_at_k,
    retrieval_metrics,
    strip_citations,
    token_f1,
)

RANKING = ["a", "b", "c", "d", "e"]
QRELS = {"b": 1, "d": 1, "x": 1, "c": 0}  # x is relevant but never retrieved; c is judged 0


def test_collapse_keeps_each_passage_at_its_best_chunk() -> None:
    assert collapse_to_passages(["p1", "p2", "p1", "p3", "p2"]) == ["p1", "p2", "p3"]


def test_recall_counts_relevant_passages_in_the_top_k() -> None:
    assert recall_at_k(RANKING, QRELS, 1) == 0.0
    assert recall_at_k(RANKING, QRELS, 2) == pytest.approx(1 / 3)
    assert recall_at_k(RANKING, QRELS, 5) == pytest.approx(2 / 3)
    assert recall_at_k(RANKING, QRELS, 10) == pytest.approx(2 / 3)
    assert recall_at_k(["c"], QRELS, 1) == 0.0  # score 0 is not relevant
    assert recall_at_k(RANKING, {"c": 0}, 5) == 0.0  # nothing relevant


def test_mrr_is_the_reciprocal_rank_of_the_first_relevant_within_k() -> None:
    assert mrr_at_k(RANKING, QRELS, 10) == 0.5
    assert mrr_at_k(RANKING, QRELS, 1) == 0.0
    assert mrr_at_k(["d", "b"], QRELS, 10) == 1.0
    assert mrr_at_k([], QRELS, 10) == 0.0


def test_ndcg_binary_by_hand() -> None:
    # DCG@5 = 1/log2(3) + 1/log2(5) = 1.061606; IDCG@5 (3 relevant) = 1 + 1/log2(3) + 1/2
    assert ndcg_at_k(RANKING, QRELS, 5) == pytest.approx(0.498189, abs=1e-6)
    assert ndcg_at_k(RANKING, QRELS, 1) == 0.0
    assert ndcg_at_k(["b", "d", "x"], QRELS, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["b"], {"b": 1}, 10) == 1.0
    # IDCG is capped at k: with k=1 one relevant passage in first place is perfect.
    assert ndcg_at_k(["d"], QRELS, 1) == 1.0


def test_ndcg_uses_the_qrels_score_as_gain() -> None:
    # DCG@2 = 1 + 2/log2(3); IDCG@2 = 2 + 1/log2(3)
    expected = (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert expected == pytest.approx(0.859719, abs=1e-6)
    assert ndcg_at_k(["b", "a"], {"a": 2, "b": 1}, 2) == pytest.approx(expected)


def test_retrieval_metrics_average_over_queries() -> None:
    runs = [(["b", "a"], {"b": 1}), (["a", "b"], {"b": 1})]
    out = retrieval_metrics(runs)
    assert out == pytest.approx({
        "ndcg@10": (1 + 1 / math.log2(3)) / 2, "recall@1": 0.5, "recall@5": 1.0,
        "recall@10": 1.0, "mrr@10": 0.75, "hit@1": 0.5, "hit@4": 1.0})


def test_hit_at_k_counts_a_query_once_whatever_its_relevant_passages() -> None:
    qrels = {"a": 1, "b": 1, "c": 0}
    assert first_rank(["c", "b", "a"], qrels, 10) == 2
    assert recall_at_k(["b", "x"], qrels, 1) == 0.5 and hit_at_k(["b", "x"], qrels, 1) == 1.0
    assert hit_at_k(["c", "x", "y", "z", "a"], qrels, 4) == 0.0  # graded 0 is not relevant
    assert first_rank(["x"], qrels, 10) is None


@pytest.mark.parametrize(("text", "expected"), [
    ("The  Cat!", "cat"),
    ("an apple, a pear and the plum.", "apple pear and plum"),
    ("Theory of the anthem", "theory of anthem"),  # articles only as whole words
    ("Levi's Stadium", "levis stadium"),
    ("  Santa\tClara\n", "santa clara"),
    ("A", ""),
    ("1,000 (approx.)", "1000 approx"),
])
def test_squad_normalisation(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_exact_match_after_normalisation() -> None:
    assert exact_match("the Santa Clara.", ["Santa Clara"]) == 1.0
    assert exact_match("Santa Clara, California", ["Santa Clara"]) == 0.0
    assert exact_match("Denver", ["Carolina", "Denver Broncos", "denver"]) == 1.0


def test_token_f1_is_the_max_over_gold_answers() -> None:
    # 4 predicted tokens, 2 shared with "santa clara": P = 1/2, R = 1, F1 = 2/3
    assert token_f1("in Santa Clara California", ["Denver", "Santa Clara"]) == pytest.approx(2 / 3)
    assert token_f1("x x y", ["x y y"]) == pytest.approx(2 / 3)  # counts clipped per token
    assert token_f1("Denver", ["Santa Clara"]) == 0.0
    assert token_f1("the", ["a"]) == 1.0  # both empty after normalisation
    assert token_f1("the", ["Denver"]) == 0.0


def test_citations_are_not_answer_tokens() -> None:
    assert strip_citations("Santa Clara [1]. Also [2, 3] and [1-2]") == \
        "Santa Clara  . Also   and  "
    assert exact_match(strip_citations("Santa Clara [1]."), ["Santa Clara"]) == 1.0


def test_contains_gold_is_a_normalised_substring() -> None:
    texts = ["The game was played at Levi's Stadium in Santa Clara."]
    assert contains_gold(texts, ["levis  stadium"])
    assert contains_gold(["nothing here", *texts], ["Denver", "SANTA CLARA"])
    assert not contains_gold(texts, ["Denver"])
    assert not contains_gold(texts, ["the"])  # empty after normalisation never matches
    assert not contains_gold([], ["Santa Clara"])


def test_not_found_replies() -> None:
    reply = "I could not find the answer in your documents."
    assert is_not_found(reply, True, reply)
    assert is_not_found("", False, reply)
    assert not is_not_found("Santa Clara [1].", True, reply)


def test_answer_metrics_by_hand() -> None:
    results = [
        {"answer": "Santa Clara [1].", "golds": ["Santa Clara"], "not_found": False,
         "cited_texts": ["Played in Santa Clara."]},
        {"answer": "The Broncos won in Denver [2].", "golds": ["Denver Broncos"],
         "not_found": False, "cited_texts": ["Something else."],
         "matched_texts": ["The Denver Broncos won."]},
        {"answer": "I could not find the answer in your documents.", "golds": ["Levi's"],
         "not_found": True, "cited_texts": [], "seconds": 3.0},
        # unanswerable: one refused, one answered anyway
        {"answer": "I could not find the answer in your documents.", "golds": [],
         "not_found": True, "cited_texts": [], "seconds": 1.0},
        {"answer": "Paris [1]", "golds": [], "not_found": False, "cited_texts": ["Paris"]},
    ]
    out = answer_metrics(results)
    # F1 of "broncos won in denver" vs "denver broncos": P = 2/4, R = 1 -> 2/3
    assert out == pytest.approx({
        "questions": 3, "exact_match": 1 / 3, "f1": (1 + 2 / 3 + 0) / 3, "answered": 2,
        "contains_gold": 1 / 3, "cited_contains_gold": 0.5, "supported_contains_gold": 1.0,
        "not_found": 1 / 3, "false_refusals": 1 / 3, "unanswerable": 2, "refusal": 0.5,
        "seconds_per_question": 2.0})
    assert answer_metrics([])["f1"] == 0.0 and answer_metrics([])["refusal"] is None
