"""Grounded answers by construction: the model may only copy a span of a retrieved passage.

At every decoding step a transformers `LogitsProcessor` allows only the tokens that continue
some span of a passage's token ids (every position of every passage is a possible start),
the end of the answer once a span has begun, and the exact "not found" reply as one more
pseudo-passage. Any decoder that applies logits processors gets the rule: greedy, sampling
and beam search, in `generate` and in the fast CPU decoder alike. Because the answer is a
copy, where it came from is known exactly: `locate_span` finds the passage and the
character offsets of the copied text.

The processor is stateless: it re-derives the matching positions from each row's ids
(memoised), so beam hypotheses, which fork and die, need no bookkeeping.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from rag_app.citations import content_words

SPACE = "Ġ"  # byte-level BPE's leading-space marker


@dataclass(frozen=True)
class Grounding:
    """What a grounded answer may copy: the passages, in source order, and further allowed
    replies (the exact "not found" answer)."""

    passages: Sequence[str]
    extra: Sequence[str] = ()
    question: str = ""  # for generation.echo_penalty and generation.kind_bias
    # Per passage, the character ranges an answer may start in (generation.focus_sentences:
    # the sentences most about the question); None: anywhere.
    focus: Sequence[Sequence[tuple[int, int]]] | None = None


@dataclass(frozen=True)
class Span:
    """Where a grounded answer was copied from: source number n (1-based) and the
    character offsets [start, end) of the copied text in that source's text."""

    n: int
    start: int
    end: int
    text: str


@lru_cache(maxsize=4)
def token_bytes(tokenizer: PreTrainedTokenizerBase
                ) -> tuple[dict[bytes, int], dict[int, bytes], int]:
    """The bytes each ordinary token writes (special tokens left out), both ways, and the
    longest; computed once per tokenizer, not per answer.

    Byte-level BPE (GPT-2, Llama 3, SmolLM2) spells bytes with printable stand-ins ("Ġ" for
    a space); SentencePiece vocabularies use "▁" for a space and `<0xNN>` for raw bytes."""
    special = set(tokenizer.all_special_ids)
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    out: dict[bytes, int] = {}
    for tok, i in tokenizer.get_vocab().items():
        if i in special or not tok:
            continue
        if all(c in decoder for c in tok):
            raw = bytes(decoder[c] for c in tok)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
            raw = bytes([int(tok[3:5], 16)])
        else:
            raw = tok.replace("▁", " ").encode()
        out.setdefault(raw, i)
    return out, {i: b for b, i in out.items()}, max(map(len, out), default=1)


