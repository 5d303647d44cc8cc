// Native decoding step of the fast CPU decoder (rag_app/fast_decoder.py): every layer of
// a Llama network for one new token, and at its heart single-query attention over a float16
// key/value cache.
//
// Between the int4 matrix products (PyTorch's own `_weight_int4pack_mm_for_cpu`), a layer
// is a dozen small operations (norms, rotary embedding, residual adds, SiLU); from Python
// each costs a few microseconds of dispatch, which for a 135M model is a fifth of a step.
// Here they are plain loops.
//
// One decoding step attends one new query per head over every cached position. PyTorch's
// kernels for that shape either read a float32 cache (twice the bytes of float16) or run
// slower in half precision. This kernel reads the float16 cache once, converts it in
// registers and accumulates in float32 (as llama.cpp does), with grouped-query heads
// sharing each key and value row and the positions split in chunks over the threads
// (split-K "flash decoding": per-chunk maxima, sums and outputs, combined at the end).
//
// Registered as torch.ops.rag_app.decode_attention and torch.ops.rag_app.decode_layers;
// built on first use by rag_app/kernels.py with the machine's own compiler and instruction
// set.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <vector>

namespace {

constexpr int64_t kChunk = 256;  // positions per task
constexpr int kMaxGroup = 8;     // query heads per key/value head

// exp(x) for 16 floats: Cephes' polynomial on x = n ln 2 + r, scaled by 2^n (scalef).
inline __m512 exp16(__m512 x) {
  // min/max return their second operand when either is NaN: keep x second so NaN stays NaN
  x = _mm512_max_ps(_mm512_set1_ps(-88.3762626647949f),
                    _mm512_min_ps(_mm512_set1_ps(88.3762626647949f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512 load_half(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

constexpr float kHalfMax = 65504.f;  // float16 saturates here instead of becoming inf

inline void store_half(at::Half* p, __m512 v) {
  v = _mm512_max_ps(_mm512_set1_ps(-kHalfMax), _mm512_min_ps(_mm512_set1_ps(kHalfMax), v));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// One task: query heads g0..g0+G-1 sharing key/value head `Kh`/`Vh`, over positions
// [0, n) of a chunk. Writes each head's maximum score, sum of exponentials and unnormalised
// output row. G is a template argument so that the accumulators live in registers.
template <int G>
void attend_chunk(const float* qh, const at::Half* Kh, const at::Half* Vh, int64_t D,
                  int64_t L, int64_t n, float* scores, float* out_max, float* out_sum,
                  float* out) {
  // scores[g][l] = q_g . k_l, PB vectors of 16 positions at a time (independent FMA chains)
  constexpr int PB = G <= 3 ? 4 : G <= 6 ? 2 : 1;
  for (int64_t l = 0; l < n; l += 16 * PB) {
    __m512 acc[G][PB];
    for (int g = 0; g < G; ++g)
      for (int b = 0; b < PB; ++b) acc[g][b] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      __m512 k[PB];
      for (int b = 0; b < PB; ++b) {
        const int64_t at = l + 16 * b;  // positions past the chunk are not read: zeros
        k[b] = at + 16 <= n ? load_half(Kh + d * L + at)
                            : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                                  at >= n ? 0 : static_cast<__mmask16>((1u << (n - at)) - 1),
                                  Kh + d * L + at));
      }
      for (int g = 0; g < G; ++g) {
        const __m512 qv = _mm512_set1_ps(qh[g * D + d]);
        for (int b = 0; b < PB; ++b) acc[g][b] = _mm512_fmadd_ps(qv, k[b], acc[g][b]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int b = 0; b < PB; ++b) _mm512_store_ps(scores + g * kChunk + l + 16 * b, acc[g][b]);
  }
  // softmax numerators; positions n.. of the last vector are masked out
  const __mmask16 tail = n % 16 ? static_cast<__mmask16>((1u << (n % 16)) - 1) : 0xFFFF;
  const int64_t last = (n - 1) / 16 * 16;
  for (int g = 0; g < G; ++g) {
    float* s = scores + g * kChunk;
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int64_t l = 0; l < last; l += 16) mv = _mm512_max_ps(mv, _mm512_load_ps(s + l));
    mv = _mm512_mask_max_ps(mv, tail, mv, _mm512_load_ps(s + last));
    const float m = _mm512_reduce_max_ps(mv);
    mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t l = 0; l <= last; l += 16) {
      __m512 e = exp16(_mm512_sub_ps(_mm512_load_ps(s + l), mv));
      if (l == last) e = _mm512_maskz_mov_ps(tail, e);
      _mm512_store_ps(s + l, e);
      sum = _mm512_add_ps(sum, e);
    }
    out_max[g] = m;
    out_sum[g] = _mm512_reduce_add_ps(sum);
  }
  // out[g] = sum_l p[g][l] v_l, NB vectors of the head at a time, each value row read once
  constexpr int NB = G <= 3 ? 4 : 2;
  for (int64_t o = 0; o < D; o += 16 * NB) {
    const int nb = static_cast<int>(std::min<int64_t>(NB, (D - o) / 16));
    __m512 acc[G][NB];
    for (int g = 0; g < G; ++g)
      for (int b = 0; b < NB; ++b) acc[g][b] = _mm512_setzero_ps();
    for (int64_t l = 0; l < n; ++l) {
      __m512 v[NB];
      for (int b = 0; b < NB; ++b) v[b] = b < nb ? load_half(Vh + l * D + o + 16 * b) : _mm512_setzero_ps();
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(scores[g * kChunk + l]);
        for (int b = 0; b < NB; ++b) acc[g][b] = _mm512_fmadd_ps(p, v[b], acc[g][b]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int b = 0; b < nb; ++b) _mm512_storeu_ps(out + g * D + o + 16 * b, acc[g][b]);
  }
}

using ChunkFn = void (*)(const float*, const at::Half*, const at::Half*, int64_t, int64_t,
                         int64_t, float*, float*, float*, float*);
constexpr ChunkFn kChunkFns[kMaxGroup] = {attend_chunk<1>, attend_chunk<2>, attend_chunk<3>,
                                          attend_chunk<4>, attend_chunk<5>, attend_chunk<6>,
                                          attend_chunk<7>, attend_chunk<8>};

// Attention of one query per head at position `pos`, after writing that position's key and
// value into the caches. q: (H, D) float32, already multiplied by the attention scale;
// kp, vp: (Hkv, D) float32; K: keys (Hkv, D, L) float16, transposed so that 16 positions'
// scores are one vector operation; V: values (Hkv, L, D) float16. O: (H, D) float32.
void attend(const float* Q, const float* kp, const float* vp, at::Half* K, at::Half* V,
            int64_t H, int64_t Hkv, int64_t D, int64_t L, int64_t pos, float* O) {
  const int64_t G = H / Hkv, T = pos + 1;
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  for (int64_t h = 0; h < Hkv; ++h) {
    for (int64_t d = 0; d < D; ++d)
      K[(h * D + d) * L + pos] = at::Half(std::clamp(kp[h * D + d], -kHalfMax, kHalfMax));
    for (int64_t d = 0; d < D; d += 16)
      store_half(V + (h * L + pos) * D + d, _mm512_loadu_ps(vp + h * D + d));
  }
  // per (kv head, chunk, group member): maximum score, sum of exponentials, output row
  std::vector<float> part_max(Hkv * chunks * G), part_sum(Hkv * chunks * G);
  std::vector<float> part_out(Hkv * chunks * G * D);
  const ChunkFn chunk_fn = kChunkFns[G - 1];

  at::parallel_for(0, Hkv * chunks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float scores[kMaxGroup * kChunk];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / chunks, l0 = task % chunks * kChunk;
      chunk_fn(Q + h * G * D, K + h * D * L + l0, V + (h * L + l0) * D, D, L,
               std::min(kChunk, T - l0), scores, part_max.data() + task * G,
               part_sum.data() + task * G, part_out.data() + task * G * D);
    }
  });

  // combine the chunks: rescale each by exp(its max - the overall max)
  for (int64_t h = 0; h < Hkv; ++h) {
    for (int64_t g = 0; g < G; ++g) {
      float m = -INFINITY;
      for (int64_t c = 0; c < chunks; ++c) m = std::max(m, part_max[(h * chunks + c) * G + g]);
      float total = 0.f;
      float* o = O + (h * G + g) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t i = (h * chunks + c) * G + g;
        const float w = std::exp(part_max[i] - m);
        total += w * part_sum[i];
        const float* po = part_out.data() + i * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * po[d];
      }
      for (int64_t d = 0; d < D; ++d) o[d] /= total;
    }
  }
}

void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t H, int64_t D,
                  int64_t pos) {
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.dim() == 3 && k_cache.scalar_type() == at::kHalf &&
                  v_cache.scalar_type() == at::kHalf && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "caches must be contiguous float16 tensors");
  const int64_t Hkv = v_cache.size(0), L = v_cache.size(1);
  TORCH_CHECK(Hkv > 0 && H >= Hkv, "at least one key/value head, and no more than query heads");
  TORCH_CHECK(v_cache.size(2) == D && k_cache.size(0) == Hkv && k_cache.size(1) == D &&
                  k_cache.size(2) == L,
              "caches must be keys (Hkv, D, L) and values (Hkv, L, D)");
  TORCH_CHECK(D % 16 == 0, "head size must be a multiple of 16");
  TORCH_CHECK(H % Hkv == 0 && H / Hkv <= kMaxGroup,
              "query heads must be 1 to 8 times the key/value heads");
  TORCH_CHECK(pos >= 0 && pos < L, "position outside the cache");
}

