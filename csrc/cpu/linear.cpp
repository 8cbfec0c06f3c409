// y = x @ weight^T (+ bias) for a few rows of x: the projections of a decode step.
//
// With one to sixteen rows the product is bound by reading the weight, yet the
// BLAS behind F.linear streams it at well under copy bandwidth (~15 GB/s for one
// row, 6-9 GB/s for four, against ~29 GB/s copy bandwidth on our 2-core AVX2
// machines; this kernel reads 27-30 GB/s for one row, 25-27 GB/s for four). It
// streams each weight row from memory once, in order, and takes all rows of x
// against it while it sits in L1. Work is split over weight rows with
// at::parallel_for; every output is summed in the same order whatever the split,
// so the result does not depend on the thread count.
//
// Layout: x (m, k) with unit stride along k; weight (n, k) with unit stride
// along k; bias (n) contiguous; y (m, n) contiguous, fp32 throughout.
//
// weight_only_linear is the same product for weights stored in fewer bytes:
// int8 with one fp32 scale per weight row (y = scale * (x . w_int8) + bias), or
// bf16. Each weight vector is widened to fp32 in registers as it is loaded, and
// x, the sums and y stay fp32: decoding reads the weights once per step, so
// 1 byte (int8) or 2 bytes (bf16) per weight instead of 4 are what speed it up,
// and the products round as fp32 ones do.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace lnlm_ssm {
namespace {

constexpr int64_t kMaxRows = 16;

// One vector is one hardware register (GCC vector types): a type wider than the
// registers is split by the compiler, and the accumulators then live on the stack
// (a store-to-load chain per FMA, slower than the BLAS). A tile is kTileRows weight
// rows against up to kTileCols rows of x: kTileRows * kTileCols accumulators, plus
// kTileCols x vectors and one weight vector, must fit the register file (32 zmm
// with AVX-512, 16 ymm or xmm otherwise).
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
constexpr int64_t kTileCols = 4;
#elif defined(__AVX__)
constexpr int64_t kLanes = 8;
constexpr int64_t kTileCols = 2;
#else
constexpr int64_t kLanes = 4;
constexpr int64_t kTileCols = 2;
#endif
constexpr int64_t kTileRows = 4;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float unaligned_vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(alignof(float))));

inline vec load(const float* p) {
  return *reinterpret_cast<const unaligned_vec*>(p);
}

// bf16 weights are passed as their bit patterns: a bf16 is the top half of the fp32 of the same value.
using bf16_bits = uint16_t;

// kLanes weights from p, widened to fp32: int8 by a sign extension and a conversion, bf16 by a
// zero extension and a shift. GCC's generic vector conversions compile on any target; where
// they vectorise (bf16) they are used as they are.
inline vec load_weight(const float* p) {
  return load(p);
}

