// Torch binding of the CUDA kernels (extension lnlm_ssm._cuda).
//
// Importing lnlm_ssm._cuda registers the CUDA implementations of the ops whose
// schemas lnlm_ssm._C defines with TORCH_LIBRARY(lnlm_ssm, m); import
// lnlm_ssm._C first. The kernels themselves live behind torch-free launch APIs
// (csrc/cuda/<op>/<op>.h); this file only checks arguments, picks the device and
// stream, fills the params struct from tensor strides and dispatches on dtype.
// It is the only file of the extension that defines PyInit__cuda.
#include <Python.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "selective_scan/selective_scan.h"
#include "state_update/state_update.h"

namespace {

namespace cu = lnlm_ssm::cuda;

constexpr const char* kOp = "lnlm_ssm.selective_state_update (CUDA): ";

void check_on_device(const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), kOp, name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, kOp, name, " is on ", t.device(), " but state is on ", device,
              ": all tensors must be on the same device");
}

void check_shape(const char* name, const at::Tensor& t, at::IntArrayRef expected, const char* layout) {
  TORCH_CHECK(t.dim() == static_cast<int64_t>(expected.size()), kOp, name, " must have ", expected.size(),
              " dimensions ", layout, ", got shape ", t.sizes());
  TORCH_CHECK(t.sizes() == expected, kOp, name, " must have shape ", layout, " = ", expected, ", got ", t.sizes());
}

void check_dtype(const char* name, const at::Tensor& t, at::ScalarType expected, const char* why) {
  TORCH_CHECK(t.scalar_type() == expected, kOp, name, " must have dtype ", expected, " (", why, "), got ",
              t.scalar_type());
}

cu::ScalarKind kind_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return cu::ScalarKind::kFloat32;
    case at::kHalf:
      return cu::ScalarKind::kFloat16;
    case at::kBFloat16:
      return cu::ScalarKind::kBFloat16;
    default:
      TORCH_CHECK(false, kOp, "unsupported dtype ", dtype);
  }
}

