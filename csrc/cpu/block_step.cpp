// One decode step of a whole block in one call: the block's norm (with the
// residual add), then its mixer or MLP, projections included.
//
// A decode step is ~20 small ops per block. Called one by one from Python, each
// costs its interpreter, argument-checking and dispatch time on top of its work,
// which for a 130M model on two cores added up to a third of a token's time.
// Here the step is one call per block. Its projections are decode_linear's kernel
// (the BLAS where decode_linear would take it), reached through the dispatcher (no
// autograd, no Python); Mamba-2's conv and state updates are the ops' kernels too.
// Mamba-1's conv update, dt_proj and state update are done here, in two passes
// over the channels (before and after x_proj): as separate kernels they took four
// times their share of the bytes (~100 us a layer against ~25 us of reads on two
// EPYC cores), each a short latency-bound walk over small arrays (dt_proj's
// weight, A, the states) with its own launch; here each channel's rows are read
// once, in order, in one parallel pass. Plus a little glue: the residual add and
// norm, the MLP's gate, Mamba-2's dt limit and gated norm.
//
// Layouts (b = batch rows; everything float32, CPU):
//   hidden_states, residual (b, d_model): residual is the block's input stream (None for
//     the first block); the step returns (out, new_residual) with new_residual =
//     hidden_states + residual and out the mixer's (or MLP's) output, as Block.forward does.
//   the norm: weight (d_model,), bias (d_model,) for a LayerNorm; rms_norm chooses RMSNorm.
//   projections: weight (out, in) with unit stride along in, bias (out,) or None.
//   conv_weight (channels, width), conv_bias (channels,), conv_state (b, channels, width):
//     causal_conv1d_update's layout, updated in place.
//   Mamba-1: A (d_inner, d_state) = -exp(A_log), D and dt_proj_bias (d_inner,),
//     ssm_state (b, d_inner, d_state) updated in place; conv_state, ssm_state and the
//     conv, x_proj, dt_proj and A tensors contiguous.
//   Mamba-2: A (nheads,) = -exp(A_log), dt_bias (nheads,), D (nheads,) or (d_inner,),
//     ssm_state (b, nheads, headdim, d_state) updated in place.
//
// The projections all go through project(), which also takes weight-only quantised
// weights (lnlm_ssm.quantize_: int8 with a per-row scale, or bf16) to
// weight_only_linear's kernel. Every block and the DecodeStep's embedding take them
// (the scales of int8 weights are each op's last arguments); Mamba-1's dt_proj, done
// in the state pass, is the exception: a quantised one is a separate product (see
// mamba_block_step).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <torch/custom_class.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "vec_math.h"

namespace lnlm_ssm {
namespace {

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Step = std::tuple<Tensor, Tensor>;

// ---------------------------------------------------------------- the kernels a step is made of

// The ops are called at their CPU kernels: the step runs without autograd (its
// inputs are inference tensors of a decode loop), so the autograd and
// inplace-or-view layers would only cost time.
const c10::DispatchKeySet kCPUKernel(c10::DispatchKey::CPU);

Tensor decode_linear(const Tensor& x, const Tensor& weight, const OptTensor& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lnlm_ssm::decode_linear", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const OptTensor&)>();
  return op.redispatch(kCPUKernel, x, weight, bias);
}

Tensor conv_update(const Tensor& x, Tensor& conv_state, const Tensor& weight, const OptTensor& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("lnlm_ssm::causal_conv1d_update", "")
          .typed<Tensor(const Tensor&, Tensor&, const Tensor&, const OptTensor&, bool, const OptTensor&,
                        const OptTensor&)>();
  return op.redispatch(kCPUKernel, x, conv_state, weight, bias, /*silu=*/true, std::nullopt, std::nullopt);
}

// The canonical layout of ops/state_update/shapes.py: state (b,h,p,n), x, dt, z (b,h,p),
// A (h,p,n), B, C (b,g,n), D, dt_bias (h,p).
Tensor state_update(const Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B,
                    const Tensor& C, const OptTensor& D, const OptTensor& z, const OptTensor& dt_bias,
                    bool dt_softplus) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lnlm_ssm::selective_state_update", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                           const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool,
                                           const OptTensor&)>();
  return op.redispatch(kCPUKernel, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, std::nullopt);
}

// decode_linear's choice (lnlm_ssm/ops/linear/interface.py, MAX_ROWS and MIN_INNER):
// its kernel for 1 to 16 rows of inner size >= 256, where it beats the BLAS; the
// BLAS (at::linear, what F.linear calls) otherwise.
constexpr int64_t kKernelMaxRows = 16;
constexpr int64_t kKernelMinInner = 256;

Tensor weight_only_linear(const Tensor& x, const Tensor& weight, const OptTensor& scale, const OptTensor& bias) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("lnlm_ssm::weight_only_linear", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&)>();
  return op.redispatch(kCPUKernel, x, weight, scale, bias);
}

// x @ weight^T (+ bias). weight fp32, or weight-only quantised (lnlm_ssm.quantize_): int8 with
// its per-row scale, or bf16 without; those go to weight_only_linear's kernel (1 to 16 rows, any
// inner size) and, from 17 rows, to the BLAS on the fp32 matrix they stand for, as the
// unfused forward does.
Tensor project(const Tensor& x, const Tensor& weight, const OptTensor& scale, const OptTensor& bias) {
  if (weight.scalar_type() != at::kFloat) {
    if (x.size(0) <= kKernelMaxRows) {
      return weight_only_linear(x.stride(1) == 1 ? x : x.contiguous(), weight, scale, bias);
    }
    const Tensor dense = scale.has_value() ? weight.to(at::kFloat).mul(scale->unsqueeze(1)) : weight.to(at::kFloat);
    return at::linear(x, dense, bias);
  }
  if (x.size(0) <= kKernelMaxRows && x.size(1) >= kKernelMinInner) {
    return decode_linear(x, weight, bias);
  }
  return at::linear(x, weight, bias);
}

Tensor project(const Tensor& x, const Tensor& weight, const OptTensor& bias) {
  return project(x, weight, std::nullopt, bias);
}

// ---------------------------------------------------------------- checks

void check_tensor(const char* op, const char* name, const Tensor& t, c10::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 CPU tensor; got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.sizes().equals(shape), op, ": ", name, " must have shape ", shape, "; got ", t.sizes());
}

