// The causal depthwise conv1d on the CPU: forward, backward and the decode update.
//
// Math: lnlm_ssm/ops/conv1d/reference.py. Per (batch, dim) row, with c = width - 1
// and the padded row p[j] = history[j] for j < c, x[j - c] after it:
//
//   out[t] = act(bias + sum_k w[k] p[t + k] [s(t + k) == s(t + c)])
//
// s(j) is the packed-sequence id of padded position j (seq_idx, with the row's
// first id for the history); without seq_idx every tap counts. The backward, in
// padded positions, with gz the gradient at the output before the activation:
//
//   gp[j] = sum_k w[k] gz[j - k] [s(j) == s(j - k + c)]   (0 <= j - k < L)
//
// so that dinitial_states = gp[0 .. c) and dx = gp[c .. L + c). (The final
// states, p[L .. L + c), are a slice of the inputs: cpu.py takes them with
// torch, which also carries their gradient.)
//
// Layout, as prepared by lnlm_ssm/ops/conv1d/cpu.py (b batch, d dim, l seqlen):
//
//   x, grad_out           (b, d, l) in the input dtype T, stride 1 along l, any
//                         batch and dim strides
//   out, dx               (b, d, l) contiguous, T
//   weight, dweight       (d, width) contiguous, math dtype
//   bias, dbias           (d,) math dtype
//   initial_states, dinitial_states
//                         (b, d, c) contiguous, math dtype
//   seq_idx               (b, l) contiguous int64
//
// The math dtype is float (double for double inputs). Work is split over
// channels d and each thread walks all batch rows of its channels, so dweight
// and dbias need no reduction across threads and results do not depend on the
// thread count. A row is read in blocks of kBlock steps, each copied with the c
// inputs before it into a math-dtype buffer, so that every tap reads one array
// and the loops over steps vectorise.
//
// seq_idx < 0 marks a padding step: its output is 0, and no other step shares its
// id, so its input reaches no real output; its output gradient is dropped.
//
// The update (decode) keeps the last state_len >= c inputs in conv_state (b, d,
// state_len), any strides, any float dtype, and takes x (b, d, l) or (b, d) (one
// step), any strides, into it in place. Its output is contiguous, shaped like x.
// Without cache_seqlens the state is a shift register, newest last; with it, a
// circular buffer whose row b takes its next input at slot cache_seqlens[b] mod
// state_len. With conv_state_indices, conv_state is a pool and batch row b uses
// its slot conv_state_indices[b]; a negative index is a padding row (output 0, no
// slot touched). Both are (b,) int32 or int64, any stride.

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace lnlm_ssm {
namespace {

// Steps per block: a thread's block buffers (a few times kBlock values) stay in L1.
constexpr int64_t kBlock = 512;
// Below this many elements a parallel task costs more to start than it saves.
constexpr int64_t kMinTaskWork = 1 << 15;
// Rows of a decode update whose outputs are activated together.
constexpr int64_t kUpdateRows = 64;

template <typename T>
using math_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Calls f with a value of the C++ type of `dtype`.
template <typename F>
void dispatch_dtype(at::ScalarType dtype, const char* op, const F& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kDouble:
      return f(double{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kHalf:
      return f(c10::Half{});
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype);
  }
}

// Calls f with std::integral_constant<int, width> for the common widths, so that
// the loops over taps unroll, and with 0 (width read at run time) for the others.
template <typename F>
void dispatch_width(int64_t width, const F& f) {
  switch (width) {
    case 2:
      return f(std::integral_constant<int, 2>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    case 4:
      return f(std::integral_constant<int, 4>{});
    default:
      return f(std::integral_constant<int, 0>{});
  }
}

template <typename acc_t>
const acc_t* optional_data(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<acc_t>() : nullptr;
}

struct Sizes {
  int64_t batch, dim, seqlen, width;

  int64_t carry() const {
    return width - 1;
  }
  // Channels per parallel task: enough work to pay for the task.
  int64_t grain() const {
    return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, batch * seqlen * width));
  }
};

// One row's padded inputs in the math dtype, a block at a time: x[i] holds
// p[t0 + i] for i < c + n while block [t0, t0 + n) is processed, and s[i] its
// sequence id when the row is packed.
template <typename acc_t>
struct PaddedRow {
  int64_t c;
  std::vector<acc_t> x;
  std::vector<int64_t> s;

  PaddedRow(int64_t carry, bool packed)
      : c(carry), x(std::max(kBlock, carry) + carry), s(packed ? std::max(kBlock, carry) + carry : 0) {}

  const int64_t* ids() const {
    return s.empty() ? nullptr : s.data();
  }

  // p[0 .. c): the history (zeros without initial states), in the row's first sequence.
  void start(const acc_t* history, const int64_t* seq_row, int64_t seqlen) {
    if (history) {
      std::copy_n(history, c, x.data());
    } else {
      std::fill_n(x.data(), c, acc_t(0));
    }
    if (!s.empty() && seqlen > 0) {
      std::fill_n(s.data(), c, seq_row[0]);
    }
  }

  // Appends x_row[t0 .. t0 + n) after the c inputs before it.
  template <typename T>
  void load(const T* x_row, const int64_t* seq_row, int64_t t0, int64_t n) {
    const T* __restrict__ src = x_row + t0;
    acc_t* __restrict__ dst = x.data() + c;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      dst[i] = static_cast<acc_t>(src[i]);
    }
    if (!s.empty()) {
      std::copy_n(seq_row + t0, n, s.data() + c);
    }
  }

  // After a block of n steps: its last c inputs are the ones before the next block.
  void advance(int64_t n) {
    std::copy(x.begin() + n, x.begin() + n + c, x.begin());
    if (!s.empty()) {
      std::copy(s.begin() + n, s.begin() + n + c, s.begin());
    }
  }
};