at::Tensor selective_state_update_cuda(const at::Tensor& state, const at::Tensor& x, const at::Tensor& dt,
                                       const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                       const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                                       const std::optional<at::Tensor>& dt_bias, bool dt_softplus,
                                       const std::optional<at::Tensor>& state_batch_indices) {
  // Devices.
  TORCH_CHECK(state.is_cuda(), kOp, "state must be a CUDA tensor, got one on ", state.device());
  const at::Device device = state.device();
  const bool pooled = state_batch_indices.has_value();
  if (pooled) check_on_device("state_batch_indices", *state_batch_indices, device);
  check_on_device("x", x, device);
  check_on_device("dt", dt, device);
  check_on_device("A", A, device);
  check_on_device("B", B, device);
  check_on_device("C", C, device);
  if (D.has_value()) check_on_device("D", *D, device);
  if (z.has_value()) check_on_device("z", *z, device);
  if (dt_bias.has_value()) check_on_device("dt_bias", *dt_bias, device);

  // Shapes (the canonical layout of lnlm_ssm/ops/state_update/shapes.py). With
  // state_batch_indices, state's first dimension is the pool of slots, not the batch.
  const char* const state_layout = pooled ? "(pool, nheads, headdim, dstate)" : "(batch, nheads, headdim, dstate)";
  TORCH_CHECK(state.dim() == 4, kOp, "state must have 4 dimensions ", state_layout, ", got shape ", state.sizes());
  TORCH_CHECK(x.dim() == 3, kOp, "x must have 3 dimensions (batch, nheads, headdim), got shape ", x.sizes());
  const int64_t batch = x.size(0), nheads = state.size(1), headdim = state.size(2), dstate = state.size(3);
  const int64_t pool = state.size(0);
  TORCH_CHECK(pooled || pool == batch, kOp, "state must have shape ", state_layout, " = ",
              at::IntArrayRef({batch, nheads, headdim, dstate}), ", got ", state.sizes());
  TORCH_CHECK(dstate <= cu::kStateUpdateMaxDstate, kOp, "dstate (state.size(3)) must be at most ",
              cu::kStateUpdateMaxDstate, " for the CUDA kernel, got ", dstate);
  TORCH_CHECK(B.dim() == 3, kOp, "B must have 3 dimensions (batch, ngroups, dstate), got shape ", B.sizes());
  const int64_t ngroups = B.size(1);
  TORCH_CHECK(ngroups >= 1 && nheads % ngroups == 0, kOp, "nheads (", nheads, ") must be divisible by ngroups (",
              ngroups, ", B.size(1))");
  check_shape("x", x, {batch, nheads, headdim}, "(batch, nheads, headdim)");
  check_shape("dt", dt, {batch, nheads, headdim}, "(batch, nheads, headdim)");
  check_shape("A", A, {nheads, headdim, dstate}, "(nheads, headdim, dstate)");
  check_shape("B", B, {batch, ngroups, dstate}, "(batch, ngroups, dstate)");
  check_shape("C", C, {batch, ngroups, dstate}, "(batch, ngroups, dstate)");
  if (D.has_value()) check_shape("D", *D, {nheads, headdim}, "(nheads, headdim)");
  if (z.has_value()) check_shape("z", *z, {batch, nheads, headdim}, "(batch, nheads, headdim)");
  if (dt_bias.has_value()) check_shape("dt_bias", *dt_bias, {nheads, headdim}, "(nheads, headdim)");
  // Only the indices' shape and dtype: their values are on the device (see state_update.h).
  if (pooled) check_shape("state_batch_indices", *state_batch_indices, {batch}, "(batch,)");

  // Dtypes.
  const at::ScalarType input_dtype = x.scalar_type();
  TORCH_CHECK(input_dtype == at::kFloat || input_dtype == at::kHalf || input_dtype == at::kBFloat16, kOp,
              "x must have dtype float32, float16 or bfloat16, got ", input_dtype,
              " (for float64 use backend=\"reference\")");
  check_dtype("dt", dt, input_dtype, "the dtype of x");
  check_dtype("B", B, input_dtype, "the dtype of x");
  check_dtype("C", C, input_dtype, "the dtype of x");
  if (z.has_value()) check_dtype("z", *z, input_dtype, "the dtype of x");
  TORCH_CHECK(state.scalar_type() == at::kFloat || state.scalar_type() == input_dtype, kOp,
              "state must have dtype float32 or the dtype of x (", input_dtype, "), got ", state.scalar_type());
  check_dtype("A", A, at::kFloat, "cast it with A.float()");
  if (D.has_value()) check_dtype("D", *D, at::kFloat, "cast it with D.float()");
  if (dt_bias.has_value()) check_dtype("dt_bias", *dt_bias, at::kFloat, "cast it with dt_bias.float()");
  if (pooled) {
    const at::ScalarType index_dtype = state_batch_indices->scalar_type();
    TORCH_CHECK(index_dtype == at::kInt || index_dtype == at::kLong, kOp,
                "state_batch_indices must have dtype int32 or int64, got ", index_dtype);
  }

  // state is written in place: two of its elements must not share memory.
  at::assert_no_internal_overlap(state);

  at::Tensor out = at::empty({batch, nheads, headdim}, x.options());
  if (out.numel() == 0) {
    return out;
  }

  cu::StateUpdateParams p;
  p.batch = batch;
  p.nheads = nheads;
  p.headdim = headdim;
  p.dstate = dstate;
  p.ngroups = ngroups;
  p.pool = pool;
  p.input_kind = kind_of(input_dtype);
  p.state_kind = kind_of(state.scalar_type());
  p.dt_softplus = dt_softplus;

  p.state = state.data_ptr();
  p.state_batch_stride = state.stride(0);
  p.state_head_stride = state.stride(1);
  p.state_dim_stride = state.stride(2);
  p.state_dstate_stride = state.stride(3);

  p.x = x.const_data_ptr();
  p.x_batch_stride = x.stride(0);
  p.x_head_stride = x.stride(1);
  p.x_dim_stride = x.stride(2);

  p.dt = dt.const_data_ptr();
  p.dt_batch_stride = dt.stride(0);
  p.dt_head_stride = dt.stride(1);
  p.dt_dim_stride = dt.stride(2);

  p.A = A.const_data_ptr<float>();
  p.A_head_stride = A.stride(0);
  p.A_dim_stride = A.stride(1);
  p.A_dstate_stride = A.stride(2);

  p.B = B.const_data_ptr();
  p.B_batch_stride = B.stride(0);
  p.B_group_stride = B.stride(1);
  p.B_dstate_stride = B.stride(2);

  p.C = C.const_data_ptr();
  p.C_batch_stride = C.stride(0);
  p.C_group_stride = C.stride(1);
  p.C_dstate_stride = C.stride(2);

  if (D.has_value()) {
    p.D = D->const_data_ptr<float>();
    p.D_head_stride = D->stride(0);
    p.D_dim_stride = D->stride(1);
  }
  if (z.has_value()) {
    p.z = z->const_data_ptr();
    p.z_batch_stride = z->stride(0);
    p.z_head_stride = z->stride(1);
    p.z_dim_stride = z->stride(2);
  }
  if (dt_bias.has_value()) {
    p.dt_bias = dt_bias->const_data_ptr<float>();
    p.dt_bias_head_stride = dt_bias->stride(0);
    p.dt_bias_dim_stride = dt_bias->stride(1);
  }
  if (pooled) {
    p.state_batch_indices = state_batch_indices->const_data_ptr();
    p.state_batch_indices_int64 = state_batch_indices->scalar_type() == at::kLong;
    p.state_batch_indices_stride = state_batch_indices->stride(0);
  }

  p.out = out.data_ptr();
  p.out_batch_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.out_dim_stride = out.stride(2);

  const c10::cuda::CUDAGuard device_guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  // Dispatches on p.input_kind to the launcher compiled for that dtype.
  const cudaError_t err = cu::selective_state_update(p, stream);
  C10_CUDA_CHECK(err);
  return out;
}