void check_optional(const char* op, const char* name, const OptTensor& t, c10::IntArrayRef shape) {
  if (t.has_value()) {
    check_tensor(op, name, *t, shape);
  }
}

// A projection (out, in) reading rows of size `in`: its output size. Its weight is float32, or
// weight-only quantised: int8 with scale (out,) float32, or bf16 without a scale.
int64_t check_projection(const char* op, const char* name, const Tensor& weight, const OptTensor& bias, int64_t in,
                         const OptTensor& scale = std::nullopt) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == in && weight.stride(1) == 1, op, ": ", name,
              ".weight must be (out, in = ", in, ") with unit stride along in; got shape ", weight.sizes(),
              ", strides ", weight.strides());
  const bool int8 = weight.scalar_type() == at::kChar;
  if (int8 || weight.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(weight.device().is_cpu(), op, ": ", name, ".weight must be on the CPU; got ", weight.device());
    TORCH_CHECK(int8 == scale.has_value(), op, ": ", name, ": an int8 weight needs a scale and a bfloat16 one takes ",
                "none; got a ", weight.scalar_type(), " weight ", scale.has_value() ? "with" : "without", " a scale");
  } else {
    check_tensor(op, name, weight, weight.sizes());
    TORCH_CHECK(!scale.has_value(), op, ": ", name, ": a float32 weight takes no scale (int8 weights have one)");
  }
  if (scale.has_value()) {
    check_tensor(op, name, *scale, {weight.size(0)});
    TORCH_CHECK(scale->is_contiguous(), op, ": ", name, ".scale must be contiguous");
  }
  if (bias.has_value()) {
    check_tensor(op, name, *bias, {weight.size(0)});
  }
  return weight.size(0);
}

// ---------------------------------------------------------------- the norm and the glue

// new_residual = x + residual (x alone without one); y = norm(new_residual) * weight (+ bias),
// over each row; returns (y, new_residual), both (b, d) contiguous. Sums in double: a
// d_model-long row is short, and the result then does not depend on how a loop is split.
std::tuple<Tensor, Tensor> add_norm(const char* op, const Tensor& x, const OptTensor& residual, const Tensor& weight,
                                    const OptTensor& bias, double eps, bool rms_norm) {
  TORCH_CHECK(x.dim() == 2, op, ": hidden_states must be (batch, d_model); got shape ", x.sizes());
  const int64_t rows = x.size(0), d = x.size(1);
  check_tensor(op, "hidden_states", x, {rows, d});
  check_optional(op, "residual", residual, {rows, d});
  check_tensor(op, "norm_weight", weight, {d});
  check_optional(op, "norm_bias", bias, {d});
  TORCH_CHECK(eps > 0, op, ": norm_eps must be > 0; got ", eps);
  Tensor h = at::empty({rows, d}, x.options());
  Tensor y = at::empty({rows, d}, x.options());
  const float* w = weight.const_data_ptr<float>();
  const float* b = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x.const_data_ptr<float>() + r * x.stride(0);
    float* hr = h.mutable_data_ptr<float>() + r * d;
    float* yr = y.mutable_data_ptr<float>() + r * d;
    const int64_t xs = x.stride(1);
    if (residual.has_value()) {
      const float* rr = residual->const_data_ptr<float>() + r * residual->stride(0);
      const int64_t rs = residual->stride(1);
      for (int64_t i = 0; i < d; ++i) {
        hr[i] = xr[i * xs] + rr[i * rs];
      }
    } else {
      for (int64_t i = 0; i < d; ++i) {
        hr[i] = xr[i * xs];
      }
    }
    double mean = 0.0;
    if (!rms_norm) {
      for (int64_t i = 0; i < d; ++i) {
        mean += hr[i];
      }
      mean /= static_cast<double>(d);
    }
    double square = 0.0;
    for (int64_t i = 0; i < d; ++i) {
      const double c = hr[i] - mean;
      square += c * c;
    }
    const float inv = static_cast<float>(1.0 / std::sqrt(square / static_cast<double>(d) + eps));
    const float m = static_cast<float>(mean);
    for (int64_t i = 0; i < d; ++i) {
      yr[i] = (hr[i] - m) * inv * w[i] + (b ? b[i] : 0.0f);
    }
  }
  return {y, h};
}

// RMSNorm of y * silu(z) (or of y, then gated, with norm_before_gate) per group of
// group_size channels, times weight: mamba_ssm's RMSNormGated on rows (b, d).
Tensor gated_rms_norm(const Tensor& y, const Tensor& z, const Tensor& weight, double eps, int64_t group_size,
                      bool norm_before_gate) {
  const int64_t rows = y.size(0), d = y.size(1);
  Tensor out = at::empty({rows, d}, y.options());
  const float* w = weight.const_data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* yr = y.const_data_ptr<float>() + r * y.stride(0);
    const float* zr = z.const_data_ptr<float>() + r * z.stride(0);
    float* o = out.mutable_data_ptr<float>() + r * d;
    for (int64_t i = 0; i < d; ++i) {
      o[i] = norm_before_gate ? yr[i] : yr[i] * zr[i] * sigmoid_vec(zr[i]);
    }
    for (int64_t g0 = 0; g0 < d; g0 += group_size) {
      double square = 0.0;
      for (int64_t i = g0; i < g0 + group_size; ++i) {
        square += static_cast<double>(o[i]) * o[i];
      }
      const float inv = static_cast<float>(1.0 / std::sqrt(square / static_cast<double>(group_size) + eps));
      for (int64_t i = g0; i < g0 + group_size; ++i) {
        o[i] = o[i] * inv * w[i];
        if (norm_before_gate) {
          o[i] *= zr[i] * sigmoid_vec(zr[i]);
        }
      }
    }
  }
  return out;
}

// Mamba-1's passes over the channels: (rows * d_inner) channels, a few hundred per task.
constexpr int64_t kChannelGrain = 256;

// out = silu(causal conv of the channel's history and x), and x joins the history:
// causal_conv1d_update with silu, on a contiguous fp32 conv_state (b, d, state_len)
// whose newest input is last. x (b, d) with row stride x_row; out (b, d) contiguous.
void mamba_conv_step(const float* x, int64_t x_row, float* conv_state, int64_t state_len, const float* weight,
                     int64_t width, const float* bias, int64_t rows, int64_t d, float* out) {
  at::parallel_for(0, rows * d, kChannelGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / d, c = i % d;
      float* s = conv_state + i * state_len;
      const float* w = weight + c * width;
      const float xi = x[r * x_row + c];
      // The newest width - 1 inputs of the history, then x.
      float acc = bias ? bias[c] : 0.0f;
      for (int64_t k = 0; k < width - 1; ++k) {
        acc += w[k] * s[state_len - width + 1 + k];
      }
      acc += w[width - 1] * xi;
      for (int64_t k = 0; k + 1 < state_len; ++k) {
        s[k] = s[k + 1];
      }
      s[state_len - 1] = xi;
      out[i] = acc;
    }
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      out[i] *= sigmoid_vec(out[i]);
    }
  });
}