// y[i] = bias + sum_k w[k] p[i + k] for i < n, counting only the taps in step i's
// sequence (id s[i + c]) when s is given, and 0 when step i is padding (s[i + c] < 0).
template <int kW, typename acc_t>
void conv_block(
    const acc_t* __restrict__ p,
    const int64_t* __restrict__ s,
    const acc_t* __restrict__ w,
    int64_t width,
    acc_t bias,
    int64_t n,
    acc_t* __restrict__ y) {
  const int64_t W = kW > 0 ? kW : width, c = W - 1;
  if (s) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      acc_t acc = bias;
      for (int64_t k = 0; k < W; ++k) {
        acc += s[i + k] == s[i + c] ? w[k] * p[i + k] : acc_t(0);
      }
      y[i] = s[i + c] < 0 ? acc_t(0) : acc;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      acc_t acc = bias;
      for (int64_t k = 0; k < W; ++k) {
        acc += w[k] * p[i + k];
      }
      y[i] = acc;
    }
  }
}

// gp[j] = sum_k w[k] gz[j + c - k] for j < n: the gradient at the block's padded
// position j (p[t0 + j]) when gz[i] is the one at output step t0 + i - c. When s
// is given, only the taps whose output step (id s[j + c - k]) is in position j's
// sequence (id s[j]) count.
template <int kW, typename acc_t>
void conv_block_transposed(
    const acc_t* __restrict__ gz,
    const int64_t* __restrict__ s,
    const acc_t* __restrict__ w,
    int64_t width,
    int64_t n,
    acc_t* __restrict__ gp) {
  const int64_t W = kW > 0 ? kW : width, c = W - 1;
  if (s) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      acc_t acc = 0;
      for (int64_t k = 0; k < W; ++k) {
        acc += s[j] == s[j + c - k] ? w[k] * gz[j + c - k] : acc_t(0);
      }
      gp[j] = acc;
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      acc_t acc = 0;
      for (int64_t k = 0; k < W; ++k) {
        acc += w[k] * gz[j + c - k];
      }
      gp[j] = acc;
    }
  }
}

// dw[k] += sum_i gz[i] p[i + k] over the taps that count (as in conv_block).
template <int kW, typename acc_t>
void accumulate_dweight(
    const acc_t* __restrict__ p,
    const int64_t* __restrict__ s,
    const acc_t* __restrict__ gz,
    int64_t width,
    int64_t n,
    acc_t* __restrict__ dw) {
  const int64_t W = kW > 0 ? kW : width, c = W - 1;
  for (int64_t k = 0; k < W; ++k) {
    acc_t acc = 0;
    if (s) {
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < n; ++i) {
        acc += s[i + k] == s[i + c] ? gz[i] * p[i + k] : acc_t(0);
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < n; ++i) {
        acc += gz[i] * p[i + k];
      }
    }
    dw[k] += acc;
  }
}

