from langchain_core.documents import Document

from rag_app.prompt import (
    NOT_FOUND,
    SYSTEM,
    asks_two_things,
    build_messages,
    fit_sources,
    parse_citations,
)


def _docs(n: int) -> list[Document]:
    return [Document(page_content=f"passage {i} " + "word " * 50,
                     metadata={"source": f"/d/f{i}.md", "page": i})
            for i in range(1, n + 1)]


def test_sources_are_numbered_with_file_and_page() -> None:
    msgs = build_messages("Why?", _docs(2))
    assert msgs[0] == {"role": "system", "content": SYSTEM}
    user = msgs[1]["content"]
    assert "[1] (f1.md, page 1)" in user and "[2] (f2.md, page 2)" in user
    assert user.startswith("Question: Why?") and "Question: Why?\nAnswer" in user
    assert NOT_FOUND in SYSTEM and "not instructions" in SYSTEM


def test_parse_citations_keeps_order_and_drops_unknown_numbers() -> None:
    text = "A [2]. B [1, 3]. C [7]. D [2-3]. E [0]."
    assert parse_citations(text, 3) == [2, 1, 3]
    # a range is clamped to the sources before it is walked (unclamped: 10^15 steps)
    assert parse_citations("[2-999999999999999] [0-1]", 4) == [2, 3, 4, 1]
    assert parse_citations("no citations", 3) == []


def test_fit_sources_drops_lowest_ranked_first_and_keeps_question() -> None:
    docs = _docs(4)

    def count(messages: list[dict]) -> int:
        return sum(len(m["content"].split()) for m in messages)

    full = count(build_messages("q", docs))
    kept = fit_sources("q", docs, count, full - 10)
    assert kept == docs[:3]
    assert fit_sources("q", docs, count, 5) == []


def test_follow_ups_are_condensed_with_the_previous_query() -> None:
    from rag_app.prompt import condense_question

    prev = ["Who introduced nucleus sampling?"]
    assert condense_question("And what does it keep?", prev) == (
        "Who introduced nucleus sampling? And what does it keep?")
    assert condense_question("What about SmolLM2?", ["How big is GPT-2's vocabulary?"]) \
        .startswith("How big is GPT-2's vocabulary?")
    standalone = "How many layers does GPT-2 small have?"
    assert condense_question(standalone, prev) == standalone
    assert condense_question("And what does it keep?", []) == "And what does it keep?"


def test_two_part_questions_are_told_from_one_part_questions() -> None:
    two = ["How many layers and what hidden size does GPT-2 small have?",
           "Who introduced nucleus (top-p) sampling, and in what year?",
           "What is the maximum sequence length, and what happens to text beyond it?"]
    one = ["Which retriever and generator did the original RAG system combine?",
           "Southern California's regions are divided culturally, politically and what "
           "other trait?", "How many tokens are in the GPT-2 vocabulary?"]
    assert all(asks_two_things(q) for q in two) and not any(asks_two_things(q) for q in one)
