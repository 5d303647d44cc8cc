"""The decoding loops of the fast CPU decoder, with transformers' own logits processors,
stopping criteria and text streamer, so every strategy behaves as in `generate`: greedy,
temperature, top-k, top-p, repetition penalty, seeds, stop strings, and beam search."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TextStreamer,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rag_app.fast_decoder import FastLlama
from rag_app.settings import GenerationSettings


def logits_processors(o: GenerationSettings, first: Sequence[LogitsProcessor] = ()
                      ) -> LogitsProcessorList:
    """The processors `generate` builds for these options, in its order, after `first`
    (the grounded mask goes before the sampling warpers, so they never see a token it
    forbids)."""
    procs = LogitsProcessorList(first)
    if o.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(o.repetition_penalty))
    if o.do_sample:
        if o.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(o.temperature))
        if o.top_k:
            procs.append(TopKLogitsWarper(o.top_k))
        if o.top_p < 1.0:
            procs.append(TopPLogitsWarper(o.top_p))
    return procs


def decode_steps(model: FastLlama, prompt: torch.Tensor, o: GenerationSettings,
                 stops: StoppingCriteriaList, eos: set[int],
                 first: Sequence[LogitsProcessor] = ()) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token id, the model's raw logits (1, V) it was chosen from) for each new token,
    until an end-of-sequence token, a stopping criterion or `max_new_tokens`.

    `prompt`: (1, T) token ids. Closing the iterator stops decoding at once.
    """
    procs = logits_processors(o, first)
    seq = prompt
    cache = model.new_cache(prompt.shape[1] + o.max_new_tokens)
    logits = model.forward(prompt[0], cache, 0)  # (1, V)
    for step in range(o.max_new_tokens):
        scores = procs(seq, logits)
        if o.do_sample:  # as `generate` samples: softmax, then one multinomial draw
            token = int(torch.multinomial(scores.softmax(-1), 1)[0, 0])
        else:
            token = int(scores.argmax(-1)[0])
        seq = torch.cat([seq, torch.tensor([[token]], dtype=seq.dtype)], 1)
        yield token, logits
        if token in eos or step + 1 == o.max_new_tokens or bool(stops(seq, scores).any()):
            return
        logits = model.forward(torch.tensor([token]), cache, seq.shape[1] - 1)


@dataclass
class _Beam:
    ids: list[int]  # generated so far
    logprob: float  # sum of the processed log-probabilities of `ids`
    cache: list  # the decoder's key/value cache holding the prompt and ids[:-1]
    logits: list[torch.Tensor] = field(default_factory=list)  # raw (1, V) before each id


def beam_search(model: FastLlama, prompt: torch.Tensor, o: GenerationSettings,
                stops: StoppingCriteriaList, eos: set[int],
                first: Sequence[LogitsProcessor] = ()) -> tuple[list[int], list[torch.Tensor]]:
    """Beam search as `generate` runs it with early stopping: `num_beams` hypotheses; at
    each step the 2 x num_beams best continuations of all of them, by summed
    log-probability; one that ends (end-of-sequence token or a stopping criterion) is kept
    as finished with its score divided by its length ** length_penalty, and the search
    stops once num_beams have finished or at max_new_tokens (the live ones then count as
    finished). Returns the best hypothesis's ids and the raw logits before each of them.

    Each hypothesis has its own key/value cache; one continued by several is copied.
    """
    procs, width, start = logits_processors(o, first), o.num_beams, prompt.shape[1]
    cache = model.new_cache(start + o.max_new_tokens)
    first = model.forward(prompt[0], cache, 0)
    beams = [_Beam([], 0.0, cache, [first])]
    finished: list[tuple[float, _Beam]] = []

    def finish(beam: _Beam, ended: bool) -> None:
        # as `generate`: an end-of-sequence token does not count in the length
        length = max(1, len(beam.ids) - ended)
        finished.append((beam.logprob / length ** o.length_penalty, beam))

    prefix = prompt[0].tolist()

    for step in range(o.max_new_tokens):
        candidates = []  # (summed log-probability, parent, token)
        for parent, beam in enumerate(beams):
            seq = torch.cat([prompt, torch.tensor([beam.ids], dtype=prompt.dtype)], 1)
            logp = torch.log_softmax(procs(seq, beam.logits[-1].clone()), -1)[0]
            top = logp.topk(2 * width)
            candidates += [(beam.logprob + float(lp), parent, int(t))
                           for lp, t in zip(top.values, top.indices, strict=True)
                           if lp > float("-inf")]  # a grounded mask forbids the rest
        candidates.sort(key=lambda c: -c[0])
        live, used = [], set()
        for rank, (logprob, parent, token) in enumerate(candidates[:2 * width]):
            source = beams[parent]
            child = _Beam(source.ids + [token], logprob, source.cache, source.logits[:])
            ended = token in eos
            if ended or (stops and bool(stops(torch.tensor([prefix + child.ids]), None).any())):
                if rank < width:  # as `generate`: only ends among the top width count
                    finish(child, ended)
                continue
            if len(live) < width:
                if parent in used:  # a second child of this parent: its own cache
                    child.cache = model.copy_cache(source.cache)
                used.add(parent)
                live.append(child)
        if len(finished) >= width or step + 1 == o.max_new_tokens or not live:
            break
        for beam in live:
            beam.logits.append(model.forward(torch.tensor(beam.ids[-1:]), beam.cache,
                                             start + len(beam.ids) - 1))
        beams = live
    for beam in live if len(finished) < width else []:
        finish(beam, False)
    best = max(finished, key=lambda f: f[0])[1]
    return best.ids, best.logits[:len(best.ids)]


class TextPieces(TextStreamer):
    """transformers' streamer, collecting the finished text pieces instead of printing."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.ready: list[str] = []

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.ready.append(text)

    def take(self) -> list[str]:
        out, self.ready = self.ready, []
        return out
