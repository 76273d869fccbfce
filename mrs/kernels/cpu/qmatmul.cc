// y[M, N] = x[M, K] . dequantize(W)[N, K]^T, reading W in mrs's quantized format
// (mrs/quant.py): codes uint32 [N, K * bits / 32] (each row one little-endian bit
// stream), scales and biases [N, K / group] in float16 or float32, with
// w[n, k] = scale[n, g] * code + bias[n, g].
//
// Per output row and group g, the kernel accumulates sum_k code * x over the group in
// vector registers and adds scale * that + bias * sum_k x (the group sums of x are
// computed once per call): the codes are turned into floats once per group and used by
// up to four rows of x, so decode (M = 1) reads each weight byte once and a prefill
// reads it once per four rows. Rows of W are split into blocks that XLA's intra-op
// threads (the FFI ThreadPool) claim from a shared counter; the calling thread works
// too and waits only for blocks already claimed, so a pool busy elsewhere never stalls it.
//
// AVX-512 or AVX2 + FMA + F16C where the compiler targets them (-march=native),
// portable C++ elsewhere. Built on first use by mrs/kernels/qmatmul.py; held to the numpy and jnp
// reference (dequantize, then dot) by tests/test_qmatmul.py.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define MRS_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MRS_AVX512 1   // 16 codes per step (full-width on Zen 5 and Intel's server cores)
#endif
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kTile = 4;  // rows of x that share one unpacking of the codes
constexpr int64_t kSmallProblem = int64_t(1) << 16;  // multiply-adds below which one thread runs alone

inline float half_to_float(uint16_t h) {
#ifdef MRS_AVX2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      int e = -1;
      uint32_t m = man;
      do { m <<= 1; ++e; } while (!(m & 0x400));
      bits = sign | ((127 - 15 - e) << 23) | ((m & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

inline float scale_at(const float* p) { return *p; }
inline float scale_at(const uint16_t* p) { return half_to_float(*p); }

// Code k of a row's bit stream (the portable path, and the reference inside this file).
template <int BITS>
inline uint32_t code_at(const uint8_t* row, int64_t k) {
  const int64_t bit = k * BITS;
  uint32_t two = row[bit / 8];
  if ((bit % 8) + BITS > 8) two |= uint32_t(row[bit / 8 + 1]) << 8;
  return (two >> (bit % 8)) & ((1u << BITS) - 1);
}

#ifdef MRS_AVX2
// Codes k .. k + 7 (k a multiple of 8) as floats.
template <int BITS>
inline __m256 codes8(const uint8_t* row, int64_t k);

template <>
inline __m256 codes8<8>(const uint8_t* row, int64_t k) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}

typedef int32_t __attribute__((may_alias, aligned(1))) unaligned_i32;
typedef long long __attribute__((may_alias, aligned(1))) unaligned_i64;

template <>
inline __m256 codes8<4>(const uint8_t* row, int64_t k) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i word = _mm256_set1_epi32(*reinterpret_cast<const unaligned_i32*>(row + k / 2));
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(word, shifts), _mm256_set1_epi32(0xF)));
}

// 8 five-bit codes are 40 bits from a byte boundary: one 64-bit broadcast, shifted so
// 64-bit lane j starts at code 2j; code 2j + 1 is moved up into the lane's high half.
inline __m256 five_bit_codes(__m256i bytes) {
  const __m256i pairs = _mm256_srlv_epi64(bytes, _mm256_setr_epi64x(0, 10, 20, 30));
  const __m256i both = _mm256_blend_epi32(pairs, _mm256_slli_epi64(pairs, 27), 0xAA);
  return _mm256_cvtepi32_ps(_mm256_and_si256(both, _mm256_set1_epi32(0x1F)));
}

template <>
inline __m256 codes8<5>(const uint8_t* row, int64_t k) {
  return five_bit_codes(_mm256_set1_epi64x(*reinterpret_cast<const unaligned_i64*>(row + k * 5 / 8)));
}

// The last 8 codes of a row: only 5 bytes are the row's (the next 3 may lie past the buffer).
inline __m256 last_five_bit_codes(const uint8_t* row, int64_t k) {
  uint64_t bytes = 0;
  std::memcpy(&bytes, row + k * 5 / 8, 5);
  return five_bit_codes(_mm256_set1_epi64x(static_cast<long long>(bytes)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

#ifdef MRS_AVX512
// Codes k .. k + 15 (k a multiple of 16) as floats.
template <int BITS>
inline __m512 codes16(const uint8_t* row, int64_t k, int64_t K);

template <>
inline __m512 codes16<8>(const uint8_t* row, int64_t k, int64_t) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k))));
}

