"""GPT lab functions on the real SmolLM2."""

import pytest
import torch
from transformers import StoppingCriteriaList

from rag_app import lab
from rag_app.decoding import decode_steps
from rag_app.settings import GenerationSettings

pytestmark = pytest.mark.slow
TEXT = "The causal mask lets each token attend to"


@pytest.fixture(scope="module")
def lm(services):
    return services.lm


def test_bpe_pieces_rebuild_the_text(lm) -> None:
    pieces = lab.tokens(lm, TEXT)
    assert "".join(p for p, _ in pieces) == TEXT
    assert len(pieces) < len(TEXT.split()) * 3


def test_next_token_distribution_and_cuts(lm) -> None:
    raw = lab.next_token(lm, TEXT)
    probs = [c.prob for c in raw]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    cut = lab.next_token(lm, TEXT, top_k=3)
    assert sum(c.processed > 0 for c in cut) == 3
    assert sum(c.processed for c in cut[:3]) == pytest.approx(1.0, abs=1e-4)
    cold = lab.next_token(lm, TEXT, temperature=0.05)  # sharpens towards the top token
    assert cold[0].processed > max(0.5, 2 * raw[0].prob)
    hot = lab.next_token(lm, TEXT, temperature=2.0)  # flattens
    assert hot[0].processed < raw[0].prob
    nucleus = lab.next_token(lm, TEXT, top_p=0.5)
    kept = [c for c in nucleus if c.processed > 0]
    assert sum(c.prob for c in kept[:-1]) < 0.5 <= sum(c.prob for c in kept) + 1e-6


def test_greedy_step_is_the_chat_decoders_first_token(lm) -> None:
    """The lab shows the network that writes the answers: the fast decoder on CPU."""
    assert lm.fast is not None
    chosen = lab.step(lm, TEXT, sample=False)
    ids = lm.tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    first, logits = next(decode_steps(lm.fast, ids, GenerationSettings(max_new_tokens=1),
                                      StoppingCriteriaList(), set()))
    assert chosen.id == first
    assert chosen.prob == pytest.approx(float(torch.softmax(logits, -1)[0, first]), abs=1e-6)
    with torch.inference_mode():  # and the float32 model agrees on this one
        assert chosen.id == int(lm.model(ids).logits[0, -1].argmax())


def test_seeded_sampled_step_is_reproducible(lm) -> None:
    a = lab.step(lm, TEXT, True, temperature=1.5, seed=3)
    b = lab.step(lm, TEXT, True, temperature=1.5, seed=3)
    assert a == b


def test_attention_is_causal_and_normalised(lm) -> None:
    n = len(lab.tokens(lm, TEXT))
    weights = lab.attention(lm, TEXT, layer=3, head=1)
    assert weights.shape == (n, n)
    assert torch.allclose(weights.sum(-1), torch.ones(n), atol=1e-4)
    assert torch.all(weights.triu(1) == 0)
    assert torch.equal(lab.causal_mask(n), torch.ones(n, n).tril())
    # the fast decoder's weights are the float32 model's, to bfloat16 rounding
    ids = lm.tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    lm.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            exact = lm.model(ids, output_attentions=True).attentions[3][0, 1].float()
    finally:
        lm.model.set_attn_implementation("sdpa")
    assert (weights - exact).abs().max() < 0.05


def test_a_prompt_longer_than_the_context_is_read_by_its_last_tokens(lm, monkeypatch) -> None:
    monkeypatch.setattr(lm, "context_length", 64)  # the real model, a short window to fill
    text = "hello world " * 100
    n = len(lab.tokens(lm, text))
    assert lab.over_context(lm, n) == n - 64 > 0 and lab.over_context(lm, 10) == 0
    assert lab._ids(lm, text).shape[1] == 64
    tail = lm.tokenizer.decode(lab._ids(lm, text)[0])
    assert lab.next_token(lm, text, n=5) == lab.next_token(lm, tail, n=5)  # its last 64