inline vec load_weight(const int8_t* p) {
  // GCC 12 lowers a generic int8 -> int32 or -> float conversion to a scalar loop: the x86
  // sign extension is spelled out.
#if defined(__AVX512F__)
  // The zero-masked forms: GCC 12's unmasked ones start from an "undefined" register it then
  // warns about; a full mask compiles to the same instructions.
  const __m512i wide = _mm512_maskz_cvtepi8_epi32(0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_maskz_cvtepi32_ps(0xFFFF, wide);
#elif defined(__AVX2__)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  typedef int8_t unaligned_i8 __attribute__((vector_size(kLanes), aligned(1)));
  return __builtin_convertvector(*reinterpret_cast<const unaligned_i8*>(p), vec);
#endif
}

inline vec load_weight(const bf16_bits* p) {
  typedef uint16_t unaligned_u16 __attribute__((vector_size(kLanes * sizeof(uint16_t)), aligned(alignof(uint16_t))));
  typedef uint32_t u32 __attribute__((vector_size(kLanes * sizeof(uint32_t))));
  const u32 wide = __builtin_convertvector(*reinterpret_cast<const unaligned_u16*>(p), u32) << 16;
  return __builtin_bit_cast(vec, wide);
}

inline float to_float(float w) {
  return w;
}

inline float to_float(int8_t w) {
  return static_cast<float>(w);
}

inline float to_float(bf16_bits w) {
  const uint32_t bits = static_cast<uint32_t>(w) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// a * b + c, fused wherever the machine has FMA. Spelled out rather than left to
// the compiler's contraction, which fuses some tile shapes and not others: an
// output would then round differently depending on which tile the thread split
// put it in, and the result would depend on the thread count.
inline vec madd(vec a, vec b, vec c) {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(a, b, c);
#elif defined(__FMA__)
  return _mm256_fmadd_ps(a, b, c);
#else
  return a * b + c;
#endif
}

inline float madd(float a, float b, float c) {
#if defined(__FMA__)
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// The sum of v's lanes, halves first (lanes l and l + n/2, and so on down to one): a few
// vector adds where adding kLanes lanes one by one took a dependent scalar add and a lane
// extract each, which at 8 rows of x cost a third of the FMAs' time. The order is fixed,
// whatever tile the sum belongs to.
#if defined(__AVX__)
inline float hsum(__m256 v) {
  const __m128 quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
}
#endif

#if defined(__AVX512F__)
inline float hsum(__m512 v) {
  // Generic shuffles: GCC 12's extract intrinsics start from an "undefined" register it then warns about.
  typedef float half __attribute__((vector_size(32)));
  const half low = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const half high = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  return hsum(static_cast<__m256>(low + high));
}
#elif !defined(__AVX__)
inline float hsum(vec v) {
  float sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) {
    sum += v[l];
  }
  return sum;
}
#endif

// Each loaded weight vector feeds kCols FMAs and each x vector kRows; the lanes
// are summed once, at the end of the row. While it reads a cache line of each of
// its rows, the tile asks for the same line of the next tile's rows (the next
// 4 * k weights when the weight is contiguous): with short rows (k = 768 is 3 KB
// in fp32) the hardware prefetchers keep losing the streams at page boundaries,
// and 2-3 rows of x then read the weight at ~20% below copy bandwidth instead of
// ~at it. Once per line, not per vector: the extra loads cost one row of x ~5%
// otherwise. Into L2 (prefetcht1), not L1: on the 2-core EPYC (Zen 4) that read the
// weights at 0.86-0.89x copy bandwidth against 0.67-0.72x for prefetcht0 or
// prefetcht2, one row of x; 0.77-0.79x against 0.59-0.62x for 8 rows, where x
// (8 rows of 3 KB) no longer fits L1 beside prefetched weight lines; 0.93x against
// 0.57x for int8 weights, one row (interleaved runs, 2026-12-03; a prefetch
// distance of 2 or 4 tiles was no better). W is the weight's element type
// (float, int8_t, bf16_bits).
template <int64_t kRows, int64_t kCols, typename W>
inline void tile(const W* __restrict w, int64_t ldw, const float* __restrict x, int64_t ldx, int64_t k,
                 float (&out)[kRows][kCols]) {
  constexpr int64_t kLine = 64 / sizeof(W);  // weights per cache line
  vec acc[kRows][kCols] = {};
  auto step = [&](int64_t k0) {
    if constexpr (kCols > kTileCols) {
      // The wide tiles: the weight vectors held, each x vector loaded as it is used (the x
      // vectors of all columns would not fit the registers beside the accumulators).
      vec wv[kRows];
#pragma GCC unroll 16
      for (int64_t r = 0; r < kRows; ++r) {
        wv[r] = load_weight(w + r * ldw + k0);
      }
#pragma GCC unroll 16
      for (int64_t c = 0; c < kCols; ++c) {
        const vec xv = load(x + c * ldx + k0);
#pragma GCC unroll 16
        for (int64_t r = 0; r < kRows; ++r) {
          acc[r][c] = madd(wv[r], xv, acc[r][c]);
        }
      }
    } else {
      vec xv[kCols];
#pragma GCC unroll 16
      for (int64_t c = 0; c < kCols; ++c) {
        xv[c] = load(x + c * ldx + k0);
      }
#pragma GCC unroll 16
      for (int64_t r = 0; r < kRows; ++r) {
        const vec wv = load_weight(w + r * ldw + k0);
#pragma GCC unroll 16
        for (int64_t c = 0; c < kCols; ++c) {
          acc[r][c] = madd(wv, xv[c], acc[r][c]);
        }
      }
    }
  };
  int64_t k0 = 0;
  for (; k0 + kLine <= k; k0 += kLine) {
#pragma GCC unroll 16
    for (int64_t r = 0; r < kRows; ++r) {
      __builtin_prefetch(w + (r + kRows) * ldw + k0, /*rw=*/0, /*locality=*/2);
    }
#pragma GCC unroll 4
    for (int64_t v = 0; v < kLine; v += kLanes) {
      step(k0 + v);
    }
  }
  for (; k0 + kLanes <= k; k0 += kLanes) {
    step(k0);
  }
  const int64_t k_main = k0;
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t c = 0; c < kCols; ++c) {
      float sum = hsum(acc[r][c]);
      for (int64_t i = k_main; i < k; ++i) {
        sum = madd(to_float(w[r * ldw + i]), x[c * ldx + i], sum);
      }
      out[r][c] = sum;
    }
  }
}

