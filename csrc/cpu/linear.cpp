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

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

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

constexpr int64_t kLineFloats = 64 / sizeof(float);

// Each loaded weight vector feeds kCols FMAs and each x vector kRows; the lanes
// are summed once, at the end of the row. While it reads a cache line of each of
// its rows, the tile asks for the same line of the next tile's rows (the next
// 4 * k floats when the weight is contiguous): with short rows (k = 768 is 3 KB)
// the hardware prefetchers keep losing the streams at page boundaries, and 2-3
// rows of x then read the weight at ~20% below copy bandwidth instead of ~at it.
// Once per line, not per vector: the extra loads cost one row of x ~5% otherwise.
template <int64_t kRows, int64_t kCols>
inline void tile(const float* __restrict w, int64_t ldw, const float* __restrict x, int64_t ldx, int64_t k,
                 float (&out)[kRows][kCols]) {
  vec acc[kRows][kCols] = {};
  auto step = [&](int64_t k0) {
    vec xv[kCols];
#pragma GCC unroll 16
    for (int64_t c = 0; c < kCols; ++c) {
      xv[c] = load(x + c * ldx + k0);
    }
#pragma GCC unroll 16
    for (int64_t r = 0; r < kRows; ++r) {
      const vec wv = load(w + r * ldw + k0);
#pragma GCC unroll 16
      for (int64_t c = 0; c < kCols; ++c) {
        acc[r][c] = madd(wv, xv[c], acc[r][c]);
      }
    }
  };
  int64_t k0 = 0;
  for (; k0 + kLineFloats <= k; k0 += kLineFloats) {
#pragma GCC unroll 16
    for (int64_t r = 0; r < kRows; ++r) {
      __builtin_prefetch(w + (r + kRows) * ldw + k0);
    }
#pragma GCC unroll 4
    for (int64_t v = 0; v < kLineFloats; v += kLanes) {
      step(k0 + v);
    }
  }
  for (; k0 + kLanes <= k; k0 += kLanes) {
    step(k0);
  }
  const int64_t k_main = k0;
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t c = 0; c < kCols; ++c) {
      float sum = 0.0f;
      for (int64_t l = 0; l < kLanes; ++l) {
        sum += acc[r][c][l];
      }
      for (int64_t i = k_main; i < k; ++i) {
        sum = madd(w[r * ldw + i], x[c * ldx + i], sum);
      }
      out[r][c] = sum;
    }
  }
}

// kRows weight rows from j against the kCols rows of x from i, plus bias, into y.
template <int64_t kRows, int64_t kCols>
inline void tile_to_y(const float* w, int64_t ldw, const float* x, int64_t ldx, const float* bias, float* y, int64_t n,
                      int64_t k, int64_t j, int64_t i) {
  float out[kRows][kCols];
  tile<kRows, kCols>(w + j * ldw, ldw, x + i * ldx, ldx, k, out);
  for (int64_t r = 0; r < kRows; ++r) {
    const float b = bias ? bias[j + r] : 0.0f;
    for (int64_t c = 0; c < kCols; ++c) {
      y[(i + c) * n + j + r] = out[r][c] + b;
    }
  }
}

// The rows of x left after the full kTileCols groups, one tile of exactly that many.
template <int64_t kRows, int64_t kCols = kTileCols - 1>
inline void remainder_to_y(const float* w, int64_t ldw, const float* x, int64_t ldx, const float* bias, float* y,
                           int64_t n, int64_t k, int64_t j, int64_t i, int64_t cols) {
  if constexpr (kCols > 0) {
    if (cols == kCols) {
      tile_to_y<kRows, kCols>(w, ldw, x, ldx, bias, y, n, k, j, i);
    } else {
      remainder_to_y<kRows, kCols - 1>(w, ldw, x, ldx, bias, y, n, k, j, i, cols);
    }
  }
}

// Weight rows [begin, end) against all m rows of x: full tiles, then the edges.
template <int64_t kRows>
void rows_against_x(const float* w, int64_t ldw, const float* x, int64_t ldx, const float* bias, float* y, int64_t n,
                    int64_t m, int64_t k, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; j += kRows) {
    if (j + kRows > end) {
      rows_against_x<1>(w, ldw, x, ldx, bias, y, n, m, k, j, end);
      return;
    }
    int64_t i = 0;
    for (; i + kTileCols <= m; i += kTileCols) {
      tile_to_y<kRows, kTileCols>(w, ldw, x, ldx, bias, y, n, k, j, i);
    }
    remainder_to_y<kRows>(w, ldw, x, ldx, bias, y, n, k, j, i, m - i);
  }
}

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  constexpr const char* kOp = "decode_linear (cpu)";
  TORCH_CHECK(x.dim() == 2 && x.size(0) <= kMaxRows && x.stride(1) == 1, kOp,
              ": x must be (m, k) with m <= ", kMaxRows, " and unit stride along k; got shape ", x.sizes(),
              ", strides ", x.strides());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.stride(1) == 1, kOp,
              ": weight must be (n, k) with k = ", x.size(1), " and unit stride along k; got shape ", weight.sizes(),
              ", strides ", weight.strides());
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, kOp,
              ": x and weight must be float32; got ", x.scalar_type(), " and ", weight.scalar_type());
  const int64_t m = x.size(0), n = weight.size(0), k = x.size(1);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->is_contiguous() && bias->scalar_type() == at::kFloat,
                kOp, ": bias must be a contiguous float32 (n,) with n = ", n, "; got shape ", bias->sizes());
  }
  auto y = at::empty({m, n}, x.options());
  if (y.numel() == 0) {
    return y;
  }
  const float* xp = x.const_data_ptr<float>();
  const int64_t ldx = x.stride(0);
  const float* wp = weight.const_data_ptr<float>();
  const int64_t ldw = weight.stride(0);
  const float* bp = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  // About 64 KB of weight per task: enough to amortise the task, small enough to balance.
  const int64_t grain = std::max<int64_t>(1, (16 * 1024) / std::max<int64_t>(k, 1));
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    rows_against_x<kTileRows>(wp, ldw, xp, ldx, bp, yp, n, m, k, begin, end);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lnlm_ssm, CPU, m) {
  m.impl("decode_linear", &decode_linear);
}

}  // namespace lnlm_ssm
