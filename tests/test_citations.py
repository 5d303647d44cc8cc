from rag_app.citations import content_words, match_sources, sentences

SOURCES = [
    "The Eiffel Tower is in Paris. It was completed in 1889 for the World's Fair.",
    "The Eiffel Tower is 330 metres tall and was built by Gustave Eiffel's company.",
    "Paris is the capital of France.",
]


def test_an_uncited_answer_is_matched_to_the_source_holding_its_words() -> None:
    answer = "The Eiffel Tower is 330 metres tall."
    assert match_sources(answer, "How tall is the Eiffel Tower?", SOURCES, [], 0.6) == [2]


def test_question_words_are_not_evidence() -> None:
    # "Eiffel Tower" is in the question (and in sources 1 and 2): only "1889" decides.
    answer = "The Eiffel Tower was completed in 1889."
    assert match_sources(answer, "When was the Eiffel Tower completed?", SOURCES, [],
                         0.6) == [1]


def test_cited_sentences_and_cited_sources_are_left_alone() -> None:
    q = "Tell me about the Eiffel Tower."
    assert match_sources("It is 330 metres tall [1].", q, SOURCES, [1], 0.6) == []
    # source 2 already cited elsewhere: not reported again as matched
    assert match_sources("It is 330 metres tall.", q, SOURCES, [2], 0.6) == []
    # two uncited sentences, two sources, in order of first match
    answer = "It was completed in 1889. It is 330 metres tall."
    assert match_sources(answer, q, SOURCES, [], 0.6) == [1, 2]


def test_unsupported_answers_match_nothing() -> None:
    answer = "The tower was painted blue by Napoleon."
    assert match_sources(answer, "Who painted it?", SOURCES, [], 0.6) == []
    assert match_sources("", "q", SOURCES, [], 0.6) == []
    assert match_sources("Yes.", "q", SOURCES, [], 0.6) == []
    assert match_sources("Anything at all.", "q", [], [], 0.6) == []


def test_words_and_sentences() -> None:
    assert content_words("The 3 tallest towers of a city") == {"3", "tallest", "towers", "city"}
    assert sentences("One. Two!\nThree?  ") == ["One.", "Two!", "Three?"]