// Writes the gradients of padded positions j0 .. j0 + n: the first c are the
// initial states', the others x's (shifted by c).
template <typename T, typename acc_t>
void store_padded_grad(const acc_t* __restrict__ gp, int64_t j0, int64_t n, int64_t c, acc_t* dinitial, T* __restrict__ dx) {
  const int64_t split = std::clamp(c - j0, int64_t(0), n);
  for (int64_t j = 0; j < split; ++j) {
    dinitial[j0 + j] = gp[j];
  }
#pragma omp simd
  for (int64_t j = split; j < n; ++j) {
    dx[j0 + j - c] = static_cast<T>(gp[j]);
  }
}

// out[i] = act(y[i]) in the output dtype.
template <typename T, typename acc_t>
void store_activated(const acc_t* __restrict__ y, int64_t n, bool silu, T* __restrict__ out) {
  if (silu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<T>(y[i] * sigmoid_vec(y[i]));
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      out[i] = static_cast<T>(y[i]);
    }
  }
}

template <int kW, typename T, typename acc_t>
void forward_kernel(
    const Sizes& sz,
    const T* x,
    int64_t x_batch_stride,
    int64_t x_dim_stride,
    const acc_t* weight,
    const acc_t* bias,
    const acc_t* initial_states,
    const int64_t* seq_idx,
    bool silu,
    T* out) {
  const int64_t W = kW > 0 ? kW : sz.width, c = W - 1, L = sz.seqlen;
  at::parallel_for(0, sz.dim, sz.grain(), [&](int64_t d_begin, int64_t d_end) {
    PaddedRow<acc_t> row(c, seq_idx != nullptr);
    std::vector<acc_t> y_buf(kBlock);
    acc_t* __restrict__ y = y_buf.data();
    for (int64_t d = d_begin; d < d_end; ++d) {
      const acc_t* w = weight + d * W;
      const acc_t b0 = bias ? bias[d] : acc_t(0);
      for (int64_t b = 0; b < sz.batch; ++b) {
        const int64_t r = b * sz.dim + d;
        const int64_t* seq_row = seq_idx ? seq_idx + b * L : nullptr;
        const T* x_row = x + b * x_batch_stride + d * x_dim_stride;
        T* __restrict__ out_row = out + r * L;
        row.start(initial_states ? initial_states + r * c : nullptr, seq_row, L);
        for (int64_t t0 = 0; t0 < L; t0 += kBlock) {
          const int64_t n = std::min(kBlock, L - t0);
          row.load(x_row, seq_row, t0, n);
          conv_block<kW>(row.x.data(), row.ids(), w, W, b0, n, y);
          store_activated(y, n, silu, out_row + t0);
          row.advance(n);
        }
      }
    }
  });
}

