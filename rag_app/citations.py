"""Pure functions: which sources support an answer the model did not cite.

Small local models often answer correctly from a source without writing its `[n]`. The app
then matches each uncited sentence of the answer to the source that contains most of its
words, and reports those sources as *matched* (never as the model's own citations).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# A citation: [n], [n, m], [n-m]; the one rule the prompt, citation matching and the
# metrics read answers by (group 1: the numbers)
CITATION = re.compile(r"\[(\d+(?:\s*[,;-]\s*\d+)*)\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"\w+")
_STOP_WORDS = (
    "a an the and or but if of to in on at by for with from as is are was were be been being "
    "it its this that these those there their they them he she his her we you your our i "
    "not no yes do does did done has have had can could will would should may might must "
    "what which who whom whose when where why how than then so such also very more most "
    "about into over under after before between during according "
    # words small models use to frame an answer, never evidence
    "answer answers question questions source sources document documents text passage "
    "context information provided given mentioned stated")
_STOP = frozenset(_STOP_WORDS.split())


def content_words(text: str) -> set[str]:
    """Lower-cased words that carry meaning: no stop words, no one-letter words (digits
    are kept: numbers are often the whole answer)."""
    return {w for w in _WORD.findall(text.lower())
            if w not in _STOP and (len(w) > 1 or w.isdigit())}


def sentences(answer: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(answer) if s.strip()]


def match_sources(answer: str, question: str, texts: Sequence[str], cited: Sequence[int],
                  min_overlap: float) -> list[int]:
    """Source numbers (1-based, in order of first match) supporting the uncited sentences.

    A sentence's evidence words are its content words not already in the question (those
    are in every retrieved source); it is matched to the source holding the largest share
    of them, the higher-ranked on a tie, if that share is at least `min_overlap`. Sentences
    that carry a citation, and sources already cited, are left alone.
    """
    asked = content_words(question)
    vocab = [content_words(t) for t in texts]
    matched: list[int] = []
    for sentence in sentences(answer):
        if CITATION.search(sentence):
            continue
        words = content_words(sentence)
        evidence = (words - asked) or words
        if not evidence:
            continue
        shares = [len(evidence & v) / len(evidence) for v in vocab]
        best = max(range(len(shares)), key=lambda i: (shares[i], -i), default=None)
        if best is None or shares[best] < min_overlap:
            continue
        n = best + 1
        if n not in cited and n not in matched:
            matched.append(n)
    return matched


def page_reference(page: int | None, label: str | None = None) -> str:
    """How a source's page is cited: "p. 25 (PDF page 29)" where the printed page label
    differs from the physical page, else "p. 29"; "" without a page."""
    if page is None:
        return ""
    if label and label != str(page):
        return f"p. {label} (PDF page {page})"
    return f"p. {page}"
