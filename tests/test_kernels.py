"""The fast decoder's native kernels (rag_app/csrc), built for real with this machine's
compiler: their attention against attention computed in float64 over the same float16
cache, and their decoding step against the same network in PyTorch operations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from prompts import QA, STORY, replay

from rag_app import kernels
from rag_app.errors import ModelLoadError
from rag_app.fast_decoder import FastLlama, prefill_layout
from rag_app.llm import LocalLM
from rag_app.settings import GenerationSettings, LLMSettings

OPTIONS = GenerationSettings(max_new_tokens=32, stop_on_repeat=0)

if torch.backends.cpu.get_cpu_capability() != "AVX512":
    pytest.skip("the native kernels need AVX-512, which this CPU lacks", allow_module_level=True)


@pytest.fixture(scope="module")
def ops(cache_dir):
    return kernels.native_ops(cache_dir)


@pytest.fixture(scope="module")
def attend(ops):
    return ops.decode_attention


def reference(q, keys, values, pos):
    """softmax(q k) v in float64 over positions 0..pos of the cache, per query head."""
    kv_heads = values.shape[0]
    group = q.shape[0] // kv_heads
    k = keys[:, :, :pos + 1].double()  # (Hkv, D, T)
    v = values[:, :pos + 1].double()  # (Hkv, T, D)
    qg = q.double().view(kv_heads, group, -1)
    return (torch.softmax(qg @ k, -1) @ v).reshape(q.shape[0], -1)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [
    (4, 4, 64), (6, 3, 64), (9, 3, 64), (8, 2, 128), (10, 2, 64), (12, 2, 48), (14, 2, 64),
    (16, 2, 32)])  # every group size from 1 to 8
def test_attention_equals_float64_over_the_same_cache(attend, heads, kv_heads, dim) -> None:
    gen = torch.Generator().manual_seed(heads * dim)
    length = 1003  # not a multiple of 16: the last positions' loads are masked
    keys = torch.randn(kv_heads, dim, length, generator=gen).half()
    values = torch.randn(kv_heads, length, dim, generator=gen).half()
    for pos in (0, 1, 15, 16, 17, 255, 256, 257, 640, length - 1):
        q = torch.randn(heads, dim, generator=gen) * dim ** -0.5 * 3
        k_new, v_new = torch.randn(2, kv_heads, dim, generator=gen)
        before = keys.clone(), values.clone()
        out = attend(q, k_new, v_new, keys, values, pos)
        assert out.shape == (heads, dim) and out.dtype == torch.float32
        # the new key and value are written at pos, in float16, and nothing else changes
        assert torch.equal(keys[:, :, pos], k_new.half())
        assert torch.equal(values[:, pos], v_new.half())
        keys[:, :, pos], values[:, pos] = before[0][:, :, pos], before[1][:, pos]
        assert torch.equal(keys, before[0]) and torch.equal(values, before[1])
        keys[:, :, pos], values[:, pos] = k_new.half(), v_new.half()
        torch.testing.assert_close(out.double(), reference(q, keys, values, pos),
                                   rtol=1e-5, atol=1e-5)


def test_positions_after_the_step_are_never_read(attend) -> None:
    """A cache is allocated uninitialised: whatever lies beyond pos must not leak in."""
    keys = torch.randn(3, 64, 300).half()
    values = torch.randn(3, 300, 64).half()
    q, k_new, v_new = torch.randn(9, 64), torch.randn(3, 64), torch.randn(3, 64)
    clean = attend(q, k_new, v_new, keys.clone(), values.clone(), 200)
    keys[:, :, 201:], values[:, 201:] = float("nan"), float("inf")
    assert torch.equal(attend(q, k_new, v_new, keys, values, 200), clean)


def test_float16_cache_saturates_instead_of_overflowing(attend) -> None:
    keys, values = torch.zeros(1, 16, 4).half(), torch.zeros(1, 4, 16).half()
    big = torch.full((1, 16), 1e6)
    out = attend(torch.full((1, 16), 1e-6), big, -big, keys, values, 0)
    assert keys[0, :, 0].eq(65504).all() and values[0, 0].eq(-65504).all()
    assert torch.equal(out, torch.full((1, 16), -65504.0))


def test_bad_shapes_are_refused_with_a_message(attend) -> None:
    keys, values = torch.zeros(3, 64, 10).half(), torch.zeros(3, 10, 64).half()
    q, kv = torch.zeros(9, 64), torch.zeros(3, 64)
    with pytest.raises(RuntimeError, match="position outside the cache"):
        attend(q, kv, kv, keys, values, 10)
    with pytest.raises(RuntimeError, match="float16"):
        attend(q, kv, kv, keys.float(), values, 0)
    with pytest.raises(RuntimeError, match=r"keys \(Hkv, D, L\)"):
        attend(q, kv, kv, values, values, 0)


@pytest.mark.parametrize(("length", "heads", "kv_heads", "dim"), [
    (1, 9, 3, 64), (7, 4, 4, 64), (64, 3, 1, 64), (65, 9, 3, 64), (100, 8, 2, 128),
    (257, 16, 2, 32), (700, 9, 3, 64)])
def test_prompt_attention_is_causal_attention(ops, length, heads, kv_heads, dim) -> None:
    """Against float64 over the same bfloat16 inputs: no less exact than PyTorch's own
    bfloat16 attention (both round the weights and the output to bfloat16)."""
    if not ops.prefill_supported():
        pytest.skip("this CPU has no AVX512-BF16: the prompt runs on PyTorch's attention")
    gen = torch.Generator().manual_seed(length)
    q = (torch.randn(heads, length, dim, generator=gen) * dim ** -0.5 * 3).bfloat16()
    k, v = (torch.randn(kv_heads, length, dim, generator=gen).bfloat16() for _ in range(2))
    exact = torch.nn.functional.scaled_dot_product_attention(
        q.double()[None], k.double()[None], v.double()[None], is_causal=True, enable_gqa=True,
        scale=1.0)[0].transpose(0, 1).reshape(length, -1)
    pytorch = torch.nn.functional.scaled_dot_product_attention(
        q[None], k[None], v[None], is_causal=True, enable_gqa=True,
        scale=1.0)[0].transpose(0, 1).reshape(length, -1)
    out = ops.prefill_attention(q, *prefill_layout(k, v))
    assert out.shape == (length, heads * dim) and out.dtype == torch.bfloat16
    err = (out.double() - exact).abs().max()
    assert err <= 1.5 * (pytorch.double() - exact).abs().max() + 1e-3, err
    assert err < 0.02


@pytest.mark.slow
def test_native_decoding_steps_follow_the_pytorch_ones(services) -> None:
    """Two roundings of the same float32 network (a float32 residual stream and float16 keys
    and values, against bfloat16 and float32): the same likeliest token at nearly every
    step of a teacher-forced continuation (near-ties may flip), probabilities within a few
    points, as each is to float32 (tests/test_fast_decoder.py). Measured on 10 prompts of
    40 steps: native 99.0 % top-1 agreement with float32, PyTorch steps 98.0 %."""
    lm: LocalLM = services.lm
    assert lm.fast.native is not None  # llm.kernels=auto picked the native kernels here
    plain = FastLlama(lm.model, native=None)
    for messages in (QA, STORY):
        prompt = lm.encode_chat(messages)["input_ids"][0]
        ids = lm.generate(messages, OPTIONS).token_ids
        native, torch_ = (torch.softmax(replay(f, prompt, ids), -1) for f in (lm.fast, plain))
        agree = (native.argmax(-1) == torch_.argmax(-1)).float().mean()
        assert agree >= 0.9, agree
        assert (native - torch_).abs().max() < 0.08


@pytest.mark.slow
def test_models_the_kernels_cannot_take_use_pytorch_or_are_refused(services, tmp_path) -> None:
    """A head size of 24 is not a multiple of 16: auto falls back, native names the setting."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = services.lm.tokenizer
    tiny = LlamaConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                       max_position_embeddings=256)
    LlamaForCausalLM(tiny).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    auto = LocalLM(LLMSettings(model=str(tmp_path), cache_dir=tmp_path))
    assert auto.engine == "transformers"  # auto: the fast decoder only with native kernels
    fast = LocalLM(LLMSettings(model=str(tmp_path), cache_dir=tmp_path, engine="fast"))
    assert fast.engine == "fast" and fast.fast.native is None
    assert fast.generate(QA, OPTIONS).token_ids
    with pytest.raises(ModelLoadError, match="llm.kernels=native"):
        LocalLM(LLMSettings(model=str(tmp_path), cache_dir=tmp_path, kernels="native"))
    torch_only = LocalLM(LLMSettings(model=str(tmp_path), cache_dir=tmp_path, kernels="torch"))
    assert torch_only.fast.native is None


BUILD = ("import sys; from pathlib import Path; from rag_app import kernels\n"
         "try:\n    kernels.native_ops(Path(sys.argv[1])); print('loaded')\n"
         "except kernels.KernelUnavailable as e:\n    print('unavailable:', e)")


def build_in_a_new_process(cache: Path, **env: str) -> str:
    """(A new process: this one has the library loaded already.)"""
    out = subprocess.run([sys.executable, "-c", BUILD, str(cache)], env={**os.environ, **env},
                         text=True, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_machine_that_cannot_compile_gets_a_reason(tmp_path) -> None:
    out = build_in_a_new_process(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert out.startswith("unavailable: the native decoder kernels did not build in "
                          + str(tmp_path / "kernels")), out


def test_a_build_killed_earlier_does_not_block_the_next(tmp_path) -> None:
    """torch's own lock file, left behind by a killed build, and half a library."""
    folder = kernels.build_folder(tmp_path)
    folder.mkdir(parents=True)
    (folder / "lock").touch()
    (folder / f"{kernels.LIBRARY}.so").write_bytes(b"\x7fELF cut short")
    assert build_in_a_new_process(tmp_path) == "loaded\n"
    assert build_in_a_new_process(tmp_path) == "loaded\n"  # the built library, loaded again