template <int kW, typename T, typename acc_t>
void backward_kernel(
    const Sizes& sz,
    const T* grad_out,
    int64_t g_batch_stride,
    int64_t g_dim_stride,
    const T* x,
    int64_t x_batch_stride,
    int64_t x_dim_stride,
    const acc_t* weight,
    const acc_t* bias,
    const acc_t* initial_states,
    const int64_t* seq_idx,
    bool silu,
    T* dx,
    acc_t* dweight,
    acc_t* dbias,
    acc_t* dinitial_states) {
  const int64_t W = kW > 0 ? kW : sz.width, c = W - 1, L = sz.seqlen;
  const int64_t block = std::max(kBlock, c);
  at::parallel_for(0, sz.dim, sz.grain(), [&](int64_t d_begin, int64_t d_end) {
    PaddedRow<acc_t> row(c, seq_idx != nullptr);
    // gz_buf[i]: the gradient at the output (before the activation) of step
    // t0 - c + i, zero outside [0, L); y: the recomputed output of a block;
    // gp: the gradients of a block's padded positions.
    std::vector<acc_t> gz_buf(block + c), y_buf(block), gp_buf(block), dw(W);
    acc_t* gz = gz_buf.data() + c;
    acc_t* __restrict__ y = y_buf.data();
    acc_t* gp = gp_buf.data();
    for (int64_t d = d_begin; d < d_end; ++d) {
      const acc_t* w = weight + d * W;
      const acc_t b0 = bias ? bias[d] : acc_t(0);
      std::fill(dw.begin(), dw.end(), acc_t(0));
      acc_t dbias_sum = 0;
      for (int64_t b = 0; b < sz.batch; ++b) {
        const int64_t r = b * sz.dim + d;
        const int64_t* seq_row = seq_idx ? seq_idx + b * L : nullptr;
        const T* x_row = x + b * x_batch_stride + d * x_dim_stride;
        const T* g_row = grad_out + b * g_batch_stride + d * g_dim_stride;
        acc_t* dinit_row = dinitial_states + r * c;
        T* dx_row = dx + r * L;
        row.start(initial_states ? initial_states + r * c : nullptr, seq_row, L);
        std::fill_n(gz_buf.data(), c, acc_t(0));
        for (int64_t t0 = 0; t0 < L; t0 += kBlock) {
          const int64_t n = std::min(kBlock, L - t0);
          row.load(x_row, seq_row, t0, n);
          const T* __restrict__ g = g_row + t0;
          if (silu) {
            conv_block<kW>(row.x.data(), row.ids(), w, W, b0, n, y);
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) {
              // d/dy (y sigmoid(y)) = sigmoid(y) (1 + y (1 - sigmoid(y)))
              const acc_t sg = sigmoid_vec(y[i]);
              gz[i] = static_cast<acc_t>(g[i]) * sg * (acc_t(1) + y[i] * (acc_t(1) - sg));
            }
          } else {
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) {
              gz[i] = static_cast<acc_t>(g[i]);
            }
          }
          if (const int64_t* ids = row.ids()) {
#pragma omp simd
            for (int64_t i = 0; i < n; ++i) {
              gz[i] = ids[c + i] < 0 ? acc_t(0) : gz[i];
            }
          }
          acc_t block_sum = 0;
#pragma omp simd reduction(+ : block_sum)
          for (int64_t i = 0; i < n; ++i) {
            block_sum += gz[i];
          }
          dbias_sum += block_sum;
          accumulate_dweight<kW>(row.x.data(), row.ids(), gz, W, n, dw.data());
          conv_block_transposed<kW>(gz_buf.data(), row.ids(), w, W, n, gp);
          store_padded_grad(gp, t0, n, c, dinit_row, dx_row);
          row.advance(n);
          std::copy(gz_buf.begin() + n, gz_buf.begin() + n + c, gz_buf.begin());
        }
        // Padded positions L .. L + c, which only the last c outputs reach.
        std::fill_n(gz, c, acc_t(0));
        conv_block_transposed<kW>(gz_buf.data(), row.ids(), w, W, c, gp);
        store_padded_grad(gp, L, c, c, dinit_row, dx_row);
      }
      std::copy(dw.begin(), dw.end(), dweight + d * W);
      if (dbias) {
        dbias[d] = dbias_sum;
      }
    }
  });
}

