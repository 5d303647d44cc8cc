"""The decoding loop of the fast CPU decoder, with transformers' own logits processors,
stopping criteria and text streamer, so every strategy but beam search behaves as in
`generate`: greedy, temperature, top-k, top-p, repetition penalty, seeds, stop strings."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import (
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


def logits_processors(o: GenerationSettings) -> LogitsProcessorList:
    """The processors `generate` builds for these options, in its order."""
    procs = LogitsProcessorList()
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
                 stops: StoppingCriteriaList, eos: set[int]) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (token id, the model's raw logits (1, V) it was chosen from) for each new token,
    until an end-of-sequence token, a stopping criterion or `max_new_tokens`.

    `prompt`: (1, T) token ids. Closing the iterator stops decoding at once.
    """
    procs = logits_processors(o)
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
