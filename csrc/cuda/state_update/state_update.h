// Launch API of the CUDA decode step (selective_state_update). No torch headers:
// the caller passes raw pointers, sizes and element strides.
//
// Canonical layout (see lnlm_ssm/ops/state_update/shapes.py):
//   state (batch, nheads, headdim, dstate)  float32 or the input type, updated in place
//   x, dt, z, out (batch, nheads, headdim)  input type (out is written)
//   A (nheads, headdim, dstate)             float32
//   B, C (batch, ngroups, dstate)           input type
//   D, dt_bias (nheads, headdim)            float32, optional (nullptr)
// Any stride is allowed, including 0 (broadcast), except that state and out must
// not overlap themselves. Every offset is computed in 64 bits.
//
// With state_batch_indices (batch,) (int32 or int64), state is a pool of `pool`
// slots (pool, nheads, headdim, dstate): batch row b steps the slot
// state_batch_indices[b]. A negative index is a padding row: out is 0 and the
// state is not touched. An index at or past `pool` is treated the same way, so
// that no index can address memory outside the state; callers refuse such
// indices (and repeated slots, which would race) before launching, as the
// values live on the device and reading them here would need a sync.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace lnlm_ssm {
namespace cuda {

enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The largest dstate the kernel handles.
constexpr int64_t kStateUpdateMaxDstate = 256;

struct StateUpdateParams {
  int64_t batch = 0;
  int64_t nheads = 0;
  int64_t headdim = 0;
  int64_t dstate = 0;
  int64_t ngroups = 1;  // nheads % ngroups == 0; head h reads group h / (nheads / ngroups)
  int64_t pool = 0;     // state's first dimension: batch without state_batch_indices

  ScalarKind input_kind = ScalarKind::kFloat32;  // x, dt, z, B, C and out
  ScalarKind state_kind = ScalarKind::kFloat32;  // float32 or input_kind
  bool dt_softplus = false;

  void* state = nullptr;
  const void* x = nullptr;
  const void* dt = nullptr;
  const float* A = nullptr;
  const void* B = nullptr;
  const void* C = nullptr;
  const float* D = nullptr;        // optional
  const void* z = nullptr;         // optional
  const float* dt_bias = nullptr;  // optional
  const void* state_batch_indices = nullptr;  // optional
  bool state_batch_indices_int64 = false;     // int64_t elements, else int32_t
  void* out = nullptr;

  // Strides in elements.
  int64_t state_batch_stride = 0, state_head_stride = 0, state_dim_stride = 0, state_dstate_stride = 0;
  int64_t x_batch_stride = 0, x_head_stride = 0, x_dim_stride = 0;
  int64_t dt_batch_stride = 0, dt_head_stride = 0, dt_dim_stride = 0;
  int64_t A_head_stride = 0, A_dim_stride = 0, A_dstate_stride = 0;
  int64_t B_batch_stride = 0, B_group_stride = 0, B_dstate_stride = 0;
  int64_t C_batch_stride = 0, C_group_stride = 0, C_dstate_stride = 0;
  int64_t D_head_stride = 0, D_dim_stride = 0;
  int64_t z_batch_stride = 0, z_head_stride = 0, z_dim_stride = 0;
  int64_t dt_bias_head_stride = 0, dt_bias_dim_stride = 0;
  int64_t out_batch_stride = 0, out_head_stride = 0, out_dim_stride = 0;
  int64_t state_batch_indices_stride = 0;
};

// One launcher per input type, each in its own translation unit
// (state_update_fp32.cu, state_update_fp16.cu, state_update_bf16.cu).
// They return cudaErrorInvalidValue for parameters they cannot serve
// (dstate outside [0, 256], a state type other than float32 or the input
// type, nheads not divisible by ngroups, pool != batch without
// state_batch_indices) and otherwise the launch status.
cudaError_t selective_state_update_fp32(const StateUpdateParams& params, cudaStream_t stream);
cudaError_t selective_state_update_fp16(const StateUpdateParams& params, cudaStream_t stream);
cudaError_t selective_state_update_bf16(const StateUpdateParams& params, cudaStream_t stream);

// Picks the launcher from params.input_kind.
inline cudaError_t selective_state_update(const StateUpdateParams& params, cudaStream_t stream) {
  switch (params.input_kind) {
    case ScalarKind::kFloat32:
      return selective_state_update_fp32(params, stream);
    case ScalarKind::kFloat16:
      return selective_state_update_fp16(params, stream);
    case ScalarKind::kBFloat16:
      return selective_state_update_bf16(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lnlm_ssm