// Decode: per row, out[t] = act(bias + sum_k w[k] p[t + k]) with p the latest c
// inputs of the state followed by x, then x is taken into the state. Rows are
// taken in groups of up to kUpdateRows channels of one batch entry, staged
// position-major (p[j][row]) so that the taps and the activation vectorise over
// the group's rows. heads[b] is batch entry b's circular-buffer write slot (null
// for a shift register), slots[b] its state's index in the pool (null: b itself).
template <int kW, typename T, typename S, typename acc_t>
void update_kernel(
    const Sizes& sz,
    int64_t state_len,
    const T* x,
    at::IntArrayRef x_strides,
    S* state,
    at::IntArrayRef state_strides,
    const acc_t* weight,
    const acc_t* bias,
    bool silu,
    const int64_t* heads,
    const int64_t* slots,
    T* out) {
  const int64_t W = kW > 0 ? kW : sz.width, c = W - 1, L = sz.seqlen, dim = sz.dim;
  const int64_t xs_b = x_strides[0], xs_d = x_strides[1], xs_l = x_strides[2];
  const int64_t ss_b = state_strides[0], ss_d = state_strides[1], ss_l = state_strides[2];
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / (W * L + state_len));
  at::parallel_for(0, sz.batch * dim, grain, [&](int64_t r_begin, int64_t r_end) {
    // p[j * kUpdateRows + i]: padded position j of the group's row i; y[i * L + t]: its outputs.
    std::vector<acc_t> p_buf((c + L) * kUpdateRows), y_buf(kUpdateRows * L);
    acc_t* __restrict__ p = p_buf.data();
    acc_t* __restrict__ y = y_buf.data();
    for (int64_t r0 = r_begin; r0 < r_end;) {
      const int64_t b = r0 / dim, d0 = r0 % dim;
      const int64_t rows = std::min({kUpdateRows, r_end - r0, dim - d0});
      const int64_t slot = slots ? slots[b] : b;
      if (slot < 0) {
        std::fill_n(out + r0 * L, rows * L, T(0));
        r0 += rows;
        continue;
      }
      const T* x_group = x + b * xs_b + d0 * xs_d;
      S* st = state + slot * ss_b + d0 * ss_d;
      // The slot of the state's j-th oldest input (j < state_len).
      const int64_t head = heads ? heads[b] : 0;
      const auto slot_of = [&](int64_t j) { return head + j < state_len ? head + j : head + j - state_len; };
      for (int64_t j = 0; j < c; ++j) {
        const S* src = st + slot_of(state_len - c + j) * ss_l;
        for (int64_t i = 0; i < rows; ++i) {
          p[j * kUpdateRows + i] = static_cast<acc_t>(src[i * ss_d]);
        }
      }
      for (int64_t t = 0; t < L; ++t) {
        const T* src = x_group + t * xs_l;
        for (int64_t i = 0; i < rows; ++i) {
          p[(c + t) * kUpdateRows + i] = static_cast<acc_t>(src[i * xs_d]);
        }
      }
      const acc_t* w = weight + d0 * W;
      for (int64_t t = 0; t < L; ++t) {
#pragma omp simd
        for (int64_t i = 0; i < rows; ++i) {
          acc_t acc = bias ? bias[d0 + i] : acc_t(0);
          for (int64_t k = 0; k < W; ++k) {
            acc += w[i * W + k] * p[(t + k) * kUpdateRows + i];
          }
          y[i * L + t] = acc;
        }
      }
      store_activated(y, rows * L, silu, out + r0 * L);
      if (heads) {
        // x goes to the slots from the head on; of more than state_len inputs only the last state_len stay.
        for (int64_t t = std::max<int64_t>(0, L - state_len); t < L; ++t) {
          S* dst = st + slot_of(t % state_len) * ss_l;
          const acc_t* src = p + (c + t) * kUpdateRows;
          for (int64_t i = 0; i < rows; ++i) {
            dst[i * ss_d] = static_cast<S>(src[i]);
          }
        }
        r0 += rows;
        continue;
      }
      // Ascending j reads each older entry before it is overwritten.
      for (int64_t j = 0; j < state_len; ++j) {
        S* dst = st + j * ss_l;
        if (j + L < state_len) {
          const S* src = st + (j + L) * ss_l;
          for (int64_t i = 0; i < rows; ++i) {
            dst[i * ss_d] = src[i * ss_d];
          }
        } else {
          const acc_t* src = p + (c + j + L - state_len) * kUpdateRows;
          for (int64_t i = 0; i < rows; ++i) {
            dst[i * ss_d] = static_cast<S>(src[i]);
          }
        }
      }
      r0 += rows;
    }
  });
}

void check_math_tensor(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef sizes, at::ScalarType math) {
  TORCH_CHECK(
      t.sizes() == sizes && t.is_contiguous() && t.scalar_type() == math, op, ": ", name, " must be contiguous with shape ",
      sizes, " and dtype ", math, " (the math dtype); got shape ", t.sizes(), ", dtype ", t.scalar_type(),
      t.is_contiguous() ? "" : ", non-contiguous");
}

void check_time_rows(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be (batch, dim, seqlen); got shape ", t.sizes());
  TORCH_CHECK(
      t.size(2) <= 1 || t.stride(2) == 1, op, ": ", name, " must have stride 1 along seqlen; got strides ", t.strides());
}

