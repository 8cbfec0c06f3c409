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

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

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
                                       const std::optional<at::Tensor>& dt_bias, bool dt_softplus) {
  // Devices.
  TORCH_CHECK(state.is_cuda(), kOp, "state must be a CUDA tensor, got one on ", state.device());
  const at::Device device = state.device();
  check_on_device("x", x, device);
  check_on_device("dt", dt, device);
  check_on_device("A", A, device);
  check_on_device("B", B, device);
  check_on_device("C", C, device);
  if (D.has_value()) check_on_device("D", *D, device);
  if (z.has_value()) check_on_device("z", *z, device);
  if (dt_bias.has_value()) check_on_device("dt_bias", *dt_bias, device);

  // Shapes (the canonical layout of lnlm_ssm/ops/state_update/shapes.py).
  TORCH_CHECK(state.dim() == 4, kOp, "state must have 4 dimensions (batch, nheads, headdim, dstate), got shape ",
              state.sizes());
  const int64_t batch = state.size(0), nheads = state.size(1), headdim = state.size(2), dstate = state.size(3);
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

}  // namespace

TORCH_LIBRARY_IMPL(lnlm_ssm, CUDA, m) {
  m.impl("selective_state_update", &selective_state_update_cuda);
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