template <>
inline __m512 codes16<4>(const uint8_t* row, int64_t k, int64_t) {
  // 8 bytes, two codes each (low nibble first): spread to one byte per code, in order
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k / 2));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
}

template <>
inline __m512 codes16<5>(const uint8_t* row, int64_t k, int64_t K) {
  const uint8_t* p = row + k * 5 / 8;             // 16 codes = 10 bytes
#ifdef __AVX512VBMI__
  if (k + 16 < K) {  // codes 0-7 from the 8 bytes at p, 8-15 from those at p + 5: one bit-field pick per byte
    const __m128i v = _mm_set_epi64x(*reinterpret_cast<const unaligned_i64*>(p + 5),
                                     *reinterpret_cast<const unaligned_i64*>(p));
    const __m128i at = _mm_set_epi8(35, 30, 25, 20, 15, 10, 5, 0, 35, 30, 25, 20, 15, 10, 5, 0);
    const __m128i codes = _mm_and_si128(_mm_multishift_epi64_epi8(at, v), _mm_set1_epi8(0x1F));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes));
  }
#endif
  const __m256 lo = codes8<5>(row, k);
  const __m256 hi = (k + 16 == K) ? last_five_bit_codes(row, k + 8) : codes8<5>(row, k + 8);
  (void)p;
  return _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
}
#endif
#endif

struct Problem {
  const float* x;       // [M, K]
  const uint8_t* w;     // [N, words] as bytes
  const void* scales;   // [N, groups]
  const void* biases;
  const float* xsum;    // [M, groups]: sum of x over each group
  float* y;             // [M, N]
  int64_t M, N, K, group, groups, row_bytes;
};

// Rows x[m0 .. m0 + T) against W's row n.
template <int BITS, typename S, int T>
inline void tile(const Problem& p, int64_t n, int64_t m0) {
  const uint8_t* row = p.w + n * p.row_bytes;
  const S* sc = static_cast<const S*>(p.scales) + n * p.groups;
  const S* bi = static_cast<const S*>(p.biases) + n * p.groups;
  float bias_sum[T] = {};
#if defined(MRS_AVX512)
  __m512 acc[T];
  for (int i = 0; i < T; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m512 part[T];
    for (int i = 0; i < T; ++i) part[i] = _mm512_setzero_ps();
    const int64_t k0 = g * p.group;
    for (int64_t k = k0; k < k0 + p.group; k += 16) {
      const __m512 c = codes16<BITS>(row, k, p.K);
      for (int i = 0; i < T; ++i)
        part[i] = _mm512_fmadd_ps(c, _mm512_loadu_ps(p.x + (m0 + i) * p.K + k), part[i]);
    }
    const __m512 s = _mm512_set1_ps(scale_at(sc + g));
    const float b = scale_at(bi + g);
    for (int i = 0; i < T; ++i) {
      acc[i] = _mm512_fmadd_ps(s, part[i], acc[i]);
      bias_sum[i] += b * p.xsum[(m0 + i) * p.groups + g];
    }
  }
  for (int i = 0; i < T; ++i) p.y[(m0 + i) * p.N + n] = _mm512_reduce_add_ps(acc[i]) + bias_sum[i];
#elif defined(MRS_AVX2)
  __m256 acc[T];
  for (int i = 0; i < T; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    __m256 part[T];
    for (int i = 0; i < T; ++i) part[i] = _mm256_setzero_ps();
    const int64_t k0 = g * p.group;
    for (int64_t k = k0; k < k0 + p.group; k += 8) {
      const __m256 c = (BITS == 5 && k + 8 == p.K) ? last_five_bit_codes(row, k) : codes8<BITS>(row, k);
      for (int i = 0; i < T; ++i)
        part[i] = _mm256_fmadd_ps(c, _mm256_loadu_ps(p.x + (m0 + i) * p.K + k), part[i]);
    }
    const __m256 s = _mm256_set1_ps(scale_at(sc + g));
    const float b = scale_at(bi + g);
    for (int i = 0; i < T; ++i) {
      acc[i] = _mm256_fmadd_ps(s, part[i], acc[i]);
      bias_sum[i] += b * p.xsum[(m0 + i) * p.groups + g];
    }
  }
  for (int i = 0; i < T; ++i) p.y[(m0 + i) * p.N + n] = hsum(acc[i]) + bias_sum[i];
#else
  float acc[T] = {};
  for (int64_t g = 0; g < p.groups; ++g) {
    float part[T] = {};
    const int64_t k0 = g * p.group;
    for (int64_t k = k0; k < k0 + p.group; ++k) {
      const float c = float(code_at<BITS>(row, k));
      for (int i = 0; i < T; ++i) part[i] += c * p.x[(m0 + i) * p.K + k];
    }
    const float s = scale_at(sc + g), b = scale_at(bi + g);
    for (int i = 0; i < T; ++i) {
      acc[i] += s * part[i];
      bias_sum[i] += b * p.xsum[(m0 + i) * p.groups + g];
    }
  }
  for (int i = 0; i < T; ++i) p.y[(m0 + i) * p.N + n] = acc[i] + bias_sum[i];
#endif
}

