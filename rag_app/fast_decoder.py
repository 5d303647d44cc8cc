"""A lean CPU decoder for Llama-architecture models (SmolLM2, Llama, ...).

transformers' generic modelling code spends most of a decoding step on Python and small
tensor operations, not on arithmetic: SmolLM2-135M decodes at about 13 tokens/s there,
against about 80 for llama.cpp on the same GGUF file. This module runs the same network
in a few plain tensor operations a layer, in the style of nanoGPT:

- prompt (prefill): dense bfloat16 weights, and causal attention by the native kernels'
  AVX512-BF16 flash attention (about 1.7 x PyTorch's fused attention here) or else by
  PyTorch's;
- one new token at a time (decode): weight-only int4 matrix products with groups of 32
  (torch's `_weight_int4pack_mm_for_cpu`), which reproduce a Q4_1 GGUF's weights exactly
  (Q4_1 *is* 4-bit groups of 32 with a scale and a minimum), an int8 output projection,
  and attention over the key/value cache. With the native kernels (`rag_app/kernels.py`,
  `llm.kernels`) a whole step through the layers is one C++ call, the residual stream in
  float32, attending over a float16 cache (half the bytes of float32, which is what a
  step's attention waits on); without them, the same step in PyTorch operations over a
  float32 cache.

The weights come from the loaded transformers model, so any Llama-architecture model works;
others are served by transformers (`supports`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig, PreTrainedModel

from rag_app.kernels import MAX_GROUP, KernelUnavailable

GROUP = 32  # int4 quantisation group along the input dimension (Q4_1's block size)
ACT = torch.bfloat16  # activations and dense weights
KV = torch.float32  # key/value cache and decode-time attention, with PyTorch's operations
KV_NATIVE = torch.float16  # key/value cache read by the native kernel
RESCORE = 64  # the likeliest tokens whose logits are recomputed exactly in float32


def supports(model: PreTrainedModel) -> bool:
    """A Llama-architecture decoder without biases, with plain RoPE and SiLU MLPs."""
    c = model.config
    ropes = [getattr(c, "rope_parameters", None) or {}, getattr(c, "rope_scaling", None) or {}]
    plain_rope = all(r.get("rope_type", r.get("type", "default")) == "default" for r in ropes)
    return (c.model_type == "llama" and plain_rope and c.hidden_act == "silu"
            and not getattr(c, "attention_bias", False) and not getattr(c, "mlp_bias", False)
            and c.hidden_size % GROUP == 0 and c.intermediate_size % GROUP == 0)


def require_kernel_shape(config: PretrainedConfig) -> None:
    """The native kernels' limits: head size a multiple of 16, at most MAX_GROUP query heads
    per key/value head."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    if head_dim % 16 or group > MAX_GROUP:
        raise KernelUnavailable(f"the native decoder kernels take head sizes that are "
                                f"multiples of 16 and up to {MAX_GROUP} query heads per key/"
                                f"value head (this model: {head_dim}, {group})")


def _int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weights -> torch's packed int4 and (K/32, N, 2) scales and zeros.

    Asymmetric groups of 32 from each group's min and max: for weights that came from a
    Q4_1 file this finds the file's own scale and minimum again."""
    n, k = w.shape
    groups = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = groups.amin(-1), groups.amax(-1)  # (N, K/32)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = torch.round((groups - lo[..., None]) / scale[..., None]).clamp(0, 15)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        q.to(torch.int32).reshape(n, k), 2)
    # torch computes w = (q - 8) * scale + zero
    zeros = lo + 8 * scale
    return packed, torch.stack([scale.t(), zeros.t()], -1).contiguous().to(ACT)


