"""The GPT lab: look inside the local decoder-only model. BPE tokens, the next-token
distribution and how temperature / top-k / top-p reshape it, one decoding step at a time,
the causal mask and attention weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rag_app.llm import LocalLM


@dataclass
class Candidate:
    token: str
    id: int
    prob: float  # softmax of the raw logits
    processed: float  # after temperature, top-k and top-p, renormalised (0 = cut)


def tokens(lm: LocalLM, text: str) -> list[tuple[str, int]]:
    """BPE pieces and ids, as the model sees `text` (no special tokens added)."""
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return [(lm.tokenizer.decode([i]), int(i)) for i in ids]


def _ids(lm: LocalLM, text: str) -> torch.Tensor:
    """The ids the model reads: at most its context, the last tokens of a longer text (as a
    GPT reads a text longer than its window)."""
    ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError("type some text first")
    return ids[:, -lm.context_length:].to(lm.device)  # (1, T <= context)


def over_context(lm: LocalLM, n_tokens: int) -> int:
    """How many leading tokens of an `n_tokens` text the model does not read (0: none)."""
    return max(0, n_tokens - lm.context_length)


def next_token(lm: LocalLM, text: str, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, n: int = 20) -> list[Candidate]:
    """The `n` likeliest next tokens with raw and processed probabilities."""
    ids = _ids(lm, text)
    with lm.gate.hold(), torch.inference_mode():  # after any generation in progress
        if lm.fast is not None:  # the network that writes the chat's answers
            logits = lm.fast.prompt_logits(ids[0])
        else:
            logits = lm.model(ids).logits[:, -1, :].float()  # (1, vocab)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    raw = torch.softmax(logits, dim=-1)[0]
    processed = torch.softmax(warpers(None, logits.clone()), dim=-1)[0]
    top = raw.topk(n)
    return [Candidate(lm.tokenizer.decode([int(i)]), int(i), float(p), float(processed[i]))
            for p, i in zip(top.values, top.indices, strict=True)]


def step(lm: LocalLM, text: str, sample: bool, temperature: float = 1.0, top_k: int = 0,
         top_p: float = 1.0, seed: int | None = None) -> Candidate:
    """Choose one next token: the argmax (greedy) or a draw from the processed distribution."""
    cands = next_token(lm, text, temperature, top_k, top_p, n=200)
    if not sample:
        return cands[0]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    weights = torch.tensor([c.processed for c in cands])
    return cands[int(torch.multinomial(weights, 1, generator=generator))]


def causal_mask(n: int) -> torch.Tensor:
    """(n, n) lower-triangular: token i may attend to tokens 0..i only."""
    return torch.tril(torch.ones(n, n))


def attention(lm: LocalLM, text: str, layer: int, head: int) -> torch.Tensor:
    """Attention weights (T, T) of one layer and head; rows sum to 1 under the mask."""
    ids = _ids(lm, text)
    if lm.fast is not None:
        with lm.gate.hold():
            return lm.fast.attention_weights(ids[0], layer)[head]
    # Holding the gate: no generation runs while the model is switched to eager attention.
    with lm.gate.hold(), torch.inference_mode():
        # Fused attention kernels do not return weights: use the eager path for this call.
        previous = lm.model.config._attn_implementation
        lm.model.set_attn_implementation("eager")
        try:
            out = lm.model(ids, output_attentions=True)
        finally:
            lm.model.set_attn_implementation(previous)
    return out.attentions[layer][0, head].float().cpu()  # (T, T)


def shape(lm: LocalLM) -> tuple[int, int]:
    """(layers, heads) of the model."""
    cfg = lm.model.config
    return int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