// The op: q (H, D) float32; k_new, v_new (Hkv, D); caches as for `attend`.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_new,
                            const at::Tensor& v_new, at::Tensor k_cache, at::Tensor v_cache,
                            int64_t pos) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q must be a contiguous (H, D) float32 tensor");
  const int64_t H = q.size(0), D = q.size(1), Hkv = v_cache.size(0);
  check_caches(k_cache, v_cache, H, D, pos);
  const at::Tensor kn = k_new.contiguous().to(at::kFloat), vn = v_new.contiguous().to(at::kFloat);
  TORCH_CHECK(kn.numel() == Hkv * D && vn.numel() == Hkv * D, "new key/value must be (Hkv, D)");
  at::Tensor out = at::empty({H, D}, q.options());
  attend(q.data_ptr<float>(), kn.data_ptr<float>(), vn.data_ptr<float>(),
         k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>(), H, Hkv, D,
         v_cache.size(1), pos, out.data_ptr<float>());
  return out;
}

// ---- prompt (prefill) attention: causal, many queries, flash-attention style ----------
//
// Query rows of one key/value head (its G query heads times a block of kQB positions) go
// through the keys in blocks of 64 with an online softmax: S = Q K (a 6-row x 64-position
// register tile), then O += P V (6 rows x 64 dimensions). The products are AVX512-BF16
// dot products of bfloat16 pairs accumulated in float32 (the activations are bfloat16
// already; P is rounded to bfloat16 as in PyTorch's own bfloat16 attention), so keys come
// as pairs of dimensions per position, (Hkv, D/2, T, 2), and values as pairs of positions
// per dimension, (Hkv, ceil(T/2), D, 2).