// For each channel: dt = softplus(dt_proj row . delta + dt_bias), then
// selective_state_update's steps (reference.py of ops/state_update) with one channel
// per head: state = exp(dt A) state + dt x B; y = (state . C + D x) silu(z).
// x_dbl (b, dt_rank + 2 N) holds [delta | B | C]; z (b, d) with row stride z_row; y (b, d).
// dt_weight (d, dt_rank) fp32; or, with dt_weight null, dt_proj's products given in dt (b, d).
void mamba_state_step(const float* x, const float* x_dbl, int64_t dt_rank, const float* z, int64_t z_row,
                      const float* dt_weight, const float* dt_given, const float* dt_bias, const float* A,
                      const float* D, float* state, int64_t rows, int64_t d, int64_t N, float* y) {
  const int64_t x_dbl_row = dt_rank + 2 * N;
  at::parallel_for(0, rows * d, kChannelGrain, [&](int64_t begin, int64_t end) {
    // In runs of kRun channels of one row, a pass at a time: the scalar chains of a channel
    // (softplus, the gate's sigmoid) then vectorise across the run's channels, where one
    // channel at a time left them as long latency chains, half the step's time at batch 8.
    constexpr int64_t kRun = 64;
    float dt[kRun], sum[kRun];
    for (int64_t run = begin; run < end;) {
      const int64_t r = run / d, c0 = run % d;
      const int64_t n_run = std::min({kRun, end - run, d - c0});
      const float* delta = x_dbl + r * x_dbl_row;
      const float* B = delta + dt_rank;
      const float* C = B + N;
      for (int64_t j = 0; j < n_run; ++j) {
        if (dt_weight == nullptr) {
          dt[j] = dt_given[run + j];
          continue;
        }
        const float* w = dt_weight + (c0 + j) * dt_rank;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t k = 0; k < dt_rank; ++k) {
          dot += w[k] * delta[k];
        }
        dt[j] = dot;
      }
#pragma omp simd
      for (int64_t j = 0; j < n_run; ++j) {
        dt[j] = softplus_vec(dt[j] + dt_bias[c0 + j]);
      }
      for (int64_t j = 0; j < n_run; ++j) {
        const float dtj = dt[j], dtx = dtj * x[run + j];
        const float* a = A + (c0 + j) * N;
        float* st = state + (run + j) * N;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t n = 0; n < N; ++n) {
          const float next = exp_vec(dtj * a[n]) * st[n] + dtx * B[n];
          st[n] = next;
          total += next * C[n];
        }
        sum[j] = total;
      }
      const float* g = z + r * z_row + c0;
#pragma omp simd
      for (int64_t j = 0; j < n_run; ++j) {
        y[run + j] = (sum[j] + D[c0 + j] * x[run + j]) * (g[j] * sigmoid_vec(g[j]));
      }
      run += n_run;
    }
  });
}

// ---------------------------------------------------------------- the blocks

