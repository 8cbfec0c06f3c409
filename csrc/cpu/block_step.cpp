// One decode step of a whole block in one call: the block's norm (with the
// residual add), then its mixer or MLP, projections included.
//
// A decode step is ~20 small ops per block. Called one by one from Python, each
// costs its interpreter, argument-checking and dispatch time on top of its work,
// which for a 130M model on two cores added up to a third of a token's time.
// Here the step is one call per block, made of the same kernels the unfused path
// calls (decode_linear, causal_conv1d_update, selective_state_update), reached at
// their CPU implementations through the dispatcher (no autograd, no Python), and
// a little glue of its own: the residual add and norm, the MLP's gate, Mamba-2's
// dt limit and gated norm.
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
//     ssm_state (b, d_inner, d_state) updated in place.
//   Mamba-2: A (nheads,) = -exp(A_log), dt_bias (nheads,), D (nheads,) or (d_inner,),
//     ssm_state (b, nheads, headdim, d_state) updated in place.
//
// The projections all go through project(): the one place a projection with
// another weight format (weight-only quantised) plugs in.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

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

Tensor project(const Tensor& x, const Tensor& weight, const OptTensor& bias) {
  if (x.size(0) <= kKernelMaxRows && x.size(1) >= kKernelMinInner) {
    return decode_linear(x, weight, bias);
  }
  return at::linear(x, weight, bias);
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

// A projection (out, in) reading rows of size `in`: its output size.
int64_t check_projection(const char* op, const char* name, const Tensor& weight, const OptTensor& bias,
                         int64_t in) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == in && weight.stride(1) == 1, op, ": ", name,
              ".weight must be (out, in = ", in, ") with unit stride along in; got shape ", weight.sizes(),
              ", strides ", weight.strides());
  check_tensor(op, name, weight, weight.sizes());
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

// ---------------------------------------------------------------- the blocks

// norm -> in_proj -> conv update -> x_proj -> dt_proj -> state update (with D and the
// silu(z) gate) -> out_proj: Mamba.forward's decode step (layers/mamba.py).
Step mamba_block_step(const Tensor& hidden_states, const OptTensor& residual, const Tensor& norm_weight,
                      const OptTensor& norm_bias, double norm_eps, bool rms_norm, const Tensor& in_proj_weight,
                      const OptTensor& in_proj_bias, const Tensor& conv_weight, const OptTensor& conv_bias,
                      Tensor& conv_state, const Tensor& x_proj_weight, const Tensor& dt_proj_weight,
                      const Tensor& dt_proj_bias, const Tensor& A, const Tensor& D, Tensor& ssm_state,
                      const Tensor& out_proj_weight, const OptTensor& out_proj_bias) {
  constexpr const char* kOp = "mamba_block_step (cpu)";
  auto [normed, new_residual] = add_norm(kOp, hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm);
  const int64_t rows = normed.size(0), d_model = normed.size(1);
  TORCH_CHECK(ssm_state.dim() == 3, kOp, ": ssm_state must be (batch, d_inner, d_state); got shape ",
              ssm_state.sizes());
  const int64_t d_inner = ssm_state.size(1), d_state = ssm_state.size(2), dt_rank = dt_proj_weight.size(-1);
  check_tensor(kOp, "ssm_state", ssm_state, {rows, d_inner, d_state});
  TORCH_CHECK(check_projection(kOp, "in_proj", in_proj_weight, in_proj_bias, d_model) == 2 * d_inner, kOp,
              ": in_proj must have 2 * d_inner = ", 2 * d_inner, " outputs; got ", in_proj_weight.size(0));
  TORCH_CHECK(check_projection(kOp, "x_proj", x_proj_weight, std::nullopt, d_inner) == dt_rank + 2 * d_state, kOp,
              ": x_proj must have dt_rank + 2 * d_state = ", dt_rank + 2 * d_state, " outputs; got ",
              x_proj_weight.size(0));
  TORCH_CHECK(check_projection(kOp, "dt_proj", dt_proj_weight, dt_proj_bias, dt_rank) == d_inner, kOp,
              ": dt_proj must have d_inner = ", d_inner, " outputs; got ", dt_proj_weight.size(0));
  check_tensor(kOp, "dt_proj_bias", dt_proj_bias, {d_inner});
  TORCH_CHECK(check_projection(kOp, "out_proj", out_proj_weight, out_proj_bias, d_inner) == d_model, kOp,
              ": out_proj must have d_model = ", d_model, " outputs; got ", out_proj_weight.size(0));
  check_tensor(kOp, "A", A, {d_inner, d_state});
  check_tensor(kOp, "D", D, {d_inner});

  const Tensor xz = project(normed, in_proj_weight, in_proj_bias);
  const Tensor x = conv_update(xz.narrow(1, 0, d_inner), conv_state, conv_weight, conv_bias);
  const Tensor x_dbl = project(x, x_proj_weight, std::nullopt);
  const Tensor dt = project(x_dbl.narrow(1, 0, dt_rank), dt_proj_weight, std::nullopt);  // the bias goes below
  // Mamba-1 is the canonical layout with one channel per head (headdim 1) and one group.
  const Tensor y = state_update(ssm_state.unsqueeze(2), x.unsqueeze(2), dt.unsqueeze(2), A.unsqueeze(1),
                                x_dbl.narrow(1, dt_rank, d_state).unsqueeze(1),
                                x_dbl.narrow(1, dt_rank + d_state, d_state).unsqueeze(1), D.unsqueeze(1),
                                xz.narrow(1, d_inner, d_inner).unsqueeze(2), dt_proj_bias.unsqueeze(1),
                                /*dt_softplus=*/true);
  return {project(y.view({rows, d_inner}), out_proj_weight, out_proj_bias), new_residual};
}

