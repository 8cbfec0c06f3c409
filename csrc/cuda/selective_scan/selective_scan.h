// Launch API of the CUDA Mamba-1 selective scan, forward and backward. No torch
// headers: the caller passes raw pointers, sizes and element strides.
//
// Layout (b batch, d dim, l seqlen, n dstate, g ngroups; channel d reads group
// d / (dim / ngroups)), math as in lnlm_ssm/ops/selective_scan/reference.py:
//   u, delta, z, out                  (b, d, l)     input type T (float, __half or __nv_bfloat16)
//   A                                 (d, n)        float32
//   B, C                              (b, g, n, l)  float32, time-varying; or (d, n) float32,
//                                     time-invariant (B_time_invariant, C_time_invariant),
//                                     each independently. g counts the groups of the
//                                     time-varying ones (1 when both are time-invariant).
//   D, delta_bias                     (d,)          float32, optional (nullptr)
//   initial_state, last_state         (b, d, n)     float32 (initial_state optional)
//   checkpoints                       (b, d, ceil(l / K), n) float32: the state entering
//                                     every K = checkpoint_every steps (K = 0: none)
// Backward, in addition:
//   grad_out, du, ddelta, dz          (b, d, l)     T
//   grad_last_state                   (b, d, n)     float32, optional
//   dA, dB, dC, dD, ddelta_bias       like A, B, C, D, delta_bias (a time-invariant B or C:
//                                     (d, n), summed over batch and steps), float32, ZEROED
//                                     by the caller: the kernel adds into them atomically
//   dinitial_state                    (b, d, n)     float32, written
// Any strides are allowed (fastest along l is the fast path for the (b, d, l) and
// (b, g, n, l) tensors). Every offset is computed in 64 bits.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "state_update/state_update.h"  // ScalarKind

namespace lnlm_ssm {
namespace cuda {

// The largest dstate the kernels handle.
constexpr int64_t kSelectiveScanMaxDstate = 256;
// checkpoint_every must be a multiple of this (every kernel configuration's time tile divides it).
constexpr int64_t kSelectiveScanCheckpointQuantum = 64;
// ... and at most this many steps (the backward keeps one state per time tile of a chunk in shared memory).
constexpr int64_t kSelectiveScanMaxCheckpointEvery = 256;

struct SelectiveScanParams {
  int64_t batch = 0;
  int64_t dim = 0;
  int64_t seqlen = 0;
  int64_t dstate = 0;
  int64_t ngroups = 1;  // dim % ngroups == 0
  int64_t checkpoint_every = 0;

  ScalarKind input_kind = ScalarKind::kFloat32;  // u, delta, z, out and their gradients
  bool delta_softplus = false;
  bool B_time_invariant = false;  // B is (d, n): read with B_dim_stride and B_dstate_stride
  bool C_time_invariant = false;

  const void* u = nullptr;
  const void* delta = nullptr;
  const float* A = nullptr;
  const float* B = nullptr;
  const float* C = nullptr;
  const float* D = nullptr;              // optional
  const void* z = nullptr;               // optional
  const float* delta_bias = nullptr;     // optional
  const float* initial_state = nullptr;  // optional
  void* out = nullptr;
  float* last_state = nullptr;
  float* checkpoints = nullptr;  // written by the forward when checkpoint_every > 0, read by the backward

  // Backward only.
  const void* grad_out = nullptr;
  const float* grad_last_state = nullptr;  // optional
  void* du = nullptr;
  void* ddelta = nullptr;
  void* dz = nullptr;  // when z is given
  float* dA = nullptr;
  float* dB = nullptr;
  float* dC = nullptr;
  float* dD = nullptr;           // when D is given
  float* ddelta_bias = nullptr;  // when delta_bias is given
  float* dinitial_state = nullptr;