// norm -> in_proj -> conv update -> x_proj -> dt_proj -> state update (with D and the
// silu(z) gate) -> out_proj: Mamba.forward's decode step (layers/mamba.py). The four
// projections' weights may be weight-only quantised, each scale given with an int8 weight.
Step mamba_block_step(const Tensor& hidden_states, const OptTensor& residual, const Tensor& norm_weight,
                      const OptTensor& norm_bias, double norm_eps, bool rms_norm, const Tensor& in_proj_weight,
                      const OptTensor& in_proj_bias, const Tensor& conv_weight, const OptTensor& conv_bias,
                      Tensor& conv_state, const Tensor& x_proj_weight, const Tensor& dt_proj_weight,
                      const Tensor& dt_proj_bias, const Tensor& A, const Tensor& D, Tensor& ssm_state,
                      const Tensor& out_proj_weight, const OptTensor& out_proj_bias, const OptTensor& in_proj_scale,
                      const OptTensor& x_proj_scale, const OptTensor& dt_proj_scale, const OptTensor& out_proj_scale) {
  constexpr const char* kOp = "mamba_block_step (cpu)";
  auto [normed, new_residual] = add_norm(kOp, hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm);
  const int64_t rows = normed.size(0), d_model = normed.size(1);
  TORCH_CHECK(ssm_state.dim() == 3, kOp, ": ssm_state must be (batch, d_inner, d_state); got shape ",
              ssm_state.sizes());
  const int64_t d_inner = ssm_state.size(1), d_state = ssm_state.size(2), dt_rank = dt_proj_weight.size(-1);
  check_tensor(kOp, "ssm_state", ssm_state, {rows, d_inner, d_state});
  TORCH_CHECK(check_projection(kOp, "in_proj", in_proj_weight, in_proj_bias, d_model, in_proj_scale) == 2 * d_inner, kOp,
              ": in_proj must have 2 * d_inner = ", 2 * d_inner, " outputs; got ", in_proj_weight.size(0));
  TORCH_CHECK(check_projection(kOp, "x_proj", x_proj_weight, std::nullopt, d_inner, x_proj_scale) ==
                  dt_rank + 2 * d_state, kOp,
              ": x_proj must have dt_rank + 2 * d_state = ", dt_rank + 2 * d_state, " outputs; got ",
              x_proj_weight.size(0));
  TORCH_CHECK(check_projection(kOp, "dt_proj", dt_proj_weight, dt_proj_bias, dt_rank, dt_proj_scale) == d_inner, kOp,
              ": dt_proj must have d_inner = ", d_inner, " outputs; got ", dt_proj_weight.size(0));
  check_tensor(kOp, "dt_proj_bias", dt_proj_bias, {d_inner});
  TORCH_CHECK(check_projection(kOp, "out_proj", out_proj_weight, out_proj_bias, d_inner, out_proj_scale) == d_model,
              kOp, ": out_proj must have d_model = ", d_model, " outputs; got ", out_proj_weight.size(0));
  check_tensor(kOp, "A", A, {d_inner, d_state});
  check_tensor(kOp, "D", D, {d_inner});
  TORCH_CHECK(conv_weight.dim() == 2 && conv_weight.size(0) == d_inner, kOp,
              ": conv_weight must be (d_inner = ", d_inner, ", width); got shape ", conv_weight.sizes());
  const int64_t width = conv_weight.size(1);
  check_tensor(kOp, "conv_weight", conv_weight, {d_inner, width});
  check_optional(kOp, "conv_bias", conv_bias, {d_inner});
  TORCH_CHECK(conv_state.dim() == 3 && conv_state.size(2) >= width - 1, kOp, ": conv_state must be (batch, d_inner, ",
              "state_len >= width - 1 = ", width - 1, "); got shape ", conv_state.sizes());
  check_tensor(kOp, "conv_state", conv_state, {rows, d_inner, conv_state.size(2)});
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"conv_state", &conv_state}, {"ssm_state", &ssm_state},
                                {"conv_weight", &conv_weight}, {"x_proj_weight", &x_proj_weight},
                                {"dt_proj_weight", &dt_proj_weight}, {"A", &A}, {"D", &D}, {"dt_proj_bias", &dt_proj_bias}}) {
    TORCH_CHECK(t->is_contiguous(), kOp, ": ", name, " must be contiguous; got strides ", t->strides());
  }
  TORCH_CHECK(!conv_bias.has_value() || conv_bias->is_contiguous(), kOp, ": conv_bias must be contiguous");

  const Tensor xz = project(normed, in_proj_weight, in_proj_scale, in_proj_bias);  // [x | z] rows
  Tensor x = at::empty({rows, d_inner}, normed.options());
  mamba_conv_step(xz.const_data_ptr<float>(), xz.stride(0), conv_state.mutable_data_ptr<float>(), conv_state.size(2),
                  conv_weight.const_data_ptr<float>(), width,
                  conv_bias.has_value() ? conv_bias->const_data_ptr<float>() : nullptr, rows, d_inner,
                  x.mutable_data_ptr<float>());
  const Tensor x_dbl = project(x, x_proj_weight, x_proj_scale, std::nullopt).contiguous();
  Tensor y = at::empty({rows, d_inner}, normed.options());
  // A float32 dt_proj is done in the state pass, a row of its weight per channel. A quantised
  // one is weight_only_linear's vectorised product, before the pass: widened there one weight
  // at a time (GCC does not vectorise int8 -> float), it made mamba-130m's int8 step 6.7 ms
  // at batch 1 and 30.6 ms at batch 8, against 5.1 and 18.1 ms this way (2-core EPYC).
  const bool dt_in_pass = dt_proj_weight.scalar_type() == at::kFloat;
  const Tensor dt = dt_in_pass ? Tensor()
                               : project(x_dbl.narrow(1, 0, dt_rank), dt_proj_weight, dt_proj_scale, std::nullopt);
  mamba_state_step(x.const_data_ptr<float>(), x_dbl.const_data_ptr<float>(), dt_rank,
                   xz.const_data_ptr<float>() + d_inner, xz.stride(0),
                   dt_in_pass ? dt_proj_weight.const_data_ptr<float>() : nullptr,
                   dt_in_pass ? nullptr : dt.const_data_ptr<float>(), dt_proj_bias.const_data_ptr<float>(),
                   A.const_data_ptr<float>(), D.const_data_ptr<float>(), ssm_state.mutable_data_ptr<float>(), rows,
                   d_inner, d_state, y.mutable_data_ptr<float>());
  return {project(y, out_proj_weight, out_proj_scale, out_proj_bias), new_residual};
}