// The selective scan (csrc/cuda/selective_scan/selective_scan.h has the layout):
// u, delta, z (b, d, l) in one of float32/float16/bfloat16; A (d, n), B and C
// (b, g, n, l) or, time-invariant, (d, n), D, delta_bias (d,), states (b, d, n), all float32.
constexpr const char* kScanOp = "lnlm_ssm.selective_scan (CUDA): ";

void check_scan_tensor(const char* name, const at::Tensor& t, const at::Device& device, at::IntArrayRef shape,
                       const char* layout, std::optional<at::ScalarType> dtype) {
  TORCH_CHECK(t.is_cuda() && t.device() == device, kScanOp, name, " must be on ", device, " (the device of u), got ",
              t.device());
  TORCH_CHECK(t.sizes() == shape, kScanOp, name, " must have shape ", layout, " = ", shape, ", got ", t.sizes());
  if (dtype.has_value()) {
    TORCH_CHECK(t.scalar_type() == *dtype, kScanOp, name, " must have dtype ", *dtype, ", got ", t.scalar_type());
  }
}

struct ScanSizes {
  int64_t batch, dim, seqlen, dstate, ngroups;
};

// Checks the forward's inputs and fills the sizes, flags and input pointers of p.
ScanSizes fill_scan_inputs(cu::SelectiveScanParams& p, const at::Tensor& u, const at::Tensor& delta,
                           const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                           const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                           const std::optional<at::Tensor>& delta_bias, bool delta_softplus, int64_t checkpoint_every) {
  TORCH_CHECK(u.is_cuda(), kScanOp, "u must be a CUDA tensor, got one on ", u.device());
  TORCH_CHECK(u.dim() == 3, kScanOp, "u must have 3 dimensions (batch, dim, seqlen), got shape ", u.sizes());
  const at::Device device = u.device();
  const at::ScalarType dtype = u.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, kScanOp,
              "u must have dtype float32, float16 or bfloat16, got ", dtype, " (for float64 use backend=\"reference\")");
  TORCH_CHECK(A.dim() == 2, kScanOp, "A must have 2 dimensions (dim, dstate), got shape ", A.sizes());
  TORCH_CHECK(B.dim() == 4 || B.dim() == 2, kScanOp,
              "B must have 4 dimensions (batch, ngroups, dstate, seqlen) or 2 (dim, dstate), got shape ", B.sizes());
  TORCH_CHECK(C.dim() == 4 || C.dim() == 2, kScanOp,
              "C must have 4 dimensions (batch, ngroups, dstate, seqlen) or 2 (dim, dstate), got shape ", C.sizes());
  // The groups are those of the time-varying ones (the checks below make B's and C's agree).
  const int64_t ngroups = B.dim() == 4 ? B.size(1) : (C.dim() == 4 ? C.size(1) : 1);
  const ScanSizes s{u.size(0), u.size(1), u.size(2), A.size(1), ngroups};
  TORCH_CHECK(s.dstate >= 1 && s.dstate <= cu::kSelectiveScanMaxDstate, kScanOp, "dstate (A.size(1)) must be in [1, ",
              cu::kSelectiveScanMaxDstate, "], got ", s.dstate);
  TORCH_CHECK(s.ngroups >= 1 && s.dim % s.ngroups == 0, kScanOp, "dim (", s.dim,
              ") must be divisible by ngroups (", s.ngroups, ")");
  TORCH_CHECK(checkpoint_every >= 0 && checkpoint_every <= cu::kSelectiveScanMaxCheckpointEvery &&
                  checkpoint_every % cu::kSelectiveScanCheckpointQuantum == 0,
              kScanOp, "checkpoint_every must be 0 or a multiple of ", cu::kSelectiveScanCheckpointQuantum,
              " up to ", cu::kSelectiveScanMaxCheckpointEvery, ", got ", checkpoint_every);
  check_scan_tensor("delta", delta, device, u.sizes(), "(batch, dim, seqlen)", dtype);
  check_scan_tensor("A", A, device, {s.dim, s.dstate}, "(dim, dstate)", at::kFloat);
  const auto check_projection = [&](const char* name, const at::Tensor& M) {
    if (M.dim() == 2) {
      check_scan_tensor(name, M, device, {s.dim, s.dstate}, "(dim, dstate)", at::kFloat);
    } else {
      check_scan_tensor(name, M, device, {s.batch, s.ngroups, s.dstate, s.seqlen}, "(batch, ngroups, dstate, seqlen)",
                        at::kFloat);
    }
  };
  check_projection("B", B);
  check_projection("C", C);
  if (D.has_value()) check_scan_tensor("D", *D, device, {s.dim}, "(dim,)", at::kFloat);
  if (z.has_value()) check_scan_tensor("z", *z, device, u.sizes(), "(batch, dim, seqlen)", dtype);
  if (delta_bias.has_value()) check_scan_tensor("delta_bias", *delta_bias, device, {s.dim}, "(dim,)", at::kFloat);

  p.batch = s.batch;
  p.dim = s.dim;
  p.seqlen = s.seqlen;
  p.dstate = s.dstate;
  p.ngroups = s.ngroups;
  p.checkpoint_every = checkpoint_every;
  p.input_kind = kind_of(dtype);
  p.delta_softplus = delta_softplus;

  p.u = u.const_data_ptr();
  p.u_batch_stride = u.stride(0);
  p.u_dim_stride = u.stride(1);
  p.u_seq_stride = u.stride(2);
  p.delta = delta.const_data_ptr();
  p.delta_batch_stride = delta.stride(0);
  p.delta_dim_stride = delta.stride(1);
  p.delta_seq_stride = delta.stride(2);
  p.A = A.const_data_ptr<float>();
  p.A_dim_stride = A.stride(0);
  p.A_dstate_stride = A.stride(1);
  p.B = B.const_data_ptr<float>();
  p.B_time_invariant = B.dim() == 2;
  if (p.B_time_invariant) {
    p.B_dim_stride = B.stride(0);
    p.B_dstate_stride = B.stride(1);
  } else {
    p.B_batch_stride = B.stride(0);
    p.B_group_stride = B.stride(1);
    p.B_dstate_stride = B.stride(2);
    p.B_seq_stride = B.stride(3);
  }
  p.C = C.const_data_ptr<float>();
  p.C_time_invariant = C.dim() == 2;
  if (p.C_time_invariant) {
    p.C_dim_stride = C.stride(0);
    p.C_dstate_stride = C.stride(1);
  } else {
    p.C_batch_stride = C.stride(0);
    p.C_group_stride = C.stride(1);
    p.C_dstate_stride = C.stride(2);
    p.C_seq_stride = C.stride(3);
  }
  if (D.has_value()) {
    p.D = D->const_data_ptr<float>();
    p.D_stride = D->stride(0);
  }
  if (z.has_value()) {
    p.z = z->const_data_ptr();
    p.z_batch_stride = z->stride(0);
    p.z_dim_stride = z->stride(1);
    p.z_seq_stride = z->stride(2);
  }
  if (delta_bias.has_value()) {
    p.delta_bias = delta_bias->const_data_ptr<float>();
    p.delta_bias_stride = delta_bias->stride(0);
  }
  return s;
}

