// Single-query attention over a float16 key/value cache, for the fast CPU decoder.
//
// One decoding step attends one new query per head over every cached position. PyTorch's
// kernels for that shape either read a float32 cache (twice the bytes of float16) or run
// slower in half precision. This kernel reads the float16 cache once, converts it in
// registers and accumulates in float32 (as llama.cpp does), with grouped-query heads
// sharing each key and value row and the positions split in chunks over the threads
// (split-K "flash decoding": per-chunk maxima, sums and outputs, combined at the end).
//
// Registered as torch.ops.rag_app.decode_attention; built on first use by
// rag_app/kernels.py with the machine's own compiler and instruction set.

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
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)),
                    _mm512_set1_ps(-88.3762626647949f));
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

inline void store_half(at::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// One task: query heads g0..g0+G-1 sharing key/value head `Kh`/`Vh`, over positions
// [0, n) of a chunk. Writes each head's maximum score, sum of exponentials and unnormalised
// output row. G is a template argument so that the accumulators live in registers.
template <int G>
void attend_chunk(const float* qh, const at::Half* Kh, const at::Half* Vh, int64_t D,
                  int64_t L, int64_t n, int64_t valid_to_end, float* scores, float* out_max,
                  float* out_sum, float* out) {
  // scores[g][l] = q_g . k_l, PB vectors of 16 positions at a time (independent FMA chains)
  constexpr int PB = G <= 3 ? 4 : G <= 6 ? 2 : 1;
  for (int64_t l = 0; l < n; l += 16 * PB) {
    __m512 acc[G][PB];
    for (int g = 0; g < G; ++g)
      for (int b = 0; b < PB; ++b) acc[g][b] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      __m512 k[PB];
      for (int b = 0; b < PB; ++b) {
        const int64_t at = l + 16 * b;  // positions past the cache's end read as zeros
        k[b] = at + 16 <= valid_to_end
                   ? load_half(Kh + d * L + at)
                   : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                         at >= valid_to_end ? 0 : static_cast<__mmask16>((1u << (valid_to_end - at)) - 1),
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
                         int64_t, int64_t, float*, float*, float*, float*);
constexpr ChunkFn kChunkFns[kMaxGroup] = {attend_chunk<1>, attend_chunk<2>, attend_chunk<3>,
                                          attend_chunk<4>, attend_chunk<5>, attend_chunk<6>,
                                          attend_chunk<7>, attend_chunk<8>};

// q: (H, D) float32, already multiplied by the attention scale.
// k_new, v_new: (Hkv, D) float32 for position `pos`, written into the caches first.
// k_cache: (Hkv, D, L) float16, transposed so that 16 positions' scores are one vector
// operation; v_cache: (Hkv, L, D) float16. Returns (H, D) float32: attention over 0..pos.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_new,
                            const at::Tensor& v_new, at::Tensor k_cache, at::Tensor v_cache,
                            int64_t pos) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q must be a contiguous (H, D) float32 tensor");
  TORCH_CHECK(k_cache.dim() == 3 && v_cache.dim() == 3 && k_cache.scalar_type() == at::kHalf &&
                  v_cache.scalar_type() == at::kHalf && k_cache.is_contiguous() &&
                  v_cache.is_contiguous(),
              "caches must be contiguous float16 tensors");
  const int64_t H = q.size(0), D = q.size(1);
  const int64_t Hkv = v_cache.size(0), L = v_cache.size(1);
  TORCH_CHECK(v_cache.size(2) == D && k_cache.size(0) == Hkv && k_cache.size(1) == D &&
                  k_cache.size(2) == L,
              "caches must be keys (Hkv, D, L) and values (Hkv, L, D)");
  TORCH_CHECK(D % 16 == 0, "head size must be a multiple of 16");
  TORCH_CHECK(H % Hkv == 0 && H / Hkv <= kMaxGroup,
              "query heads must be 1 to 8 times the key/value heads");
  TORCH_CHECK(pos >= 0 && pos < L, "position outside the cache");
  const at::Tensor kn = k_new.contiguous().to(at::kFloat), vn = v_new.contiguous().to(at::kFloat);
  TORCH_CHECK(kn.numel() == Hkv * D && vn.numel() == Hkv * D, "new key/value must be (Hkv, D)");

  const int64_t G = H / Hkv, T = pos + 1;
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  at::Half* K = k_cache.data_ptr<at::Half>();
  at::Half* V = v_cache.data_ptr<at::Half>();
  const float* kp = kn.data_ptr<float>();
  const float* vp = vn.data_ptr<float>();
  for (int64_t h = 0; h < Hkv; ++h) {
    for (int64_t d = 0; d < D; ++d) K[(h * D + d) * L + pos] = at::Half(kp[h * D + d]);
    for (int64_t d = 0; d < D; d += 16)
      store_half(V + (h * L + pos) * D + d, _mm512_loadu_ps(vp + h * D + d));
  }
  // per (kv head, chunk, group member): maximum score, sum of exponentials, output row
  std::vector<float> part_max(Hkv * chunks * G), part_sum(Hkv * chunks * G);
  std::vector<float> part_out(Hkv * chunks * G * D);
  const float* Q = q.data_ptr<float>();
  const ChunkFn chunk_fn = kChunkFns[G - 1];

  at::parallel_for(0, Hkv * chunks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float scores[kMaxGroup * kChunk];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / chunks, l0 = task % chunks * kChunk;
      chunk_fn(Q + h * G * D, K + h * D * L + l0, V + (h * L + l0) * D, D, L,
               std::min(kChunk, T - l0), L - l0, scores, part_max.data() + task * G,
               part_sum.data() + task * G, part_out.data() + task * G * D);
    }
  });

  // combine the chunks: rescale each by exp(its max - the overall max)
  at::Tensor out = at::empty({H, D}, q.options());
  float* O = out.data_ptr<float>();
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
  return out;
}

}  // namespace

TORCH_LIBRARY(rag_app, m) {
  m.def("decode_attention(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, int pos) -> Tensor");
}

TORCH_LIBRARY_IMPL(rag_app, CPU, m) { m.impl("decode_attention", &decode_attention); }