// Checks the arguments shared by the forward and the backward; returns the sizes.
Sizes check_conv_inputs(
    const char* op,
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_states,
    const std::optional<at::Tensor>& seq_idx) {
  check_time_rows(op, "x", x);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(1) && weight.size(1) >= 1, op,
              ": weight must be (dim, width) with dim = ", x.size(1), " and width >= 1; got shape ", weight.sizes());
  const Sizes sz{x.size(0), x.size(1), x.size(2), weight.size(1)};
  const at::ScalarType math = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_math_tensor(op, "weight", weight, weight.sizes(), math);
  if (bias.has_value()) {
    check_math_tensor(op, "bias", *bias, {sz.dim}, math);
  }
  if (initial_states.has_value()) {
    check_math_tensor(op, "initial_states", *initial_states, {sz.batch, sz.dim, sz.carry()}, math);
  }
  if (seq_idx.has_value()) {
    TORCH_CHECK(seq_idx->scalar_type() == at::kLong && seq_idx->is_contiguous() &&
                    seq_idx->sizes() == at::IntArrayRef({sz.batch, sz.seqlen}),
                op, ": seq_idx must be contiguous int64 (batch, seqlen) = (", sz.batch, ", ", sz.seqlen, "); got shape ",
                seq_idx->sizes(), ", dtype ", seq_idx->scalar_type());
  }
  return sz;
}

at::Tensor causal_conv1d_fwd(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_states,
    const std::optional<at::Tensor>& seq_idx,
    bool silu) {
  constexpr const char* kOp = "causal_conv1d_fwd (cpu)";
  const Sizes sz = check_conv_inputs(kOp, x, weight, bias, initial_states, seq_idx);
  auto out = at::empty({sz.batch, sz.dim, sz.seqlen}, x.options());
  dispatch_dtype(x.scalar_type(), kOp, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = math_t<T>;
    dispatch_width(sz.width, [&](auto width_tag) {
      forward_kernel<decltype(width_tag)::value, T, acc_t>(
          sz, x.const_data_ptr<T>(), x.stride(0), x.stride(1), weight.const_data_ptr<acc_t>(), optional_data<acc_t>(bias),
          optional_data<acc_t>(initial_states), optional_data<int64_t>(seq_idx), silu, out.mutable_data_ptr<T>());
    });
  });
  return out;
}

// dbias is empty when bias is absent.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_conv1d_bwd(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& initial_states,
    const std::optional<at::Tensor>& seq_idx,
    bool silu) {
  constexpr const char* kOp = "causal_conv1d_bwd (cpu)";
  const Sizes sz = check_conv_inputs(kOp, x, weight, bias, initial_states, seq_idx);
  check_time_rows(kOp, "grad_out", grad_out);
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(), kOp,
              ": grad_out must be shaped and typed like x ", x.sizes(), " ", x.scalar_type(), "; got ", grad_out.sizes(),
              " ", grad_out.scalar_type());
  auto dx = at::empty({sz.batch, sz.dim, sz.seqlen}, x.options());
  auto dweight = at::empty_like(weight);
  auto dbias = at::empty({bias.has_value() ? sz.dim : 0}, weight.options());
  auto dinitial_states = at::empty({sz.batch, sz.dim, sz.carry()}, weight.options());
  dispatch_dtype(x.scalar_type(), kOp, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = math_t<T>;
    dispatch_width(sz.width, [&](auto width_tag) {
      backward_kernel<decltype(width_tag)::value, T, acc_t>(
          sz, grad_out.const_data_ptr<T>(), grad_out.stride(0), grad_out.stride(1), x.const_data_ptr<T>(), x.stride(0), x.stride(1),
          weight.const_data_ptr<acc_t>(), optional_data<acc_t>(bias), optional_data<acc_t>(initial_states),
          optional_data<int64_t>(seq_idx), silu, dx.mutable_data_ptr<T>(), dweight.mutable_data_ptr<acc_t>(),
          bias.has_value() ? dbias.mutable_data_ptr<acc_t>() : nullptr, dinitial_states.mutable_data_ptr<acc_t>());
    });
  });
  return {dx, dweight, dbias, dinitial_states};
}