// norm -> in_proj -> conv update of x, B, C -> dt (limited) -> state update -> gated norm
// -> out_proj: Mamba2.forward's decode step (layers/mamba2.py).
Step mamba2_block_step(const Tensor& hidden_states, const OptTensor& residual, const Tensor& norm_weight,
                       const OptTensor& norm_bias, double norm_eps, bool rms_norm, const Tensor& in_proj_weight,
                       const OptTensor& in_proj_bias, const Tensor& conv_weight, const OptTensor& conv_bias,
                       Tensor& conv_state, const Tensor& dt_bias, const Tensor& A, const Tensor& D,
                       Tensor& ssm_state, double dt_min, double dt_max, const OptTensor& gate_norm_weight,
                       double gate_norm_eps, int64_t gate_norm_group_size, bool norm_before_gate,
                       const Tensor& out_proj_weight, const OptTensor& out_proj_bias, const OptTensor& in_proj_scale,
                       const OptTensor& out_proj_scale) {
  constexpr const char* kOp = "mamba2_block_step (cpu)";
  auto [normed, new_residual] = add_norm(kOp, hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm);
  const int64_t rows = normed.size(0), d_model = normed.size(1);
  TORCH_CHECK(ssm_state.dim() == 4, kOp, ": ssm_state must be (batch, nheads, headdim, d_state); got shape ",
              ssm_state.sizes());
  const int64_t nheads = ssm_state.size(1), headdim = ssm_state.size(2), d_state = ssm_state.size(3);
  const int64_t d_inner = nheads * headdim;
  check_tensor(kOp, "ssm_state", ssm_state, {rows, nheads, headdim, d_state});
  TORCH_CHECK(conv_state.dim() == 3 && conv_state.size(1) > d_inner && (conv_state.size(1) - d_inner) % (2 * d_state) == 0,
              kOp, ": conv_state must be (batch, d_inner + 2 * ngroups * d_state, width) with d_inner = ", d_inner,
              " and d_state = ", d_state, "; got shape ", conv_state.sizes());
  const int64_t conv_dim = conv_state.size(1), ngroups = (conv_dim - d_inner) / (2 * d_state);
  TORCH_CHECK(nheads % ngroups == 0, kOp, ": ngroups (", ngroups, ") must divide nheads (", nheads, ")");
  TORCH_CHECK(check_projection(kOp, "in_proj", in_proj_weight, in_proj_bias, d_model, in_proj_scale) ==
                  d_inner + conv_dim + nheads,
              kOp, ": in_proj must have d_inner + conv_dim + nheads = ", d_inner + conv_dim + nheads, " outputs; got ",
              in_proj_weight.size(0));
  TORCH_CHECK(check_projection(kOp, "out_proj", out_proj_weight, out_proj_bias, d_inner, out_proj_scale) == d_model, kOp,
              ": out_proj must have d_model = ", d_model, " outputs; got ", out_proj_weight.size(0));
  check_tensor(kOp, "dt_bias", dt_bias, {nheads});
  check_tensor(kOp, "A", A, {nheads});
  TORCH_CHECK(D.dim() == 1 && (D.size(0) == nheads || D.size(0) == d_inner), kOp, ": D must be (nheads = ", nheads,
              ",) or (d_inner = ", d_inner, ",); got shape ", D.sizes());
  check_tensor(kOp, "D", D, D.sizes());
  TORCH_CHECK(0 <= dt_min && dt_min <= dt_max, kOp, ": dt_min and dt_max must satisfy 0 <= dt_min <= dt_max; got ",
              dt_min, ", ", dt_max);
  if (gate_norm_weight.has_value()) {
    check_tensor(kOp, "gate_norm_weight", *gate_norm_weight, {d_inner});
    TORCH_CHECK(gate_norm_group_size > 0 && d_inner % gate_norm_group_size == 0, kOp,
                ": gate_norm_group_size must divide d_inner = ", d_inner, "; got ", gate_norm_group_size);
    TORCH_CHECK(gate_norm_eps > 0, kOp, ": gate_norm_eps must be > 0; got ", gate_norm_eps);
  }

  const Tensor zxbcdt = project(normed, in_proj_weight, in_proj_scale, in_proj_bias);  // rows [z, x, B, C, dt]
  const Tensor z = zxbcdt.narrow(1, 0, d_inner);
  const Tensor xBC = conv_update(zxbcdt.narrow(1, d_inner, conv_dim), conv_state, conv_weight, conv_bias);
  const Tensor dt_raw = zxbcdt.narrow(1, d_inner + conv_dim, nheads);
  const auto per_head = [&](const Tensor& t) { return t.view({nheads, 1}).expand({nheads, headdim}); };
  const bool limited = dt_min > 0 || dt_max < std::numeric_limits<double>::infinity();
  Tensor dt = dt_raw;
  if (limited) {
    // The decode step has no dt limit: apply it here, as the layer's unfused step does.
    dt = at::empty({rows, nheads}, dt_raw.options());
    const float* bias = dt_bias.const_data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      const float* in = dt_raw.const_data_ptr<float>() + r * dt_raw.stride(0);
      float* out = dt.mutable_data_ptr<float>() + r * nheads;
      for (int64_t h = 0; h < nheads; ++h) {
        const float v = softplus_vec(in[h] + bias[h]);
        out[h] = std::min(std::max(v, static_cast<float>(dt_min)), static_cast<float>(dt_max));
      }
    }
  }
  const int64_t group_width = ngroups * d_state;
  const Tensor y = state_update(
      ssm_state, xBC.narrow(1, 0, d_inner).view({rows, nheads, headdim}),
      dt.unsqueeze(2).expand({rows, nheads, headdim}), A.view({nheads, 1, 1}).expand({nheads, headdim, d_state}),
      xBC.narrow(1, d_inner, group_width).view({rows, ngroups, d_state}),
      xBC.narrow(1, d_inner + group_width, group_width).view({rows, ngroups, d_state}),
      D.size(0) == nheads ? per_head(D) : D.view({nheads, headdim}),
      gate_norm_weight.has_value() ? OptTensor() : OptTensor(z.view({rows, nheads, headdim})),
      limited ? OptTensor() : OptTensor(per_head(dt_bias)), /*dt_softplus=*/!limited);
  Tensor gated = y.view({rows, d_inner});
  if (gate_norm_weight.has_value()) {
    gated = gated_rms_norm(gated, z, *gate_norm_weight, gate_norm_eps, gate_norm_group_size, norm_before_gate);
  }
  return {project(gated, out_proj_weight, out_proj_scale, out_proj_bias), new_residual};
}

// norm2 -> fc1 -> y * silu(gate) -> fc2: GatedMLP with its default activation (layers/mlp.py).
Step mlp_block_step(const Tensor& hidden_states, const Tensor& residual, const Tensor& norm_weight,
                    const OptTensor& norm_bias, double norm_eps, bool rms_norm, const Tensor& fc1_weight,
                    const OptTensor& fc1_bias, const Tensor& fc2_weight, const OptTensor& fc2_bias,
                    const OptTensor& fc1_scale, const OptTensor& fc2_scale) {
  constexpr const char* kOp = "mlp_block_step (cpu)";
  auto [normed, new_residual] = add_norm(kOp, hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm);
  const int64_t rows = normed.size(0), d_model = normed.size(1);
  const int64_t fc1_out = check_projection(kOp, "fc1", fc1_weight, fc1_bias, d_model, fc1_scale);
  TORCH_CHECK(fc1_out % 2 == 0, kOp, ": fc1 must have an even number of outputs (value and gate); got ", fc1_out);
  const int64_t hidden = fc1_out / 2;
  TORCH_CHECK(check_projection(kOp, "fc2", fc2_weight, fc2_bias, hidden, fc2_scale) == d_model, kOp,
              ": fc2 must have d_model = ", d_model, " outputs; got ", fc2_weight.size(0));

  const Tensor value_gate = project(normed, fc1_weight, fc1_scale, fc1_bias);
  Tensor act = at::empty({rows, hidden}, normed.options());
  for (int64_t r = 0; r < rows; ++r) {
    const float* value = value_gate.const_data_ptr<float>() + r * fc1_out;
    const float* gate = value + hidden;
    float* out = act.mutable_data_ptr<float>() + r * hidden;
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i) {
      out[i] = value[i] * (gate[i] * sigmoid_vec(gate[i]));
    }
  }
  return {project(act, fc2_weight, fc2_scale, fc2_bias), new_residual};
}