void launch_scan(const at::Device& device, bool backward, const cu::SelectiveScanParams& p) {
  const c10::cuda::CUDAGuard device_guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  C10_CUDA_CHECK(backward ? cu::selective_scan_bwd(p, stream) : cu::selective_scan_fwd(p, stream));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd_cuda(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& delta_bias,
    const std::optional<at::Tensor>& initial_state, bool delta_softplus, int64_t checkpoint_every) {
  cu::SelectiveScanParams p;
  const ScanSizes s = fill_scan_inputs(p, u, delta, A, B, C, D, z, delta_bias, delta_softplus, checkpoint_every);
  if (initial_state.has_value()) {
    check_scan_tensor("initial_state", *initial_state, u.device(), {s.batch, s.dim, s.dstate},
                      "(batch, dim, dstate)", at::kFloat);
    p.initial_state = initial_state->const_data_ptr<float>();
    p.initial_state_batch_stride = initial_state->stride(0);
    p.initial_state_dim_stride = initial_state->stride(1);
    p.initial_state_dstate_stride = initial_state->stride(2);
  }
  // Allocated as the fake kernels in lnlm_ssm/ops/_library.py say.
  at::Tensor out = at::empty_like(u);
  at::Tensor last_state = at::empty({s.batch, s.dim, s.dstate}, A.options());
  const int64_t nchunks = checkpoint_every > 0 ? (s.seqlen + checkpoint_every - 1) / checkpoint_every : 0;
  at::Tensor checkpoints = at::empty({s.batch, s.dim, nchunks, s.dstate}, A.options());

  p.out = out.data_ptr();
  p.out_batch_stride = out.stride(0);
  p.out_dim_stride = out.stride(1);
  p.out_seq_stride = out.stride(2);
  p.last_state = last_state.data_ptr<float>();
  p.last_state_batch_stride = last_state.stride(0);
  p.last_state_dim_stride = last_state.stride(1);
  p.last_state_dstate_stride = last_state.stride(2);
  if (checkpoint_every > 0) {
    p.checkpoints = checkpoints.data_ptr<float>();
    p.checkpoints_batch_stride = checkpoints.stride(0);
    p.checkpoints_dim_stride = checkpoints.stride(1);
    p.checkpoints_chunk_stride = checkpoints.stride(2);
    p.checkpoints_dstate_stride = checkpoints.stride(3);
  }
  launch_scan(u.device(), false, p);
  return {out, last_state, checkpoints};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_bwd_cuda(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_last_state,
                        const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                        const std::optional<at::Tensor>& delta_bias, const at::Tensor& checkpoints,
                        bool delta_softplus, int64_t checkpoint_every) {
  cu::SelectiveScanParams p;
  const ScanSizes s = fill_scan_inputs(p, u, delta, A, B, C, D, z, delta_bias, delta_softplus, checkpoint_every);
  TORCH_CHECK(checkpoint_every > 0, kScanOp, "the backward needs checkpoint_every > 0, got ", checkpoint_every);
  const int64_t nchunks = (s.seqlen + checkpoint_every - 1) / checkpoint_every;
  check_scan_tensor("grad_out", grad_out, u.device(), u.sizes(), "(batch, dim, seqlen)", u.scalar_type());
  check_scan_tensor("checkpoints", checkpoints, u.device(), {s.batch, s.dim, nchunks, s.dstate},
                    "(batch, dim, ceil(seqlen / checkpoint_every), dstate)", at::kFloat);
  if (grad_last_state.has_value()) {
    check_scan_tensor("grad_last_state", *grad_last_state, u.device(), {s.batch, s.dim, s.dstate},
                      "(batch, dim, dstate)", at::kFloat);
    p.grad_last_state = grad_last_state->const_data_ptr<float>();
    p.grad_last_state_batch_stride = grad_last_state->stride(0);
    p.grad_last_state_dim_stride = grad_last_state->stride(1);
    p.grad_last_state_dstate_stride = grad_last_state->stride(2);
  }
  p.grad_out = grad_out.const_data_ptr();
  p.grad_out_batch_stride = grad_out.stride(0);
  p.grad_out_dim_stride = grad_out.stride(1);
  p.grad_out_seq_stride = grad_out.stride(2);
  p.checkpoints = const_cast<float*>(checkpoints.const_data_ptr<float>());  // read only by the backward
  p.checkpoints_batch_stride = checkpoints.stride(0);
  p.checkpoints_dim_stride = checkpoints.stride(1);
  p.checkpoints_chunk_stride = checkpoints.stride(2);
  p.checkpoints_dstate_stride = checkpoints.stride(3);

  // Allocated as the fake kernels in lnlm_ssm/ops/_library.py say; the kernel
  // adds into dA, dB, dC, dD and ddelta_bias atomically, so those start at zero.
  at::Tensor du = at::empty_like(u);
  at::Tensor ddelta = at::empty_like(delta);
  at::Tensor dA = at::zeros_like(A);
  at::Tensor dB = at::zeros_like(B);
  at::Tensor dC = at::zeros_like(C);
  at::Tensor dD = at::zeros({D.has_value() ? s.dim : 0}, A.options());
  at::Tensor dz = z.has_value() ? at::empty_like(*z) : at::empty({0}, u.options());
  at::Tensor ddelta_bias = at::zeros({delta_bias.has_value() ? s.dim : 0}, A.options());
  at::Tensor dinitial_state = at::empty({s.batch, s.dim, s.dstate}, A.options());

  p.du = du.data_ptr();
  p.du_batch_stride = du.stride(0);
  p.du_dim_stride = du.stride(1);
  p.du_seq_stride = du.stride(2);
  p.ddelta = ddelta.data_ptr();
  p.ddelta_batch_stride = ddelta.stride(0);
  p.ddelta_dim_stride = ddelta.stride(1);
  p.ddelta_seq_stride = ddelta.stride(2);
  p.dA = dA.data_ptr<float>();
  p.dA_dim_stride = dA.stride(0);
  p.dA_dstate_stride = dA.stride(1);
  p.dB = dB.data_ptr<float>();
  if (p.B_time_invariant) {
    p.dB_dim_stride = dB.stride(0);
    p.dB_dstate_stride = dB.stride(1);
  } else {
    p.dB_batch_stride = dB.stride(0);
    p.dB_group_stride = dB.stride(1);
    p.dB_dstate_stride = dB.stride(2);
    p.dB_seq_stride = dB.stride(3);
  }
  p.dC = dC.data_ptr<float>();
  if (p.C_time_invariant) {
    p.dC_dim_stride = dC.stride(0);
    p.dC_dstate_stride = dC.stride(1);
  } else {
    p.dC_batch_stride = dC.stride(0);
    p.dC_group_stride = dC.stride(1);
    p.dC_dstate_stride = dC.stride(2);
    p.dC_seq_stride = dC.stride(3);
  }
  if (D.has_value()) {
    p.dD = dD.data_ptr<float>();
    p.dD_stride = dD.stride(0);
  }
  if (z.has_value()) {
    p.dz = dz.data_ptr();
    p.dz_batch_stride = dz.stride(0);
    p.dz_dim_stride = dz.stride(1);
    p.dz_seq_stride = dz.stride(2);
  }
  if (delta_bias.has_value()) {
    p.ddelta_bias = ddelta_bias.data_ptr<float>();
    p.ddelta_bias_stride = ddelta_bias.stride(0);
  }
  p.dinitial_state = dinitial_state.data_ptr<float>();
  p.dinitial_state_batch_stride = dinitial_state.stride(0);
  p.dinitial_state_dim_stride = dinitial_state.stride(1);
  p.dinitial_state_dstate_stride = dinitial_state.stride(2);
  launch_scan(u.device(), true, p);
  return {du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state};
}

}  // namespace

TORCH_LIBRARY_IMPL(lnlm_ssm, CUDA, m) {
  m.impl("selective_state_update", &selective_state_update_cuda);
  m.impl("selective_scan_fwd", &selective_scan_fwd_cuda);
  m.impl("selective_scan_bwd", &selective_scan_bwd_cuda);
}

// A plain extension module: importing it runs the registrations above.
static PyModuleDef lnlm_ssm_cuda_module = {
    PyModuleDef_HEAD_INIT,
    "lnlm_ssm._cuda",
    "CUDA kernels of lnlm_ssm, registered with torch.ops.lnlm_ssm on import (import lnlm_ssm._C first).",
    -1,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

PyMODINIT_FUNC PyInit__cuda(void) { return PyModule_Create(&lnlm_ssm_cuda_module); }