template <int BITS, typename S>
void rows(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    int64_t m = 0;
    for (; m + kTile <= p.M; m += kTile) tile<BITS, S, kTile>(p, n, m);
    switch (p.M - m) {
      case 3: tile<BITS, S, 3>(p, n, m); break;
      case 2: tile<BITS, S, 2>(p, n, m); break;
      case 1: tile<BITS, S, 1>(p, n, m); break;
      default: break;
    }
  }
}

using RowsFn = void (*)(const Problem&, int64_t, int64_t);

template <typename S>
RowsFn pick(int64_t bits) {
  switch (bits) {
    case 4: return rows<4, S>;
    case 5: return rows<5, S>;
    case 8: return rows<8, S>;
    default: return nullptr;
  }
}

// Blocks of rows claimed from a counter by the calling thread and the pool's threads.
struct Work {
  Problem problem;
  RowsFn fn;
  int64_t block, blocks;
  std::vector<float> xsum;
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    for (int64_t b; (b = next.fetch_add(1)) < blocks;) {
      fn(problem, b * block, std::min(problem.N, (b + 1) * block));
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error QMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U32> w, ffi::AnyBuffer scales,
                   ffi::AnyBuffer biases, ffi::ResultBuffer<ffi::F32> y, int64_t bits, int64_t group) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = scales.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || sd.size() != 2 || biases.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("mrs_qmatmul: x, weight, scales and biases must be 2-D");
  const int64_t M = xd[0], K = xd[1], N = wd[0];
  if (group <= 0 || group % 8 || K % group || K * bits % 32 || wd[1] != K * bits / 32)
    return ffi::Error::InvalidArgument("mrs_qmatmul: weight width does not match x's K, bits and group size");
  if (sd[0] != N || sd[1] != K / group || biases.dimensions()[0] != N || biases.dimensions()[1] != K / group)
    return ffi::Error::InvalidArgument("mrs_qmatmul: scales and biases must be [N, K / group_size]");
  const auto type = scales.element_type();
  if (biases.element_type() != type || (type != ffi::DataType::F16 && type != ffi::DataType::F32))
    return ffi::Error::InvalidArgument("mrs_qmatmul: scales and biases must both be float16 or float32");
  RowsFn fn = type == ffi::DataType::F16 ? pick<uint16_t>(bits) : pick<float>(bits);
  if (fn == nullptr) return ffi::Error::InvalidArgument("mrs_qmatmul: bits must be 4, 5 or 8");
  if (M == 0 || N == 0) return ffi::Error::Success();

  auto work = std::make_shared<Work>();
  const int64_t groups = K / group;
  work->xsum.resize(M * groups);
  const float* xs = x.typed_data();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += xs[m * K + k];
      work->xsum[m * groups + g] = s;
    }
  work->problem = Problem{xs, reinterpret_cast<const uint8_t*>(w.typed_data()), scales.untyped_data(),
                          biases.untyped_data(), work->xsum.data(), y->typed_data(), M, N, K, group, groups,
                          wd[1] * 4};
  work->fn = fn;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // Enough blocks to balance the threads, each big enough to amortize claiming it.
  const int64_t per_block = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, K * M));
  work->block = std::max<int64_t>(per_block, N / (threads * 8) + 1);
  work->blocks = (N + work->block - 1) / work->block;
  // Waking a pooled thread costs tens of microseconds: a small matrix is done sooner alone.
  const bool small = N * K * M < kSmallProblem;
  const int64_t helpers = small ? 0 : std::min<int64_t>(threads, work->blocks) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { work->run(); });
  work->run();
  while (work->done.load(std::memory_order_acquire) < work->blocks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MrsQMatmul, QMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group_size"));