// norm -> in_proj -> RoPE on q and k -> k, v into the cache at `past` -> attention of the
// one query over the keys it may see -> out_proj: Attention.forward's decode step
// (layers/attention.py). The caches (b, max_seqlen, num_heads_kv, head_dim) are
// contiguous and written in place; positions (b,) are the rotary positions;
// key_mask (b, past + 1), where given, says which keys are real (the new one always
// is); a key s is seen when s > past - sliding_window (0: no window). Heads are split
// over the threads.
Step attention_block_step(const Tensor& hidden_states, const OptTensor& residual, const Tensor& norm_weight,
                          const OptTensor& norm_bias, double norm_eps, bool rms_norm, const Tensor& in_proj_weight,
                          const OptTensor& in_proj_bias, Tensor& k_cache, Tensor& v_cache, int64_t past,
                          const Tensor& positions, const OptTensor& key_mask, int64_t num_heads, double softmax_scale,
                          int64_t sliding_window, int64_t rotary_dim, double rotary_base, bool rotary_interleaved,
                          const Tensor& out_proj_weight, const OptTensor& out_proj_bias,
                          const OptTensor& in_proj_scale, const OptTensor& out_proj_scale) {
  constexpr const char* kOp = "attention_block_step (cpu)";
  auto [normed, new_residual] = add_norm(kOp, hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm);
  const int64_t rows = normed.size(0), d_model = normed.size(1);
  TORCH_CHECK(k_cache.dim() == 4, kOp, ": k_cache must be (batch, max_seqlen, num_heads_kv, head_dim); got shape ",
              k_cache.sizes());
  const int64_t max_seqlen = k_cache.size(1), heads_kv = k_cache.size(2), head_dim = k_cache.size(3);
  check_tensor(kOp, "k_cache", k_cache, {rows, max_seqlen, heads_kv, head_dim});
  check_tensor(kOp, "v_cache", v_cache, k_cache.sizes());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), kOp, ": k_cache and v_cache must be contiguous");
  TORCH_CHECK(0 <= past && past < max_seqlen, kOp, ": past must be in [0, max_seqlen = ", max_seqlen, "); got ", past);
  TORCH_CHECK(num_heads > 0 && num_heads % heads_kv == 0, kOp, ": num_heads (", num_heads,
              ") must be a multiple of the caches' num_heads_kv (", heads_kv, ")");
  TORCH_CHECK(rotary_dim >= 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim, kOp,
              ": rotary_dim must be even and in [0, head_dim = ", head_dim, "]; got ", rotary_dim);
  TORCH_CHECK(sliding_window >= 0, kOp, ": sliding_window must be >= 0 (0: none); got ", sliding_window);
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == rows && positions.scalar_type() == at::kLong, kOp,
              ": positions must be int64 of shape (", rows, ",); got ", positions.scalar_type(), " ", positions.sizes());
  if (key_mask.has_value()) {
    TORCH_CHECK(key_mask->scalar_type() == at::kBool && key_mask->dim() == 2 && key_mask->size(0) == rows &&
                    key_mask->size(1) == past + 1,
                kOp, ": key_mask must be bool of shape (", rows, ", past + 1 = ", past + 1, "); got ",
                key_mask->scalar_type(), " ", key_mask->sizes());
  }
  const int64_t q_width = num_heads * head_dim, kv_width = heads_kv * head_dim;
  TORCH_CHECK(check_projection(kOp, "in_proj", in_proj_weight, in_proj_bias, d_model, in_proj_scale) ==
                  q_width + 2 * kv_width, kOp,
              ": in_proj must have (num_heads + 2 * num_heads_kv) * head_dim = ", q_width + 2 * kv_width,
              " outputs; got ", in_proj_weight.size(0));
  TORCH_CHECK(check_projection(kOp, "out_proj", out_proj_weight, out_proj_bias, q_width, out_proj_scale) == d_model,
              kOp,
              ": out_proj must have d_model = ", d_model, " outputs; got ", out_proj_weight.size(0));

  Tensor qkv = project(normed, in_proj_weight, in_proj_scale, in_proj_bias).contiguous();  // rows [q | k | v], head-major
  float* qkv_data = qkv.mutable_data_ptr<float>();
  const int64_t qkv_row = q_width + 2 * kv_width;
  // RoPE as layers/attention.py computes it in fp32: angle = position * base^(-2j / rotary_dim).
  const int64_t half = rotary_dim / 2;
  std::vector<float> inv_freq(half);
  for (int64_t j = 0; j < half; ++j) {
    inv_freq[j] = std::pow(static_cast<float>(rotary_base), -(static_cast<float>(2 * j) / static_cast<float>(rotary_dim)));
  }
  const int64_t step_kv = heads_kv * head_dim;  // floats between consecutive positions of a cache row
  for (int64_t r = 0; r < rows; ++r) {
    float* row = qkv_data + r * qkv_row;
    const float position = static_cast<float>(positions.const_data_ptr<int64_t>()[r * positions.stride(0)]);
    for (int64_t j = 0; j < half; ++j) {
      const float angle = position * inv_freq[j];
      const float c = std::cos(angle), s = std::sin(angle);
      for (int64_t h = 0; h < num_heads + heads_kv; ++h) {  // the q heads, then the k heads
        float* x = row + h * head_dim;
        float& x1 = rotary_interleaved ? x[2 * j] : x[j];
        float& x2 = rotary_interleaved ? x[2 * j + 1] : x[j + half];
        const float a = x1, b = x2;
        x1 = a * c - b * s;
        x2 = a * s + b * c;
      }
    }
    const int64_t slot = (r * max_seqlen + past) * step_kv;
    std::copy_n(row + q_width, kv_width, k_cache.mutable_data_ptr<float>() + slot);
    std::copy_n(row + q_width + kv_width, kv_width, v_cache.mutable_data_ptr<float>() + slot);
  }

  Tensor attended = at::empty({rows, q_width}, normed.options());
  const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, past - sliding_window + 1) : 0;
  const int64_t group = num_heads / heads_kv;
  const float scale = static_cast<float>(softmax_scale);
  const bool* mask = key_mask.has_value() ? key_mask->const_data_ptr<bool>() : nullptr;
  const int64_t mask_row = key_mask.has_value() ? key_mask->stride(0) : 0;
  const int64_t mask_col = key_mask.has_value() ? key_mask->stride(1) : 0;
  at::parallel_for(0, rows * num_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(past + 1 - first);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / num_heads, h = i % num_heads, g = h / group;
      const float* q = qkv_data + r * qkv_row + h * head_dim;
      const float* keys = k_cache.const_data_ptr<float>() + r * max_seqlen * step_kv + g * head_dim;
      const float* values = v_cache.const_data_ptr<float>() + r * max_seqlen * step_kv + g * head_dim;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t t = first; t <= past; ++t) {
        const bool seen = mask == nullptr || t == past || mask[r * mask_row + t * mask_col];
        float dot = 0.0f;
        const float* k = keys + t * step_kv;
#pragma omp simd reduction(+ : dot)
        for (int64_t e = 0; e < head_dim; ++e) {
          dot += q[e] * k[e];
        }
        scores[t - first] = seen ? dot * scale : -std::numeric_limits<float>::infinity();
        top = std::max(top, scores[t - first]);
      }
      float total = 0.0f;
      for (float& p : scores) {
        p = std::exp(p - top);
        total += p;
      }
      float* out = attended.mutable_data_ptr<float>() + r * q_width + h * head_dim;
      std::fill_n(out, head_dim, 0.0f);
      for (int64_t t = first; t <= past; ++t) {
        const float p = scores[t - first] / total;
        const float* v = values + t * step_kv;
#pragma omp simd
        for (int64_t e = 0; e < head_dim; ++e) {
          out[e] += p * v[e];
        }
      }
    }
  });
  return {project(attended, out_proj_weight, out_proj_scale, out_proj_bias), new_residual};
}