// What a product needs besides its weight: x (m, k), the optional per-row scale
// (int8 weights) and bias, y (m, n).
struct Operands {
  const float* x;
  int64_t ldx;
  const float* scale;
  const float* bias;
  float* y;
  int64_t m, n, k;
};

// kRows weight rows from j against the kCols rows of x from i, scaled, plus bias, into y.
template <int64_t kRows, int64_t kCols, typename W>
inline void tile_to_y(const W* w, int64_t ldw, const Operands& o, int64_t j, int64_t i) {
  float out[kRows][kCols];
  tile<kRows, kCols>(w + j * ldw, ldw, o.x + i * o.ldx, o.ldx, o.k, out);
  for (int64_t r = 0; r < kRows; ++r) {
    // Fused: exactly out + b when there is no scale, and one rounding whichever tile this is.
    const float s = o.scale ? o.scale[j + r] : 1.0f;
    const float b = o.bias ? o.bias[j + r] : 0.0f;
    for (int64_t c = 0; c < kCols; ++c) {
      o.y[(i + c) * o.n + j + r] = madd(out[r][c], s, b);
    }
  }
}

// The rows of x left after the full kTileCols groups, one tile of exactly that many.
template <int64_t kRows, int64_t kCols = kTileCols - 1, typename W>
inline void remainder_to_y(const W* w, int64_t ldw, const Operands& o, int64_t j, int64_t i, int64_t cols) {
  if constexpr (kCols > 0) {
    if (cols == kCols) {
      tile_to_y<kRows, kCols>(w, ldw, o, j, i);
    } else {
      remainder_to_y<kRows, kCols - 1>(w, ldw, o, j, i, cols);
    }
  }
}

// Weight rows [begin, end) against all m rows of x: full tiles, then the edges.
template <int64_t kRows, typename W>
void rows_against_x(const W* w, int64_t ldw, const Operands& o, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; j += kRows) {
    if (j + kRows > end) {
      rows_against_x<1>(w, ldw, o, j, end);
      return;
    }
    int64_t i = 0;
    for (; i + kTileCols <= o.m; i += kTileCols) {
      tile_to_y<kRows, kTileCols>(w, ldw, o, j, i);
    }
    remainder_to_y<kRows>(w, ldw, o, j, i, o.m - i);
  }
}

#if defined(__AVX512F__)
// From 8 rows of x on, the FMAs bound the product more than the reads: kWideRows weight rows
// against kWideCols rows of x, each weight vector loaded once for all of them (the 4 x 4 tiles
// read each weight vector once per 4 rows of x, again from L1), 24 accumulators. Each output
// sums in the same order as in any other tile, so the result does not depend on the tile.
constexpr int64_t kWideRows = 3;
constexpr int64_t kWideCols = 8;

template <typename W>
void wide_rows_against_x(const W* w, int64_t ldw, const Operands& o, int64_t begin, int64_t end) {
  int64_t j = begin;
  for (; j + kWideRows <= end; j += kWideRows) {
    int64_t i = 0;
    for (; i + kWideCols <= o.m; i += kWideCols) {
      tile_to_y<kWideRows, kWideCols>(w, ldw, o, j, i);
    }
    for (; i + kTileCols <= o.m; i += kTileCols) {
      tile_to_y<kWideRows, kTileCols>(w, ldw, o, j, i);
    }
    remainder_to_y<kWideRows>(w, ldw, o, j, i, o.m - i);
  }
  rows_against_x<1>(w, ldw, o, j, end);
}
#endif