#ifdef __AVX512BF16__
constexpr int64_t kQB = 32;  // query positions per task
constexpr int64_t kKB = 64;  // key positions per block

inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? 0xFFFF : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
}

// S[r][0..64) = q_r . k_{l0..l0+n}; qrows: R bfloat16 rows; Kp: (D/2, T, 2)
template <int R>
void qk_rows(const at::BFloat16* const* qrows, const at::BFloat16* Kp, int64_t T, int64_t D,
             int64_t l0, int64_t n, float* S) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < 4; ++b) acc[r][b] = _mm512_setzero_ps();
  __mmask16 masks[4];
  for (int b = 0; b < 4; ++b) masks[b] = lanes(n - 16 * b);
  for (int64_t dp = 0; dp < D / 2; ++dp) {
    __m512i k[4];
    for (int b = 0; b < 4; ++b)
      k[b] = _mm512_maskz_loadu_epi32(masks[b], Kp + (dp * T + l0 + 16 * b) * 2);
    for (int r = 0; r < R; ++r) {
      const __m512i qv = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(qrows[r])[dp]);
      for (int b = 0; b < 4; ++b)
        acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)qv, (__m512bh)k[b]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < 4; ++b) _mm512_storeu_ps(S + r * kKB + 16 * b, acc[r][b]);
}