// ---------------------------------------------------------------- a whole step in one call

// The token embedding, a stack of block steps and the final norm, bound once and
// called once per decode step: from Python that is one call per token instead of
// one per block (each ~25 us of argument passing at ~20 arguments) plus the
// embedding's and final norm's small ops. Blocks are added in order with the
// arguments of their op after `residual`; their tensors are held, not copied.
class DecodeStep : public torch::CustomClassHolder {
 public:
  // embedding (padded_vocab, d_model): float32, or weight-only quantised (int8 with
  // embedding_scale (padded_vocab,), or bf16); ids in [0, vocab_size); the final norm as a block's.
  DecodeStep(Tensor embedding, std::optional<Tensor> embedding_scale, int64_t vocab_size, Tensor norm_weight,
             std::optional<Tensor> norm_bias, double norm_eps, bool rms_norm)
      : embedding_(std::move(embedding)),
        embedding_scale_(std::move(embedding_scale)),
        vocab_size_(vocab_size),
        norm_weight_(std::move(norm_weight)),
        norm_bias_(std::move(norm_bias)),
        norm_eps_(norm_eps),
        rms_norm_(rms_norm) {
    constexpr const char* kOp = "DecodeStep (cpu)";
    TORCH_CHECK(embedding_.dim() == 2 && embedding_.is_contiguous(), kOp,
                ": embedding must be a contiguous (padded_vocab_size, d_model) tensor; got shape ", embedding_.sizes());
    check_projection(kOp, "embedding", embedding_, std::nullopt, embedding_.size(1), embedding_scale_);
    TORCH_CHECK(0 < vocab_size_ && vocab_size_ <= embedding_.size(0), kOp, ": vocab_size must be in [1, ",
                embedding_.size(0), "]; got ", vocab_size_);
  }

  void add_mamba_block(Tensor norm_weight, std::optional<Tensor> norm_bias, double norm_eps, bool rms_norm,
                       Tensor in_proj_weight, std::optional<Tensor> in_proj_bias, Tensor conv_weight,
                       std::optional<Tensor> conv_bias, Tensor conv_state, Tensor x_proj_weight,
                       Tensor dt_proj_weight, Tensor dt_proj_bias, Tensor A, Tensor D, Tensor ssm_state,
                       Tensor out_proj_weight, std::optional<Tensor> out_proj_bias,
                       std::optional<Tensor> in_proj_scale, std::optional<Tensor> x_proj_scale,
                       std::optional<Tensor> dt_proj_scale, std::optional<Tensor> out_proj_scale) {
    blocks_.push_back([=](const Tensor& h, const OptTensor& residual, const Context&) mutable {
      return mamba_block_step(h, residual, norm_weight, norm_bias, norm_eps, rms_norm, in_proj_weight, in_proj_bias,
                              conv_weight, conv_bias, conv_state, x_proj_weight, dt_proj_weight, dt_proj_bias, A, D,
                              ssm_state, out_proj_weight, out_proj_bias, in_proj_scale, x_proj_scale, dt_proj_scale,
                              out_proj_scale);
    });
  }

  void add_mamba2_block(Tensor norm_weight, std::optional<Tensor> norm_bias, double norm_eps, bool rms_norm,
                        Tensor in_proj_weight, std::optional<Tensor> in_proj_bias, Tensor conv_weight,
                        std::optional<Tensor> conv_bias, Tensor conv_state, Tensor dt_bias, Tensor A, Tensor D,
                        Tensor ssm_state, double dt_min, double dt_max, std::optional<Tensor> gate_norm_weight,
                        double gate_norm_eps, int64_t gate_norm_group_size, bool norm_before_gate,
                        Tensor out_proj_weight, std::optional<Tensor> out_proj_bias,
                        std::optional<Tensor> in_proj_scale, std::optional<Tensor> out_proj_scale) {
    blocks_.push_back([=](const Tensor& h, const OptTensor& residual, const Context&) mutable {
      return mamba2_block_step(h, residual, norm_weight, norm_bias, norm_eps, rms_norm, in_proj_weight, in_proj_bias,
                               conv_weight, conv_bias, conv_state, dt_bias, A, D, ssm_state, dt_min, dt_max,
                               gate_norm_weight, gate_norm_eps, gate_norm_group_size, norm_before_gate,
                               out_proj_weight, out_proj_bias, in_proj_scale, out_proj_scale);
    });
  }

  void add_mlp_block(Tensor norm_weight, std::optional<Tensor> norm_bias, double norm_eps, bool rms_norm,
                     Tensor fc1_weight, std::optional<Tensor> fc1_bias, Tensor fc2_weight,
                     std::optional<Tensor> fc2_bias, std::optional<Tensor> fc1_scale,
                     std::optional<Tensor> fc2_scale) {
    blocks_.push_back([=](const Tensor& h, const OptTensor& residual, const Context&) {
      TORCH_CHECK(residual.has_value(), "DecodeStep (cpu): an MLP block cannot come first (it needs a residual)");
      return mlp_block_step(h, *residual, norm_weight, norm_bias, norm_eps, rms_norm, fc1_weight, fc1_bias,
                            fc2_weight, fc2_bias, fc1_scale, fc2_scale);
    });
  }