  // Strides in elements. The gradients of a tensor share its strides' names with
  // the prefix d (du uses du_*, ...), except where noted.
  int64_t u_batch_stride = 0, u_dim_stride = 0, u_seq_stride = 0;
  int64_t delta_batch_stride = 0, delta_dim_stride = 0, delta_seq_stride = 0;
  int64_t z_batch_stride = 0, z_dim_stride = 0, z_seq_stride = 0;
  int64_t out_batch_stride = 0, out_dim_stride = 0, out_seq_stride = 0;
  int64_t A_dim_stride = 0, A_dstate_stride = 0;
  int64_t B_batch_stride = 0, B_group_stride = 0, B_dim_stride = 0, B_dstate_stride = 0, B_seq_stride = 0;
  int64_t C_batch_stride = 0, C_group_stride = 0, C_dim_stride = 0, C_dstate_stride = 0, C_seq_stride = 0;
  int64_t D_stride = 0, delta_bias_stride = 0;
  int64_t initial_state_batch_stride = 0, initial_state_dim_stride = 0, initial_state_dstate_stride = 0;
  int64_t last_state_batch_stride = 0, last_state_dim_stride = 0, last_state_dstate_stride = 0;
  int64_t checkpoints_batch_stride = 0, checkpoints_dim_stride = 0, checkpoints_chunk_stride = 0,
          checkpoints_dstate_stride = 0;

  int64_t grad_out_batch_stride = 0, grad_out_dim_stride = 0, grad_out_seq_stride = 0;
  int64_t grad_last_state_batch_stride = 0, grad_last_state_dim_stride = 0, grad_last_state_dstate_stride = 0;
  int64_t du_batch_stride = 0, du_dim_stride = 0, du_seq_stride = 0;
  int64_t ddelta_batch_stride = 0, ddelta_dim_stride = 0, ddelta_seq_stride = 0;
  int64_t dz_batch_stride = 0, dz_dim_stride = 0, dz_seq_stride = 0;
  int64_t dA_dim_stride = 0, dA_dstate_stride = 0;
  int64_t dB_batch_stride = 0, dB_group_stride = 0, dB_dim_stride = 0, dB_dstate_stride = 0, dB_seq_stride = 0;
  int64_t dC_batch_stride = 0, dC_group_stride = 0, dC_dim_stride = 0, dC_dstate_stride = 0, dC_seq_stride = 0;
  int64_t dD_stride = 0, ddelta_bias_stride = 0;
  int64_t dinitial_state_batch_stride = 0, dinitial_state_dim_stride = 0, dinitial_state_dstate_stride = 0;
};

// One pair of launchers per input type, each in its own translation unit
// (selective_scan_fp32.cu, selective_scan_fp16.cu, selective_scan_bf16.cu). They
// return cudaErrorInvalidValue for parameters they cannot serve (dstate outside
// [1, 256], dim not divisible by ngroups, checkpoint_every not a multiple of 64
// in [0, 256], a missing required pointer; the backward also needs
// checkpoint_every > 0 and the checkpoints of the forward) and otherwise the
// launch status.
cudaError_t selective_scan_fwd_fp32(const SelectiveScanParams& params, cudaStream_t stream);
cudaError_t selective_scan_fwd_fp16(const SelectiveScanParams& params, cudaStream_t stream);
cudaError_t selective_scan_fwd_bf16(const SelectiveScanParams& params, cudaStream_t stream);
cudaError_t selective_scan_bwd_fp32(const SelectiveScanParams& params, cudaStream_t stream);
cudaError_t selective_scan_bwd_fp16(const SelectiveScanParams& params, cudaStream_t stream);
cudaError_t selective_scan_bwd_bf16(const SelectiveScanParams& params, cudaStream_t stream);

// Pick the launcher from params.input_kind.
inline cudaError_t selective_scan_fwd(const SelectiveScanParams& params, cudaStream_t stream) {
  switch (params.input_kind) {
    case ScalarKind::kFloat32:
      return selective_scan_fwd_fp32(params, stream);
    case ScalarKind::kFloat16:
      return selective_scan_fwd_fp16(params, stream);
    case ScalarKind::kBFloat16:
      return selective_scan_fwd_bf16(params, stream);
  }
  return cudaErrorInvalidValue;
}

inline cudaError_t selective_scan_bwd(const SelectiveScanParams& params, cudaStream_t stream) {
  switch (params.input_kind) {
    case ScalarKind::kFloat32:
      return selective_scan_bwd_fp32(params, stream);
    case ScalarKind::kFloat16:
      return selective_scan_bwd_fp16(params, stream);
    case ScalarKind::kBFloat16:
      return selective_scan_bwd_bf16(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lnlm_ssm