// O_r += sum_l P[r][l] v_l; P: R rows of kKB bfloat16; Vp: (ceil(T/2), D, 2)
template <int R>
void pv_rows(const at::BFloat16* P, const at::BFloat16* Vp, int64_t D, int64_t l0, int64_t n,
             float* const* orows) {
  for (int64_t o = 0; o < D; o += 64) {
    const int nb = static_cast<int>(std::min<int64_t>(4, (D - o) / 16));
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < 4; ++b)
        acc[r][b] = b < nb ? _mm512_loadu_ps(orows[r] + o + 16 * b) : _mm512_setzero_ps();
    for (int64_t lp = 0; lp < (n + 1) / 2; ++lp) {
      __m512i v[4];
      for (int b = 0; b < 4; ++b)
        v[b] = b < nb ? _mm512_loadu_si512(Vp + ((l0 / 2 + lp) * D + o + 16 * b) * 2)
                      : _mm512_setzero_si512();
      for (int r = 0; r < R; ++r) {
        const __m512i p = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(P + r * kKB)[lp]);
        for (int b = 0; b < 4; ++b)
          acc[r][b] = _mm512_dpbf16_ps(acc[r][b], (__m512bh)p, (__m512bh)v[b]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < nb; ++b) _mm512_storeu_ps(orows[r] + o + 16 * b, acc[r][b]);
  }
}

using QkFn = void (*)(const at::BFloat16* const*, const at::BFloat16*, int64_t, int64_t,
                      int64_t, int64_t, float*);
using PvFn = void (*)(const at::BFloat16*, const at::BFloat16*, int64_t, int64_t, int64_t,
                      float* const*);
constexpr QkFn kQk[6] = {qk_rows<1>, qk_rows<2>, qk_rows<3>, qk_rows<4>, qk_rows<5>, qk_rows<6>};
constexpr PvFn kPv[6] = {pv_rows<1>, pv_rows<2>, pv_rows<3>, pv_rows<4>, pv_rows<5>, pv_rows<6>};
#endif

// q: (H, T, D) bfloat16, already scaled; keys (Hkv, D/2, T, 2) and values
// (Hkv, ceil(T/2), D, 2) bfloat16, as described above. Returns (T, H * D) bfloat16: causal
// attention of every position over positions 0..itself.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& keys,
                             const at::Tensor& values) {
#ifndef __AVX512BF16__
  TORCH_CHECK(false, "prefill_attention needs a CPU with AVX512-BF16");
#else
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 4 && values.dim() == 4 &&
                  q.scalar_type() == at::kBFloat16 && keys.scalar_type() == at::kBFloat16 &&
                  values.scalar_type() == at::kBFloat16 && q.is_contiguous() &&
                  keys.is_contiguous() && values.is_contiguous(),
              "q, keys and values must be contiguous bfloat16 tensors");
  const int64_t H = q.size(0), T = q.size(1), D = q.size(2), Hkv = keys.size(0);
  TORCH_CHECK(keys.size(1) == D / 2 && keys.size(2) == T && keys.size(3) == 2 &&
                  values.size(0) == Hkv && values.size(1) == (T + 1) / 2 &&
                  values.size(2) == D && values.size(3) == 2,
              "expected q (H, T, D), keys (Hkv, D/2, T, 2), values (Hkv, ceil(T/2), D, 2)");
  TORCH_CHECK(D % 16 == 0 && H % Hkv == 0, "head size a multiple of 16, whole query groups");
  const int64_t G = H / Hkv, blocks = (T + kQB - 1) / kQB;
  at::Tensor out = at::empty({T, H * D}, q.options());
  const at::BFloat16* Q = q.data_ptr<at::BFloat16>();
  const at::BFloat16* K = keys.data_ptr<at::BFloat16>();
  const at::BFloat16* V = values.data_ptr<at::BFloat16>();
  at::BFloat16* O = out.data_ptr<at::BFloat16>();

  at::parallel_for(0, Hkv * blocks, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows_max = G * kQB;
    std::vector<float> S(rows_max * kKB), acc(rows_max * D), m(rows_max), sum(rows_max);
    std::vector<at::BFloat16> P(rows_max * kKB);
    std::vector<const at::BFloat16*> qrows(rows_max);
    std::vector<float*> orows(rows_max);
    for (int64_t task = begin; task < end; ++task) {
      // later query blocks attend over more keys: they are handed out first
      const int64_t h = task % Hkv, q0 = (blocks - 1 - task / Hkv) * kQB;
      const int64_t nq = std::min(kQB, T - q0), rows = G * nq;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < nq; ++i) {
          qrows[g * nq + i] = Q + ((h * G + g) * T + q0 + i) * D;
          orows[g * nq + i] = acc.data() + (g * nq + i) * D;
        }
      std::fill(acc.begin(), acc.begin() + rows * D, 0.f);
      std::fill(m.begin(), m.begin() + rows, -INFINITY);
      std::fill(sum.begin(), sum.begin() + rows, 0.f);
      const at::BFloat16* Kh = K + h * D * T;
      const at::BFloat16* Vh = V + h * ((T + 1) / 2) * D * 2;
      for (int64_t l0 = 0; l0 < q0 + nq; l0 += kKB) {
        const int64_t n = std::min(kKB, q0 + nq - l0);
        for (int64_t r = 0; r < rows; r += 6)
          kQk[std::min<int64_t>(6, rows - r) - 1](qrows.data() + r, Kh, T, D, l0, n,
                                                   S.data() + r * kKB);
        // causal mask, online softmax: what came before is rescaled by exp(old - new max)
        for (int64_t r = 0; r < rows; ++r) {
          const float* s = S.data() + r * kKB;
          const int64_t visible = std::min(n, q0 + r % nq - l0 + 1);  // keys <= the query
          __m512 mv = _mm512_set1_ps(m[r]);
          for (int64_t j = 0; j < visible; j += 16)
            mv = _mm512_mask_max_ps(mv, lanes(visible - j), mv, _mm512_loadu_ps(s + j));
          const float mx = _mm512_reduce_max_ps(mv);
          const float scale = std::exp(m[r] - mx);
          __m512 total = _mm512_setzero_ps();
          for (int64_t j = 0; j < kKB; j += 16) {
            const __m512 e = _mm512_maskz_mov_ps(
                lanes(visible - j),
                exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), _mm512_set1_ps(mx))));
            const __m256bh eb = _mm512_cvtneps_pbh(e);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(P.data() + r * kKB + j),
                                (__m256i)eb);
            total = _mm512_add_ps(total, _mm512_cvtpbh_ps(eb));  // the weights P V uses
          }
          sum[r] = sum[r] * scale + _mm512_reduce_add_ps(total);
          m[r] = mx;
          if (scale != 1.f)
            for (int64_t d = 0; d < D; d += 16)
              _mm512_storeu_ps(orows[r] + d, _mm512_mul_ps(_mm512_loadu_ps(orows[r] + d),
                                                           _mm512_set1_ps(scale)));
        }
        for (int64_t r = 0; r < rows; r += 6)
          kPv[std::min<int64_t>(6, rows - r) - 1](P.data() + r * kKB, Vh, D, l0, n,
                                                   orows.data() + r);
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < nq; ++i) {
          const int64_t r = g * nq + i;
          at::BFloat16* dst = O + (q0 + i) * H * D + (h * G + g) * D;
          const float inv = 1.f / sum[r];
          for (int64_t d = 0; d < D; ++d) dst[d] = at::BFloat16(orows[r][d] * inv);
        }
    }
  });
  return out;