  void add_attention_block(Tensor norm_weight, std::optional<Tensor> norm_bias, double norm_eps, bool rms_norm,
                           Tensor in_proj_weight, std::optional<Tensor> in_proj_bias, Tensor k_cache, Tensor v_cache,
                           int64_t num_heads, double softmax_scale, int64_t sliding_window, int64_t rotary_dim,
                           double rotary_base, bool rotary_interleaved, Tensor out_proj_weight,
                           std::optional<Tensor> out_proj_bias, std::optional<Tensor> in_proj_scale,
                           std::optional<Tensor> out_proj_scale) {
    blocks_.push_back([=](const Tensor& h, const OptTensor& residual, const Context& context) mutable {
      return attention_block_step(h, residual, norm_weight, norm_bias, norm_eps, rms_norm, in_proj_weight,
                                  in_proj_bias, k_cache, v_cache, context.past, context.positions, context.key_mask,
                                  num_heads, softmax_scale, sliding_window, rotary_dim, rotary_base,
                                  rotary_interleaved, out_proj_weight, out_proj_bias, in_proj_scale, out_proj_scale);
    });
  }

  // input_ids (batch,) int64 or int32 -> the final norm's output (batch, d_model). For
  // attention blocks: past, the cache slot of the new position; positions (batch,) its
  // rotary positions (None: past); key_mask (batch, past + 1) the real keys (None: all).
  Tensor step(const Tensor& input_ids, int64_t past, std::optional<Tensor> positions, std::optional<Tensor> key_mask) {
    return run(input_ids, past, positions, key_mask, nullptr);
  }

  // step, and the seconds each part took (float64): the embedding, each block, the final
  // norm. For benchmarks/model_speed.py's breakdown of a step.
  std::tuple<Tensor, Tensor> timed_step(const Tensor& input_ids, int64_t past, std::optional<Tensor> positions,
                                        std::optional<Tensor> key_mask) {
    Tensor seconds = at::zeros({static_cast<int64_t>(blocks_.size()) + 2}, at::TensorOptions(at::kDouble));
    Tensor out = run(input_ids, past, positions, key_mask, seconds.mutable_data_ptr<double>());
    return {out, seconds};
  }

 private:
  // What attention blocks need of the step beyond their inputs.
  struct Context {
    int64_t past;
    Tensor positions;
    OptTensor key_mask;
  };

  Tensor run(const Tensor& input_ids, int64_t past, const OptTensor& positions, const OptTensor& key_mask,
             double* seconds) {
    constexpr const char* kOp = "DecodeStep (cpu)";
    using Clock = std::chrono::steady_clock;
    auto mark = Clock::now();
    const auto lap = [&](int64_t part) {
      if (seconds != nullptr) {
        const auto now = Clock::now();
        seconds[part] = std::chrono::duration<double>(now - mark).count();
        mark = now;
      }
    };
    TORCH_CHECK(!blocks_.empty(), kOp, ": add blocks before stepping");
    TORCH_CHECK(input_ids.dim() == 1 && input_ids.device().is_cpu() &&
                    (input_ids.scalar_type() == at::kLong || input_ids.scalar_type() == at::kInt),
                kOp, ": input_ids must be a CPU int64/int32 tensor (batch,); got ", input_ids.scalar_type(),
                " of shape ", input_ids.sizes());
    const int64_t rows = input_ids.size(0), d_model = embedding_.size(1);
    Tensor hidden = at::empty({rows, d_model}, at::TensorOptions(at::kFloat));
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t id = input_ids.scalar_type() == at::kLong ? input_ids.const_data_ptr<int64_t>()[r * input_ids.stride(0)]
                                                               : input_ids.const_data_ptr<int32_t>()[r * input_ids.stride(0)];
      TORCH_CHECK(0 <= id && id < vocab_size_, kOp, ": input_ids must lie in [0, vocab_size=", vocab_size_,
                  "); got the id ", id);
      float* row = hidden.mutable_data_ptr<float>() + r * d_model;
      switch (embedding_.scalar_type()) {
        case at::kChar: {
          // As QuantizedEmbedding: the int8 row times its scale.
          const int8_t* w = embedding_.const_data_ptr<int8_t>() + id * d_model;
          const float scale = embedding_scale_->const_data_ptr<float>()[id];
          for (int64_t i = 0; i < d_model; ++i) {
            row[i] = static_cast<float>(w[i]) * scale;
          }
          break;
        }
        case at::kBFloat16: {
          const at::BFloat16* w = embedding_.const_data_ptr<at::BFloat16>() + id * d_model;
          for (int64_t i = 0; i < d_model; ++i) {
            row[i] = static_cast<float>(w[i]);
          }
          break;
        }
        default:
          std::copy_n(embedding_.const_data_ptr<float>() + id * d_model, d_model, row);
      }
    }
    const Context context{past, positions.has_value() ? *positions : at::full({rows}, past, at::TensorOptions(at::kLong)),
                          key_mask};
    lap(0);
    OptTensor residual;
    for (size_t i = 0; i < blocks_.size(); ++i) {
      std::tie(hidden, residual) = blocks_[i](hidden, residual, context);
      lap(static_cast<int64_t>(i) + 1);
    }
    Tensor out = std::get<0>(add_norm(kOp, hidden, residual, norm_weight_, norm_bias_, norm_eps_, rms_norm_));
    lap(static_cast<int64_t>(blocks_.size()) + 1);
    return out;
  }

  Tensor embedding_;
  OptTensor embedding_scale_;
  int64_t vocab_size_;
  Tensor norm_weight_;
  OptTensor norm_bias_;
  double norm_eps_;
  bool rms_norm_;
  std::vector<std::function<Step(const Tensor&, const OptTensor&, const Context&)>> blocks_;
};

}  // namespace

TORCH_LIBRARY_IMPL(lnlm_ssm, CPU, m) {
  m.impl("mamba_block_step", &mamba_block_step);
  m.impl("mamba2_block_step", &mamba2_block_step);
  m.impl("mlp_block_step", &mlp_block_step);
  m.impl("attention_block_step", &attention_block_step);
}

// A class is defined with its code (registration.cpp holds the op schemas).
TORCH_LIBRARY_FRAGMENT(lnlm_ssm, m) {
  m.class_<DecodeStep>("DecodeStep")
      .def(torch::init<Tensor, std::optional<Tensor>, int64_t, Tensor, std::optional<Tensor>, double, bool>())
      .def("add_mamba_block", &DecodeStep::add_mamba_block)
      .def("add_mamba2_block", &DecodeStep::add_mamba2_block)
      .def("add_mlp_block", &DecodeStep::add_mlp_block)
      .def("add_attention_block", &DecodeStep::add_attention_block)
      .def("step", &DecodeStep::step)
      .def("timed_step", &DecodeStep::timed_step);
}

}  // namespace lnlm_ssm