def prefill_layout(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hkv, T, hd) keys and values -> the native prompt attention's bfloat16 pairs: keys
    (Hkv, hd/2, T, 2), pairs of dimensions per position, and values (Hkv, ceil(T/2), hd, 2),
    pairs of positions per dimension (a zero position pads an odd T)."""
    kv_heads, t, hd = k.shape
    keys = k.reshape(kv_heads, t, hd // 2, 2).permute(0, 2, 1, 3).contiguous()
    values = F.pad(v, (0, 0, 0, t % 2)).reshape(kv_heads, (t + 1) // 2, 2, hd)
    return keys, values.transpose(2, 3).contiguous()


class Linear:
    """One projection: dense for many tokens, int4 for one."""

    def __init__(self, w: torch.Tensor) -> None:
        self.dense = w.detach().to(ACT).contiguous()  # (N, K)
        self.packed, self.scales = _int4(w.detach())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (T, K) -> (T, N)
        if x.shape[0] == 1:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP,
                                                              self.scales)
        return F.linear(x, self.dense)


class FastLlama:
    """The network of a transformers Llama model, for prefill and one-token steps on CPU.

    `native`: the native kernels (`kernels.native_ops`), or None for PyTorch's operations
    over a float32 cache."""

    def __init__(self, model: PreTrainedModel, native: Any = None) -> None:
        self.native = native
        c, m = model.config, model.model
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        self.context_length = int(c.max_position_embeddings)
        self.embed = m.embed_tokens.weight.detach().to(ACT)  # (V, C)
        self.head = model.get_output_embeddings().weight.detach().float()  # (V, C), maybe tied
        scale = self.head.abs().amax(1).clamp_min(1e-12) / 127  # per output row
        self.head_int8 = torch.round(self.head / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.head_scale = scale.to(ACT)
        self.layers = []
        for layer in m.layers:
            a, p = layer.self_attn, layer.mlp
            self.layers.append({
                "norm1": layer.input_layernorm.weight.detach().to(ACT),
                "norm2": layer.post_attention_layernorm.weight.detach().to(ACT),
                # softmax(q k / sqrt(d)): the scale is folded into the query rows
                "qkv": Linear(torch.cat([a.q_proj.weight * self.head_dim ** -0.5,
                                         a.k_proj.weight, a.v_proj.weight])),
                "o": Linear(a.o_proj.weight),
                "gate_up": Linear(torch.cat([p.gate_proj.weight, p.up_proj.weight])),
                "down": Linear(p.down_proj.weight),
            })
        self.norm = m.norm.weight.detach().to(ACT)
        theta = ((getattr(c, "rope_parameters", None) or {}).get("rope_theta")
                 or getattr(c, "rope_theta", 10000.0))
        inv = 1.0 / theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        angles = torch.outer(torch.arange(self.context_length).float(), inv)  # (L, hd/2)
        angles = torch.cat([angles, angles], -1)  # (L, hd), transformers' half rotation
        self.cos, self.sin = angles.cos().to(ACT), angles.sin().to(ACT)
        if native is not None:  # decode_layers' arguments: 10 tensors a layer, float32 rows
            self.flat = [t for layer in self.layers for t in (
                layer["norm1"].float(), layer["norm2"].float(),
                *(w for name in ("qkv", "o", "gate_up", "down")
                  for w in (layer[name].packed, layer[name].scales)))]
            self.cos32, self.sin32 = angles.cos(), angles.sin()
            self.norm32 = m.norm.weight.detach().float()
        self.native_prefill = native is not None and native.prefill_supported()

    def new_cache(self, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer: keys (kv_heads, hd, L), transposed so that one query's scores over all
        positions are one product, and values (kv_heads, L, hd)."""
        dtype = KV if self.native is None else KV_NATIVE
        return [(torch.empty(self.kv_heads, self.head_dim, length, dtype=dtype),
                 torch.empty(self.kv_heads, length, self.head_dim, dtype=dtype))
                for _ in self.layers]

    @staticmethod
    def copy_cache(cache: list[tuple[torch.Tensor, torch.Tensor]]
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k.clone(), v.clone()) for k, v in cache]

    def _rope(self, x: torch.Tensor, pos: int) -> torch.Tensor:  # (H, T, hd)
        t, half = x.shape[1], self.head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * self.cos[pos:pos + t] + rotated * self.sin[pos:pos + t]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor], pos: int) -> torch.Tensor:
        """q (H, T, hd), k/v (Hkv, T, hd) of the new tokens -> (T, H * hd)."""
        keys, values = cache
        t = q.shape[1]
        if keys.dtype == torch.float16:  # saturate as the native kernels do, never inf
            k, v = k.clamp(-65504, 65504), v.clamp(-65504, 65504)
        keys[:, :, pos:pos + t] = k.transpose(1, 2)
        values[:, pos:pos + t] = v
        if t > 1:  # the prompt: the new tokens attend causally among themselves
            if pos:
                raise ValueError("a multi-token step must start the sequence")
            if self.native_prefill:
                return self.native.prefill_attention(q.contiguous(), *prefill_layout(k, v))
            out = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True,
                                                 enable_gqa=True, scale=1.0)[0]  # (H, T, hd)
            return out.transpose(0, 1).reshape(t, -1)
        group = self.heads // self.kv_heads  # query heads sharing one key/value head
        qg = q.reshape(self.kv_heads, group, self.head_dim).to(KV)
        weights = torch.bmm(qg, keys[:, :, :pos + 1]).softmax(-1)  # (Hkv, group, pos+1)
        return torch.bmm(weights, values[:, :pos + 1]).reshape(1, -1).to(ACT)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: list, pos: int) -> torch.Tensor:
        """Tokens `ids` (T,) at positions pos..pos+T-1 -> float32 logits of the last (1, V)."""
        t = ids.shape[0]
        x = self.embed[ids]  # (T, C)
        if t == 1 and self.native is not None:
            x = self.native.decode_layers(x.float(), self.flat, [c for kv in cache for c in kv],
                                          self.cos32[pos], self.sin32[pos], pos, self.heads,
                                          self.eps)
            return self._logits(F.rms_norm(x, (x.shape[-1],), self.norm32, self.eps))
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            q, k, v = self._qkv(layer, x, pos)
            x = self._rest(layer, x, self._attend(q, k, v, layer_cache, pos))
        last = F.rms_norm(x[-1:], (x.shape[-1],), self.norm, self.eps).float()  # (1, C)
        if t > 1:  # once per prompt: the exact float32 projection
            return F.linear(last, self.head)
        return self._logits(last)

    def _qkv(self, layer: dict, x: torch.Tensor, pos: int) -> tuple[torch.Tensor, ...]:
        """(T, C) -> rotated q (H, T, hd), k (Hkv, T, hd) and v (Hkv, T, hd)."""
        t, hd = x.shape[0], self.head_dim
        h = F.rms_norm(x, (x.shape[-1],), layer["norm1"], self.eps)
        qk, v = layer["qkv"](h).split([(self.heads + self.kv_heads) * hd,
                                       self.kv_heads * hd], -1)
        qk = self._rope(qk.view(t, self.heads + self.kv_heads, hd).transpose(0, 1), pos)
        return qk[:self.heads], qk[self.heads:], v.view(t, self.kv_heads, hd).transpose(0, 1)

    def _rest(self, layer: dict, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The layer after attention: output projection, residual, MLP, residual."""
        x = x + layer["o"](attended)
        h = F.rms_norm(x, (x.shape[-1],), layer["norm2"], self.eps)
        gate, up = layer["gate_up"](h).chunk(2, -1)
        return x + layer["down"](F.silu(gate) * up)

    @torch.inference_mode()
    def prompt_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 logits (1, V) of the token after `ids` (T,), as the first decoding step
        sees them."""
        return self.forward(ids, self.new_cache(ids.shape[0]), 0)

    @torch.inference_mode()
    def attention_weights(self, ids: torch.Tensor, layer: int) -> torch.Tensor:
        """(H, T, T) float32 causal attention weights of one layer over `ids` (T,), from the
        same queries and keys as the prompt pass."""
        t = ids.shape[0]
        if t == 1:  # one token attends to itself alone
            return torch.ones(self.heads, 1, 1)
        x, cache = self.embed[ids], self.new_cache(t)
        for i, params in enumerate(self.layers[:layer + 1]):
            q, k, v = self._qkv(params, x, 0)
            if i < layer:
                x = self._rest(params, x, self._attend(q, k, v, cache[i], 0))
        keys = k.float().repeat_interleave(self.heads // self.kv_heads, 0)  # (H, T, hd)
        scores = q.float() @ keys.transpose(1, 2)  # the attention scale is in q already
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)

    def _logits(self, last: torch.Tensor) -> torch.Tensor:
        """(1, C) float32 final hidden state of a decoding step -> (1, V) float32 logits."""
        # bfloat16 int8 logits are coarse (about 0.1 apart near 20), which turns near-ties
        # into ties and shifts probabilities: the likeliest tokens get float32 logits.
        logits = torch.ops.aten._weight_int8pack_mm(last.to(ACT), self.head_int8,
                                                    self.head_scale).float()  # (1, V)
        top = logits.topk(RESCORE, -1).indices[0]  # (R,)
        logits[0, top] = last[0] @ self.head[top].t()
        return logits