// y = x @ w^T (* scale) (+ bias) over all n weight rows, split between threads by weight rows.
template <typename W>
void linear_rows(const W* w, int64_t ldw, const Operands& o) {
  // About 64 KB of weight per task: enough to amortise the task, small enough to balance.
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(o.k * sizeof(W), 1));
  at::parallel_for(0, o.n, grain, [&](int64_t begin, int64_t end) {
#if defined(__AVX512F__)
    if (o.m >= kWideCols) {
      wide_rows_against_x(w, ldw, o, begin, end);
      return;
    }
#endif
    rows_against_x<kTileRows>(w, ldw, o, begin, end);
  });
}

void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= kMaxRows && x.stride(1) == 1, op, ": x must be (m, k) with m <= ", kMaxRows,
              " and unit stride along k; got shape ", x.sizes(), ", strides ", x.strides());
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": x must be float32; got ", x.scalar_type());
}

void check_weight(const char* op, const at::Tensor& weight, int64_t k) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == k && weight.stride(1) == 1, op,
              ": weight must be (n, k) with k = ", k, " and unit stride along k; got shape ", weight.sizes(),
              ", strides ", weight.strides());
}

void check_vector(const char* op, const char* arg, const std::optional<at::Tensor>& t, int64_t n) {
  if (t.has_value()) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->is_contiguous() && t->scalar_type() == at::kFloat, op, ": ",
                arg, " must be a contiguous float32 (n,) with n = ", n, "; got shape ", t->sizes(), " and dtype ",
                t->scalar_type());
  }
}

Operands operands(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& bias, at::Tensor& y) {
  return Operands{
      x.const_data_ptr<float>(),
      x.stride(0),
      scale.has_value() ? scale->const_data_ptr<float>() : nullptr,
      bias.has_value() ? bias->const_data_ptr<float>() : nullptr,
      y.mutable_data_ptr<float>(),
      x.size(0),
      weight.size(0),
      x.size(1),
  };
}

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  constexpr const char* kOp = "decode_linear (cpu)";
  check_x(kOp, x);
  check_weight(kOp, weight, x.size(1));
  TORCH_CHECK(weight.scalar_type() == at::kFloat, kOp, ": x and weight must be float32; got ", x.scalar_type(),
              " and ", weight.scalar_type());
  check_vector(kOp, "bias", bias, weight.size(0));
  auto y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (y.numel() == 0) {
    return y;
  }
  linear_rows(weight.const_data_ptr<float>(), weight.stride(0), operands(x, weight, std::nullopt, bias, y));
  return y;
}

// weight int8 (n, k) with scale (n,), or bf16 (n, k) without: y = x @ (scale * weight)^T + bias in fp32.
at::Tensor weight_only_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& bias) {
  constexpr const char* kOp = "weight_only_linear (cpu)";
  check_x(kOp, x);
  check_weight(kOp, weight, x.size(1));
  const bool int8 = weight.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || weight.scalar_type() == at::kBFloat16, kOp, ": weight must be int8 or bfloat16; got ",
              weight.scalar_type());
  TORCH_CHECK(int8 == scale.has_value(), kOp, ": int8 weights need a scale and bfloat16 weights take none; got ",
              weight.scalar_type(), " weights ", scale.has_value() ? "with" : "without", " a scale");
  check_vector(kOp, "scale", scale, weight.size(0));
  check_vector(kOp, "bias", bias, weight.size(0));
  auto y = at::empty({x.size(0), weight.size(0)}, x.options());
  if (y.numel() == 0) {
    return y;
  }
  const Operands o = operands(x, weight, scale, bias, y);
  if (int8) {
    linear_rows(weight.const_data_ptr<int8_t>(), weight.stride(0), o);
  } else {
    linear_rows(reinterpret_cast<const bf16_bits*>(weight.const_data_ptr<at::BFloat16>()), weight.stride(0), o);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lnlm_ssm, CPU, m) {
  m.impl("decode_linear", &decode_linear);
  m.impl("weight_only_linear", &weight_only_linear);
}

}  // namespace lnlm_ssm