// norm -> in_proj -> conv update of x, B, C -> dt (limited) -> state update -> gated norm
// -> out_proj: Mamba2.forward's decode step (layers/mamba2.py).
Step mamba2_block_step(const Tensor& hidden_states, const OptTensor& residual, const Tensor& norm_weight,
                       const OptTensor& norm_bias, double norm_eps, bool rms_norm, const Tensor& in_proj_weight,
                       const OptTensor& in_proj_bias, const Tensor& conv_weight, const OptTensor& conv_bias,
                       Tensor& conv_state, const Tensor& dt_bias, const Tensor& A, const Tensor& D,
                       Tensor& ssm_state, double dt_min, double dt_max, const OptTensor& gate_norm_weight,
                       double gate_norm_eps, int64_t gate_norm_group_size, bool norm_before_gate,
                       const Tensor& out_proj_weight, const OptTensor& out_proj_bias) {
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
  TORCH_CHECK(check_projection(kOp, "in_proj", in_proj_weight, in_proj_bias, d_model) == d_inner + conv_dim + nheads,
              kOp, ": in_proj must have d_inner + conv_dim + nheads = ", d_inner + conv_dim + nheads, " outputs; got ",
              in_proj_weight.size(0));
  TORCH_CHECK(check_projection(kOp, "out_proj", out_proj_weight, out_proj_bias, d_inner) == d_model, kOp,
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

  const Tensor zxbcdt = project(normed, in_proj_weight, in_proj_bias);  // rows [z, x, B, C, dt]
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
  return {project(gated, out_proj_weight, out_proj_bias), new_residual};
}

// norm2 -> fc1 -> y * silu(gate) -> fc2: GatedMLP with its default activation (layers/mlp.py).
Step mlp_block_step(const Tensor& hidden_states, const Tensor& residual, const Tensor& norm_weight,
                    const OptTensor& norm_bias, double norm_eps, bool rms_norm, const Tensor& fc1_weight,
                    const OptTensor& fc1_bias, const Tensor& fc2_weight, const OptTensor& fc2_bias) {
  constexpr const char* kOp = "mlp_block_step (cpu)";
  auto [normed, new_residual] = add_norm(kOp, hidden_states, residual, norm_weight, norm_bias, norm_eps, rms_norm);
  const int64_t rows = normed.size(0), d_model = normed.size(1);
  const int64_t fc1_out = check_projection(kOp, "fc1", fc1_weight, fc1_bias, d_model);
  TORCH_CHECK(fc1_out % 2 == 0, kOp, ": fc1 must have an even number of outputs (value and gate); got ", fc1_out);
  const int64_t hidden = fc1_out / 2;
  check_projection(kOp, "fc2", fc2_weight, fc2_bias, hidden);

  const Tensor value_gate = project(normed, fc1_weight, fc1_bias);
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
  return {project(act, fc2_weight, fc2_bias), new_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(lnlm_ssm, CPU, m) {
  m.impl("mamba_block_step", &mamba_block_step);
  m.impl("mamba2_block_step", &mamba2_block_step);
  m.impl("mlp_block_step", &mlp_block_step);
}

}  // namespace lnlm_ssm
