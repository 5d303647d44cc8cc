"""Shared by the decoder tests: two chat prompts (a one-fact question and an open story)
and teacher-forced replay through the fast decoder."""

from __future__ import annotations

import torch

from rag_app.fast_decoder import FastLlama

QA = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "Context: The Eiffel Tower is 330 metres tall.\n"
                                "Question: How tall is the Eiffel Tower?"},
]
STORY = [{"role": "user", "content": "Write a short story about a cat."}]


def replay(fast: FastLlama, prompt: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """The decoder's logits before each of `ids`, one step at a time: (len(ids), V)."""
    cache = fast.new_cache(len(prompt) + len(ids))
    steps = [fast.forward(prompt, cache, 0)[0]]
    for pos, token in enumerate(ids[:-1], len(prompt)):
        steps.append(fast.forward(torch.tensor([token]), cache, pos)[0])
    return torch.stack(steps)