#endif
}

// Whether prefill_attention was built (the compiling CPU has AVX512-BF16).
bool prefill_supported() {
#ifdef __AVX512BF16__
  return true;
#else
  return false;
#endif
}

// y = x / sqrt(mean(x^2) + eps) * w, in float32, written as bfloat16
void rms_norm(const float* x, const float* w, int64_t n, float eps, at::BFloat16* y) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = at::BFloat16(x[i] * r * w[i]);
}

// transformers' half rotation: (a, b) -> (a cos - b sin, b cos + a sin), into float32
void rope(const at::BFloat16* x, const float* cos, const float* sin, int64_t D, float* y) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    y[i] = a * cos[i] - b * sin[i];
    y[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  return at::_weight_int4pack_mm_for_cpu(x, packed, 32, scales);
}

// One decoding step through every layer of a Llama network, the residual stream in float32.
// x: (1, C) float32, the new token's embedding. weights: 10 per layer (norm1 and norm2 as
// float32 (C,), then packed int4 and scales of qkv, o, gate_up and down, as made by
// rag_app/fast_decoder.py); caches: keys and values per layer; cos, sin: (D,) float32 rows
// for `pos`. Returns the residual stream after the last layer, (1, C) float32.
at::Tensor decode_layers(const at::Tensor& x_in, at::TensorList weights, at::TensorList caches,
                         const at::Tensor& cos, const at::Tensor& sin, int64_t pos,
                         int64_t heads, double eps) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(0) == 1 && x_in.scalar_type() == at::kFloat,
              "x must be one float32 row");
  const int64_t layers = static_cast<int64_t>(caches.size()) / 2;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 10 * layers && layers > 0,
              "10 weights and 2 caches per layer");
  const int64_t C = x_in.size(1), H = heads, D = caches[1].size(2), Hkv = caches[1].size(0);
  TORCH_CHECK(cos.numel() == D && sin.numel() == D && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous(),
              "cos and sin must be contiguous float32 rows of the head size");
  for (int64_t layer = 0; layer < layers; ++layer) {  // the shapes the loops below rely on
    const at::Tensor* w = weights.data() + 10 * layer;
    TORCH_CHECK(w[0].numel() == C && w[1].numel() == C && w[0].scalar_type() == at::kFloat &&
                    w[1].scalar_type() == at::kFloat && w[0].is_contiguous() &&
                    w[1].is_contiguous(),
                "norm weights must be contiguous float32 vectors of the model width");
    // scales and zeros are (in / 32, out, 2): check each product's in and out widths
    const int64_t I2 = w[7].dim() == 3 ? w[7].size(1) : 0;
    const int64_t widths[4][2] = {{C, (H + 2 * Hkv) * D}, {H * D, C}, {C, I2}, {I2 / 2, C}};
    for (int p = 0; p < 4; ++p) {
      const at::Tensor& sc = w[3 + 2 * p];
      TORCH_CHECK(sc.dim() == 3 && sc.size(0) * 32 == widths[p][0] &&
                      sc.size(1) == widths[p][1] && sc.size(2) == 2 && I2 % 2 == 0,
                  "int4 scales of layer ", layer, " do not fit the model's shapes");
    }
  }
  at::Tensor x = x_in.contiguous().clone();
  float* X = x.data_ptr<float>();
  const auto bf16 = x.options().dtype(at::kBFloat16);
  at::Tensor h = at::empty({1, C}, bf16);
  at::Tensor a = at::empty({1, H * D}, bf16);
  std::vector<float> q(H * D), k(Hkv * D), v(Hkv * D), o(H * D);
  const float* cs = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  for (int64_t layer = 0; layer < layers; ++layer) {
    const at::Tensor* w = weights.data() + 10 * layer;
    at::Tensor keys = caches[2 * layer], values = caches[2 * layer + 1];
    check_caches(keys, values, H, D, pos);
    rms_norm(X, w[0].data_ptr<float>(), C, static_cast<float>(eps), h.data_ptr<at::BFloat16>());
    const at::Tensor qkv = int4_mm(h, w[2], w[3]);  // (1, (H + 2 Hkv) D) bfloat16
    const at::BFloat16* p = qkv.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < H; ++i) rope(p + i * D, cs, sn, D, q.data() + i * D);
    for (int64_t i = 0; i < Hkv; ++i) rope(p + (H + i) * D, cs, sn, D, k.data() + i * D);
    for (int64_t i = 0; i < Hkv * D; ++i) v[i] = p[(H + Hkv) * D + i];
    attend(q.data(), k.data(), v.data(), keys.data_ptr<at::Half>(),
           values.data_ptr<at::Half>(), H, Hkv, D, values.size(1), pos, o.data());
    at::BFloat16* ap = a.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < H * D; ++i) ap[i] = at::BFloat16(o[i]);
    const at::Tensor attn = int4_mm(a, w[4], w[5]);
    const at::BFloat16* ao = attn.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < C; ++i) X[i] += static_cast<float>(ao[i]);

    rms_norm(X, w[1].data_ptr<float>(), C, static_cast<float>(eps), h.data_ptr<at::BFloat16>());
    at::Tensor gate_up = int4_mm(h, w[6], w[7]);  // (1, 2 I): silu(gate) * up, in place
    const int64_t I = gate_up.size(1) / 2;
    at::BFloat16* gu = gate_up.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < I; ++i) {
      const float g = gu[i];
      gu[i] = at::BFloat16(g / (1.f + std::exp(-g)) * static_cast<float>(gu[I + i]));
    }
    const at::Tensor down = int4_mm(gate_up.narrow(1, 0, I).contiguous(), w[8], w[9]);
    const at::BFloat16* dp = down.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < C; ++i) X[i] += static_cast<float>(dp[i]);
  }
  return x;
}

}  // namespace

TORCH_LIBRARY(rag_app, m) {
  m.def("decode_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int pos) -> Tensor");
  m.def("prefill_attention(Tensor q, Tensor keys, Tensor values) -> Tensor");
  m.def("prefill_supported() -> bool", &prefill_supported);  // no tensors: any backend
  m.def("decode_layers(Tensor x, Tensor[] weights, Tensor(a!)[] caches, Tensor cos, "
        "Tensor sin, int pos, int heads, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(rag_app, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_layers", &decode_layers);
  m.impl("prefill_attention", &prefill_attention);
}