// The (b,) int32/int64 values of an index argument, each checked by ok(value); empty when absent.
template <typename Ok>
std::vector<int64_t> read_indices(
    const char* op, const char* name, const std::optional<at::Tensor>& t, int64_t batch, const char* rule, const Ok& ok) {
  std::vector<int64_t> values;
  if (!t.has_value()) {
    return values;
  }
  TORCH_CHECK(t->dim() == 1 && t->size(0) == batch && (t->scalar_type() == at::kInt || t->scalar_type() == at::kLong),
              op, ": ", name, " must be int32 or int64 of shape (", batch, "); got shape ", t->sizes(), ", dtype ",
              t->scalar_type());
  values.resize(batch);
  for (int64_t b = 0; b < batch; ++b) {
    values[b] = t->scalar_type() == at::kInt ? int64_t(t->const_data_ptr<int32_t>()[b * t->stride(0)])
                                             : t->const_data_ptr<int64_t>()[b * t->stride(0)];
    TORCH_CHECK(ok(values[b]), op, ": ", name, " must be ", rule, "; got ", values[b], " at index ", b);
  }
  return values;
}

at::Tensor causal_conv1d_update(
    const at::Tensor& x,
    at::Tensor& conv_state,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    bool silu,
    const std::optional<at::Tensor>& cache_seqlens,
    const std::optional<at::Tensor>& conv_state_indices) {
  constexpr const char* kOp = "causal_conv1d_update (cpu)";
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, kOp, ": x must be (batch, dim) or (batch, dim, seqlen); got shape ",
              x.sizes());
  // A single step (batch, dim) is a sequence of length 1.
  const bool single = x.dim() == 2;
  const std::array<int64_t, 3> x_strides{x.stride(0), x.stride(1), single ? 0 : x.stride(2)};
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(1) && weight.size(1) >= 1, kOp,
              ": weight must be (dim, width) with dim = ", x.size(1), " and width >= 1; got shape ", weight.sizes());
  const Sizes sz{x.size(0), x.size(1), single ? 1 : x.size(2), weight.size(1)};
  const at::ScalarType math = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_math_tensor(kOp, "weight", weight, weight.sizes(), math);
  if (bias.has_value()) {
    check_math_tensor(kOp, "bias", *bias, {sz.dim}, math);
  }
  const bool pooled = conv_state_indices.has_value();
  const std::string rows = pooled ? "pool" : "batch = " + std::to_string(sz.batch);
  TORCH_CHECK(conv_state.dim() == 3 && (pooled || conv_state.size(0) == sz.batch) && conv_state.size(1) == sz.dim &&
                  conv_state.size(2) >= sz.carry(),
              kOp, ": conv_state must be (", rows, ", dim = ", sz.dim, ", state_len >= ", sz.carry(), "); got shape ",
              conv_state.sizes());
  const int64_t state_len = conv_state.size(2), pool = conv_state.size(0);
  std::vector<int64_t> heads = read_indices(kOp, "cache_seqlens", cache_seqlens, sz.batch, ">= 0",
                                            [](int64_t v) { return v >= 0; });
  for (int64_t& head : heads) {
    head = state_len > 0 ? head % state_len : 0;
  }
  const std::vector<int64_t> slots = read_indices(kOp, "conv_state_indices", conv_state_indices, sz.batch,
                                                  "< the pool size conv_state.size(0) (negative: padding)",
                                                  [pool](int64_t v) { return v < pool; });
  TORCH_CHECK(at::has_internal_overlap(conv_state) != at::MemOverlap::Yes, kOp,
              ": conv_state is updated in place, so it must not be a view whose elements overlap (such as an expanded "
              "tensor); got strides ", conv_state.strides());
  auto out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) {
    return out;
  }
  dispatch_dtype(x.scalar_type(), kOp, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = math_t<T>;
    dispatch_dtype(conv_state.scalar_type(), kOp, [&](auto state_tag) {
      using S = decltype(state_tag);
      dispatch_width(sz.width, [&](auto width_tag) {
        update_kernel<decltype(width_tag)::value, T, S, acc_t>(
            sz, conv_state.size(2), x.const_data_ptr<T>(), x_strides, conv_state.mutable_data_ptr<S>(),
            conv_state.strides(), weight.const_data_ptr<acc_t>(), optional_data<acc_t>(bias), silu,
            heads.empty() ? nullptr : heads.data(), slots.empty() ? nullptr : slots.data(), out.mutable_data_ptr<T>());
      });
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lnlm_ssm, CPU, m) {
  m.impl("causal_conv1d_fwd", &causal_conv1d_fwd);
  m.impl("causal_conv1d_bwd", &causal_conv1d_bwd);
  m.impl("causal_conv1d_update", &causal_conv1d_update);
}

}  // namespace lnlm_ssm
