// y = x @ weight^T (+ bias) for a few rows of x: the projections of a decode step.
//
// With one to sixteen rows the product is bound by reading the weight, yet the
// BLAS behind F.linear reaches only ~10 GB/s for 8 rows here (~24 GB/s for one),
// against ~25 GB/s copy bandwidth. This kernel streams each weight row from
// memory once, in order, and takes all rows of x against it while it sits in L1.
// Work is split over weight rows with at::parallel_for.
//
// Layout: x (m, k) with unit stride along k; weight (n, k) with unit stride
// along k; bias (n) contiguous; y (m, n) contiguous, fp32 throughout.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace lnlm_ssm {
namespace {

constexpr int64_t kMaxRows = 16;

// A tile of kRows weight rows against kCols rows of x: kRows * kCols vector
// accumulators (GCC vector types, so they stay in registers: 16 zmm for 4 x 4 on
// AVX-512, split into narrower registers elsewhere), and each loaded weight
// vector feeds kCols FMAs.
constexpr int64_t kLanes = 16;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef float unaligned_vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(alignof(float))));

inline vec load(const float* p) {
  return *reinterpret_cast<const unaligned_vec*>(p);
}

template <int64_t kRows, int64_t kCols>
inline void tile(const float* __restrict w, int64_t ldw, const float* __restrict x, int64_t ldx, int64_t k,
                 float (&out)[kRows][kCols]) {
  vec acc[kRows][kCols] = {};
  const int64_t k_main = k - k % kLanes;
  for (int64_t k0 = 0; k0 < k_main; k0 += kLanes) {
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
        acc[r][c] += wv * xv[c];
      }
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    for (int64_t c = 0; c < kCols; ++c) {
      float sum = 0.0f;
      for (int64_t l = 0; l < kLanes; ++l) {
        sum += acc[r][c][l];
      }
      for (int64_t i = k_main; i < k; ++i) {
        sum += w[r * ldw + i] * x[c * ldx + i];
      }
      out[r][c] = sum;
    }
  }
}

// Weight rows [begin, end) against all m rows of x: full 4 x 4 tiles, then the edges.
template <int64_t kRows>
void rows_against_x(const float* w, int64_t ldw, const float* x, int64_t ldx, const float* bias, float* y, int64_t n,
                    int64_t m, int64_t k, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; j += kRows) {
    if (j + kRows > end) {
      rows_against_x<1>(w, ldw, x, ldx, bias, y, n, m, k, j, end);
      return;
    }
    int64_t i = 0;
    auto store = [&](auto& out, int64_t cols) {
      for (int64_t r = 0; r < kRows; ++r) {
        const float b = bias ? bias[j + r] : 0.0f;
        for (int64_t c = 0; c < cols; ++c) {
          y[(i + c) * n + j + r] = out[r][c] + b;
        }
      }
    };
    for (; i + 4 <= m; i += 4) {
      float out[kRows][4];
      tile<kRows, 4>(w + j * ldw, ldw, x + i * ldx, ldx, k, out);
      store(out, 4);
    }
    for (; i < m; ++i) {
      float out[kRows][1];
      tile<kRows, 1>(w + j * ldw, ldw, x + i * ldx, ldx, k, out);
      store(out, 1);
    }
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
    rows_against_x<4>(wp, ldw, xp, ldx, bp, yp, n, m, k, begin, end);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(lnlm_ssm, CPU, m) {
  m.impl("decode_linear", &decode_linear);
}

}  // namespace lnlm_ssm