def _byte_ranges(text: str, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The character ranges of `text` as byte ranges of its collapsed form (a space, then
    its words joined by single spaces: `SpanIndex.data`), covering every word that starts
    in a range and the space before it."""
    out = []
    byte = 0  # where the next word's leading space is in the collapsed bytes
    words = [(m.start(), len(m.group().encode())) for m in re.finditer(r"\S+", text)]
    starts = []
    for char, size in words:
        starts.append((char, byte, byte + 1 + size))
        byte += 1 + size
    for a, b in ranges:
        inside = [(lo, hi) for char, lo, hi in starts if a <= char < b]
        if inside:
            out.append((inside[0][0], inside[-1][1]))
    return out


_JOINERS = frozenset(b"-,.'/:")


def _joined(d: bytes, o: int) -> bool:
    """Byte o continues a word joined by a hyphen, comma, point, apostrophe, slash or colon
    ("GPT-2", "50,257", "3.14", "Levi's"): not where an answer starts (the "2" of the
    question's "GPT-2"); no SQuAD-500 gold answer starts there."""
    return o >= 2 and d[o - 1] in _JOINERS and _wordish(d[o - 2])


def _wordish(byte: int) -> bool:
    """A letter or digit (any byte of a non-ASCII character counts as one)."""
    return byte >= 0x80 or chr(byte).isalnum()


class SpanIndex:
    """Matches a decoded answer against the passages byte by byte, whatever the tokens.

    `passages`: texts in source order; `extra`: further allowed texts (the "not found" reply).
    Texts are compared with their whitespace collapsed. An answer starts at a word of a
    passage (not inside "GPT-2" or "50,257"), with or without the space before it (a
    reply's first word has none, so its tokens differ from the passage's: "S" "anta"
    against " Santa"); every later token must
    continue the same text; it may end only where a word ends, so it never stops at "S".
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, passages: Sequence[str],
                 extra: Sequence[str] = (),
                 focus: Sequence[Sequence[tuple[int, int]]] | None = None) -> None:
        """`focus`: per passage, the character ranges of its text an answer may start in
        (see `focus_sentences`); the extra texts may always be copied."""
        self.data = [(" " + " ".join(t.split())).encode() for t in [*passages, *extra]]
        self.n_passages = len(passages)
        self.by_bytes, self._tokens, self.longest = token_bytes(tokenizer)
        self.start_at: list[tuple[int, int]] = []  # (text, byte offset) an answer may start at
        for t, d in enumerate(self.data):
            for o in range(1, len(d)):
                if _wordish(d[o]) and not _wordish(d[o - 1]) and not _joined(d, o) or (
                        d[o] != 0x20 and d[o - 1] == 0x20):
                    self.start_at.append((t, o))
                    if d[o - 1] == 0x20:
                        self.start_at.append((t, o - 1))
        if focus is not None:
            spans = [_byte_ranges(text, ranges)
                     for text, ranges in zip(passages, focus, strict=False)]
            kept = [(t, o) for t, o in self.start_at if t >= len(spans) or any(
                a <= o < b for a, b in spans[t])]
            if any(t < self.n_passages for t, _ in kept):  # else: nothing to focus on
                self.start_at = kept
        self._memo: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        self.first = torch.tensor(sorted(self._continuing(self.start_at)), dtype=torch.long)

    def _continuing(self, positions: Sequence[tuple[int, int]]) -> set[int]:
        """Tokens whose bytes come next at one of `positions`."""
        found = set()
        for t, o in positions:
            d = self.data[t]
            for n in range(1, min(self.longest, len(d) - o) + 1):
                tok = self.by_bytes.get(d[o:o + n])
                if tok is not None:
                    found.add(tok)
        return found

    def echo_starts(self, tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
        """First tokens that begin a word of the question (a content word, or the start of
        one: `Lev` of `Levi's`)."""
        words = content_words(question)
        out = []
        for tok in self.first.tolist():
            piece = re.sub(r"[^\w]", "", tokenizer.decode([tok]).lower())
            if piece and (piece in words or (len(piece) >= 3 and any(
                    w.startswith(piece) for w in words))):
                out.append(tok)
        return sorted(out)

    def kind_starts(self, tokenizer: PreTrainedTokenizerBase, kind: str) -> list[int]:
        """First tokens that begin an answer of `kind` ("number": a digit, a number word,
        a currency sign or a quantity's "over"/"about"; "date": a digit, a month, a day of
        the week, a season): see `answer_kind`."""
        out = []
        for tok in self.first.tolist():
            piece = tokenizer.decode([tok]).strip()
            word = piece.lower()
            if piece[:1].isdigit() or (kind == "number" and (
                    piece[:1] in "$£€" and piece or word in _NUMBER_WORDS)) or (
                    kind == "date" and len(word) >= 3 and any(
                        w.startswith(word) for w in _DATE_WORDS)):
                out.append(tok)
        return sorted(out)

    def matches(self, generated: tuple[int, ...]) -> list[tuple[int, int]]:
        """(text, byte offset after it) of every copy of `generated` in the texts."""
        if generated in self._memo:
            return self._memo[generated]
        raw = self._tokens.get(generated[-1]) if generated else b""
        if raw is None:  # a special token: never part of a copy
            found: list[tuple[int, int]] = []
        else:
            before = self.start_at if len(generated) == 1 else self.matches(generated[:-1])
            found = [(t, o + len(raw)) for t, o in before
                     if self.data[t].startswith(raw, o)]
        if len(self._memo) > 50_000:  # bounded: a long beam search cannot grow it forever
            self._memo.clear()
        self._memo[generated] = found
        return found

    def allowed(self, generated: tuple[int, ...]) -> list[int]:
        """The tokens that continue some copy of `generated` (none: the text is over)."""
        return sorted(self._continuing(self.matches(generated)))

    def at_word_end(self, generated: tuple[int, ...]) -> bool:
        """Some copy of `generated` ends where a word ends and it holds a word that carries
        meaning (the answer may stop here: never at "S" of "Santa", nor after "and")."""
        text = b"".join(self._tokens.get(i, b"") for i in generated)
        if not content_words(text.decode("utf-8", errors="ignore")):
            return False
        for t, o in self.matches(generated):
            d = self.data[t]
            if o >= len(d) or not _wordish(d[o]) or not _wordish(d[o - 1]):
                return True
        return False


_NUMBER_WORDS = frozenset((
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty",
    "ninety", "hundred", "hundreds", "thousand", "thousands", "million", "millions",
    "billion", "billions", "dozen", "dozens", "half", "several", "over", "about", "around",
    "nearly", "almost", "approximately", "roughly", "more", "less", "fewer"))
_DATE_WORDS = (
    "january", "february", "march", "april", "may", "june", "july", "august", "september",
    "october", "november", "december", "monday", "tuesday", "wednesday", "thursday",
    "friday", "saturday", "sunday", "spring", "summer", "autumn", "winter", "early", "late",
    "mid")
_KINDS = (
    ("date", re.compile(r"\b(when (did|was|were|is|does|do|will|had|has|are)|(what|which|in "
                        r"what|in which) (year|date|day|month|decade|century|season))\b",
                        re.IGNORECASE)),
    ("number", re.compile(r"\b(how (many|much|long|old|far|big|large|tall|high|often|fast|"
                          r"deep|wide)|(what|which) (percentage|percent|number|amount|"
                          r"proportion|share|fraction|population))\b", re.IGNORECASE)),
)


def answer_kind(question: str) -> str | None:
    """What the question asks for, where its words say so plainly: "date" ("When did…",
    "In what year…"), "number" ("How many…", "What percentage…"), else None."""
    for kind, pattern in _KINDS:
        if pattern.search(question):
            return kind
    return None


class GroundedLogitsProcessor(LogitsProcessor):
    """Masks every token that would leave the passages' spans.

    `prompt_len`: where the answer starts in each row of `input_ids`; `ends`: tokens that end
    the answer (end of sequence; the tuned model's " [" before its citation), allowed once a
    span has begun and forced when no span can go on. `first_bias`: (tokens, logits added)
    applied to the answer's first token only (the question-echo penalty, the answer-kind
    bias).
    """

    def __init__(self, index: SpanIndex, prompt_len: int, ends: Sequence[int],
                 eos: set[int], first_bias: Sequence[tuple[Sequence[int], float]] = ()
                 ) -> None:
        self.index = index
        self.first_bias = [(torch.tensor(sorted(toks), dtype=torch.long), delta)
                           for toks, delta in first_bias if delta and len(toks)]
        self.prompt_len = prompt_len
        self.ends = torch.tensor(sorted(set(ends) | eos), dtype=torch.long)
        self.brackets = set(ends) - eos
        self.eos = torch.tensor(sorted(eos), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor
                 ) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))  # (rows, V)
        for row in range(input_ids.shape[0]):
            generated = tuple(input_ids[row, self.prompt_len:].tolist())
            if not generated:
                allow = self.index.first
            elif generated[-1] in self.brackets:  # the span ended with " [": stop here
                allow = self.eos
            else:
                cont = self.index.allowed(generated)
                allow = torch.tensor(cont, dtype=torch.long)
                if not cont or self.index.at_word_end(generated):
                    allow = torch.cat([allow, self.ends])
            mask[row, allow] = 0.0
            if not generated:
                for toks, delta in self.first_bias:
                    mask[row, toks] += delta
        return scores + mask


def bracket_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that open a citation bracket: a model taught to cite writes " [" right after
    its answer, so in grounded mode they end the span."""
    return sorted(i for tok, i in tokenizer.get_vocab().items() if tok in ("[", SPACE + "["))


def strip_end(text: str) -> str:
    """The copied span without a trailing citation bracket the model opened to end it."""
    text = text.rstrip()
    return text[:-1].rstrip() if text.endswith("[") else text


_SENTENCE_END = re.compile(r"[.!?](?=[\s\"')\]]|$)|\n")


def to_sentence_end(span: Span, text: str, limit: int = 300) -> Span:
    """The span run on to the end of its sentence in `text` (its source's text), when that
    end is within `limit` characters: the whole statement a two-part question asks about
    ("12" -> "12 layers, hidden size 768, about 124M parameters")."""
    m = _SENTENCE_END.search(text, span.end, span.end + limit)
    if m is None:
        return span
    end = m.end() if m.group() != "\n" else m.start()
    return Span(span.n, span.start, end, text[span.start:end])


def sentence_of(span: Span, text: str, before: int = 0, after: int = 0) -> str:
    """The sentence(s) of `text` (the span's source text) the copied span lies in, with
    `before` sentences before them and `after` after."""
    starts = [0, *(m.end() for m in _SENTENCE_END.finditer(text))]
    first = max(i for i, s in enumerate(starts) if s <= span.start)
    last = max(i for i, s in enumerate(starts) if s < max(span.end, span.start + 1))
    lo = starts[max(0, first - before)]
    hi = starts[last + 1 + after] if last + 1 + after < len(starts) else len(text)
    return text[lo:hi]


def _sentences(text: str) -> list[tuple[int, int]]:
    """The character ranges of `text`'s sentences (a line break ends one too)."""
    starts = [0, *(m.end() for m in _SENTENCE_END.finditer(text))]
    ends = [*starts[1:], len(text)]
    return [(a, b) for a, b in zip(starts, ends, strict=True) if text[a:b].strip()]


def _scored_sentences(question: str, passages: Sequence[str], context: float = 0.25
                      ) -> tuple[list[tuple[int, int, int, set[str]]], list[tuple[float, int]]]:
    """The passages' sentences (passage, start, end, stems), and (score, index) of each,
    best first: the rarity-weighted (idf over the passages' sentences) question words a
    sentence holds, by stem, plus `context` × those only its neighbours hold (two sentences
    before it, one after, in the same passage: "the game" of a sentence whose subject an
    earlier one names)."""
    asked = {_stem(w) for w in content_words(question)}
    found = [(n, a, b, {_stem(w) for w in content_words(text[a:b])})
             for n, text in enumerate(passages) for a, b in _sentences(text)]
    df = Counter(w for *_, words in found for w in words & asked)
    idf = {w: math.log(1 + len(found) / (1 + df[w])) for w in asked}
    scored = []
    for i, (_, _, _, words) in enumerate(found):
        score = sum(idf[w] for w in asked & words) + context * sum(
            idf[w] for w in asked & (_near(found, i) - words))
        scored.append((score, i))
    return found, sorted(scored, key=lambda x: (-x[0], x[1]))


def _near(found: Sequence[tuple[int, int, int, set[str]]], i: int) -> set[str]:
    """The stems of the two sentences before sentence i and the one after, in its passage."""
    return set().union(*(found[j][3] for j in range(max(0, i - 2), min(len(found), i + 2))
                         if j != i and found[j][0] == found[i][0]))


def focus_sentences(question: str, passages: Sequence[str], m: int
                    ) -> list[list[tuple[int, int]]] | None:
    """The `m` sentences of the passages most about the question (`_scored_sentences`), as
    character ranges per passage: where a grounded answer may start
    (generation.focus_sentences). A small model copies well but picks the wrong place in
    four passages; the sentence that holds the question's rare words mostly holds its
    answer too (measured: benchmarks/answers.py). None when no sentence holds a question
    word."""
    found, best = _scored_sentences(question, passages)
    best = [(score, i) for score, i in best[:m] if score > 0]
    if not best:
        return None
    out: list[list[tuple[int, int]]] = [[] for _ in passages]
    for _, i in sorted(best, key=lambda x: x[1]):
        n, a, b, _ = found[i]
        out[n].append((a, b))
    return out


def evidence(question: str, passages: Sequence[str]) -> float | None:
    """How much of the question the passages' best sentence for it (`_scored_sentences`)
    holds: the share of the question's content words, by stem, in that sentence, the two
    before it and the one after (generation.min_evidence). Measured on SQuAD, the best
    sentence of a question whose answer was removed from the documents holds few of its
    words; an answerable question's holds most. None: the question has no content word."""
    asked = {_stem(w) for w in content_words(question)}
    if not asked:
        return None
    found, best = _scored_sentences(question, passages)
    if not best:
        return 0.0
    i = best[0][1]
    return len(asked & (found[i][3] | _near(found, i))) / len(asked)


def _stem(word: str) -> str:
    """A crude English stem, enough to match "played" with "play", "forms" with "formed"."""
    for suffix in ("ing", "ed", "es", "s", "ly"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[:-len(suffix)]
    return word


def support(span: Span, text: str, question: str) -> float | None:
    """How much the place a span was copied from is about the question: the share of the
    question's content words (other than the answer's own) that its sentence holds, with
    the two sentences before it and the one after (where "the game" names what an earlier
    sentence called "Super Bowl 50"), compared by stem. An answer copied from sentences
    about something else is most likely not an answer: measured on SQuAD, the unanswerable
    questions' copies hold few of their words (benchmarks/answers.py). None: the question
    has no such word."""
    asked = {_stem(w) for w in content_words(question)} - {
        _stem(w) for w in content_words(span.text)}
    if not asked:
        return None
    held = {_stem(w) for w in content_words(sentence_of(span, text, before=2, after=1))}
    return len(asked & held) / len(asked)


_ACRONYM = re.compile(r"[A-Z][A-Za-z]?[A-Z]{1,5}s?")


def with_expansion(span: Span, text: str, question: str = "") -> Span:
    """An acronym answer ("RRF") with the words it stands for, where its source spells them
    out as "reciprocal rank fusion (RRF)": the span then starts at those words. Not when
    the question asks about those very words ("What is byte-pair encoding?": "BPE")."""
    if not _ACRONYM.fullmatch(span.text):
        return span
    letters = span.text.rstrip("s").upper()
    for m in re.finditer(r"\(" + re.escape(span.text) + r"\)", text):
        words = list(re.finditer(r"[\w']+", text[max(0, m.start() - 200):m.start()]))
        if len(words) < len(letters):
            continue
        lead = words[-len(letters):]
        asked = content_words(" ".join(w.group() for w in lead)) <= content_words(question)
        if "".join(w.group()[0] for w in lead).upper() == letters and not asked:
            start = max(0, m.start() - 200) + lead[0].start()
            return Span(span.n, start, m.end(), text[start:m.end()])
    return span


def locate_span(answer: str, passages: Sequence[str]) -> Span | None:
    """The first passage (in source order) holding `answer` verbatim, up to whitespace, and
    the character offsets of the copy in that passage's own text."""
    words = answer.split()
    if not words:
        return None
    for n, text in enumerate(passages, 1):
        start = _find_words(text, words)
        if start is not None:
            return Span(n, start[0], start[1], text[start[0]:start[1]])
    return None


def _find_words(text: str, words: list[str]) -> tuple[int, int] | None:
    """Offsets of `words` in `text`, matching any run of whitespace between them; the first
    word may be the end of a longer word (a span may start inside one)."""
    pattern = r"\s+".join(re.escape(w) for w in words)
    m = re.search(pattern, text)
    return (m.start(), m.end()) if m else None
