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

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, PreTrainedTokenizerBase

SPACE = "Ġ"  # byte-level BPE's leading-space marker


@dataclass(frozen=True)
class Grounding:
    """What a grounded answer may copy: the passages, in source order, and further allowed
    replies (the exact "not found" answer)."""

    passages: Sequence[str]
    extra: Sequence[str] = ()


@dataclass(frozen=True)
class Span:
    """Where a grounded answer was copied from: source number n (1-based) and the
    character offsets [start, end) of the copied text in that source's text."""

    n: int
    start: int
    end: int
    text: str


class SpanIndex:
    """The passages' token ids, with every position of each token for fast starts.

    `passages`: texts in source order; `extra`: further allowed texts (the "not found" reply).
    Passages are tokenised after a space, so their words carry the leading-space form the
    model writes inside a sentence; an answer's first token may also be the same word
    without its space, as a reply starts.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, passages: Sequence[str],
                 extra: Sequence[str] = ()) -> None:
        self.seqs: list[list[int]] = [
            tokenizer(" " + " ".join(t.split()), add_special_tokens=False)["input_ids"]
            for t in [*passages, *extra]]
        self.n_passages = len(passages)
        self.starts: dict[int, list[tuple[int, int]]] = {}  # token -> [(seq, position)]
        vocab = tokenizer.get_vocab()
        for s, seq in enumerate(self.seqs):
            for j, tok in enumerate(seq):
                self.starts.setdefault(tok, []).append((s, j))
                bare = tokenizer.convert_ids_to_tokens(tok)
                if bare.startswith(SPACE) and len(bare) > 1 and bare[1:] in vocab:
                    self.starts.setdefault(vocab[bare[1:]], []).append((s, j))
        self.first = torch.tensor(sorted(self.starts), dtype=torch.long)
        self._memo: dict[tuple[int, ...], list[tuple[int, int]]] = {}

    def matches(self, generated: tuple[int, ...]) -> list[tuple[int, int]]:
        """(seq, next position) of every span equal to `generated`."""
        if generated in self._memo:
            return self._memo[generated]
        if len(generated) == 1:
            found = [(s, j + 1) for s, j in self.starts.get(generated[0], [])]
        else:
            found = [(s, j + 1) for s, j in self.matches(generated[:-1])
                     if j < len(self.seqs[s]) and self.seqs[s][j] == generated[-1]]
        if len(self._memo) > 50_000:  # bounded: a long beam search cannot grow it forever
            self._memo.clear()
        self._memo[generated] = found
        return found

    def allowed(self, generated: tuple[int, ...]) -> list[int]:
        """The tokens that continue some span equal to `generated` (none: the span is over)."""
        return sorted({self.seqs[s][j] for s, j in self.matches(generated)
                       if j < len(self.seqs[s])})


class GroundedLogitsProcessor(LogitsProcessor):
    """Masks every token that would leave the passages' spans.

    `prompt_len`: where the answer starts in each row of `input_ids`; `ends`: tokens that end
    the answer (end of sequence; the tuned model's " [" before its citation), allowed once a
    span has begun and forced when no span can go on.
    """

    def __init__(self, index: SpanIndex, prompt_len: int, ends: Sequence[int],
                 eos: set[int]) -> None:
        self.index = index
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
                cont = torch.tensor(self.index.allowed(generated), dtype=torch.long)
                allow = torch.cat([cont, self.ends])
            mask[row, allow] = 0.0
        return scores + mask


def bracket_tokens(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that open a citation bracket: a model taught to cite writes " [" right after
    its answer, so in grounded mode they end the span."""
    return sorted(i for tok, i in tokenizer.get_vocab().items() if tok in ("[", SPACE + "["))


def strip_end(text: str) -> str:
    """The copied span without a trailing citation bracket the model opened to end it."""
    text = text.rstrip()
    return text[:-1].rstrip() if text.endswith("[") else text


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
