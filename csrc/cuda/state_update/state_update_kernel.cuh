// The decode-step kernel, templated on the input type T and the state type S.
// Included by state_update_{fp32,fp16,bf16}.cu, one input type each, so the
// three compile in parallel. No torch headers.
//
// Work split: a row is one (batch, head, headdim) triple. kLanes consecutive
// threads of a warp own a row; lane l holds dstate entries l, l + kLanes, ...
// (kPerLane of them), so a warp's loads along dstate are coalesced when dstate
// is the fastest-moving dimension. y is reduced over the row's lanes with
// warp shuffles. All index arithmetic is 64-bit. A padding row (see
// state_update.h) still takes part in the shuffles, with nothing to add.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "state_update.h"

namespace lnlm_ssm {
namespace cuda {
namespace state_update_detail {

constexpr int kBlockThreads = 128;
// Grid-stride loop beyond this many blocks.
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

template <typename T>
struct Scalar;

template <>
struct Scalar<float> {
  static constexpr ScalarKind kind = ScalarKind::kFloat32;
  static __device__ __forceinline__ float load(const float* p) { return *p; }
  static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
};

template <>
struct Scalar<__half> {
  static constexpr ScalarKind kind = ScalarKind::kFloat16;
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
};

template <>
struct Scalar<__nv_bfloat16> {
  static constexpr ScalarKind kind = ScalarKind::kBFloat16;
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

// softplus with PyTorch's default threshold: x for x > 20, else log(1 + exp(x)).
__device__ __forceinline__ float softplus(float v) { return v > 20.f ? v : log1pf(expf(v)); }

__device__ __forceinline__ float silu(float v) { return v / (1.f + expf(-v)); }

template <typename T, typename S, int kLanes, int kPerLane>
__global__ void __launch_bounds__(kBlockThreads) state_update_kernel(const StateUpdateParams p) {
  static_assert(kLanes >= 1 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0, "kLanes: a power of two <= 32");
  static_assert(kBlockThreads % kLanes == 0, "a block holds whole rows");
  constexpr int kRowsPerBlock = kBlockThreads / kLanes;

  const int lane = static_cast<int>(threadIdx.x) % kLanes;
  const int row_in_block = static_cast<int>(threadIdx.x) / kLanes;
  const int64_t rows = p.batch * p.nheads * p.headdim;
  const int64_t heads_per_group = p.nheads / p.ngroups;

  S* const state_base = static_cast<S*>(p.state);
  const T* __restrict__ const x_base = static_cast<const T*>(p.x);
  const T* __restrict__ const dt_base = static_cast<const T*>(p.dt);
  const float* __restrict__ const A_base = p.A;
  const T* __restrict__ const B_base = static_cast<const T*>(p.B);
  const T* __restrict__ const C_base = static_cast<const T*>(p.C);
  const float* __restrict__ const D_base = p.D;
  const T* __restrict__ const z_base = static_cast<const T*>(p.z);
  const float* __restrict__ const dt_bias_base = p.dt_bias;
  T* const out_base = static_cast<T*>(p.out);

  // The loop bound is the same for the whole block, so every lane reaches the
  // shuffles below; rows past the end just contribute nothing.
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; first < rows;
       first += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = first + row_in_block;
    const bool active = row < rows;
    float y_partial = 0.f;
    float x_val = 0.f;
    int64_t b = 0, h = 0, d = 0, slot = 0;
    bool live = false;  // the row has a slot of the state to step
    if (active) {
      d = row % p.headdim;
      const int64_t bh = row / p.headdim;
      h = bh % p.nheads;
      b = bh / p.nheads;
      slot = b;
      if (p.state_batch_indices != nullptr) {
        const int64_t i = b * p.state_batch_indices_stride;
        slot = p.state_batch_indices_int64 ? static_cast<const int64_t*>(p.state_batch_indices)[i]
                                           : static_cast<const int32_t*>(p.state_batch_indices)[i];
      }
      live = slot >= 0 && slot < p.pool;
    }
    if (live) {
      const int64_t g = h / heads_per_group;

      x_val = Scalar<T>::load(x_base + b * p.x_batch_stride + h * p.x_head_stride + d * p.x_dim_stride);
      float dt_val = Scalar<T>::load(dt_base + b * p.dt_batch_stride + h * p.dt_head_stride + d * p.dt_dim_stride);
      if (dt_bias_base != nullptr) {
        dt_val += dt_bias_base[h * p.dt_bias_head_stride + d * p.dt_bias_dim_stride];
      }
      if (p.dt_softplus) {
        dt_val = softplus(dt_val);
      }
      const float dt_x = dt_val * x_val;

      S* const state_row = state_base + slot * p.state_batch_stride + h * p.state_head_stride + d * p.state_dim_stride;
      const float* const A_row = A_base + h * p.A_head_stride + d * p.A_dim_stride;
      const T* const B_row = B_base + b * p.B_batch_stride + g * p.B_group_stride;
      const T* const C_row = C_base + b * p.C_batch_stride + g * p.C_group_stride;

      // Load everything first so that the loads are in flight together.
      float s_in[kPerLane];
      float a_in[kPerLane];
      float b_in[kPerLane];
      float c_in[kPerLane];
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const int64_t n = lane + k * kLanes;
        s_in[k] = a_in[k] = b_in[k] = c_in[k] = 0.f;
        if (n < p.dstate) {
          s_in[k] = Scalar<S>::load(state_row + n * p.state_dstate_stride);
          a_in[k] = A_row[n * p.A_dstate_stride];
          b_in[k] = Scalar<T>::load(B_row + n * p.B_dstate_stride);
          c_in[k] = Scalar<T>::load(C_row + n * p.C_dstate_stride);
        }
      }
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const int64_t n = lane + k * kLanes;
        if (n < p.dstate) {
          const float s_new = expf(dt_val * a_in[k]) * s_in[k] + dt_x * b_in[k];
          Scalar<S>::store(state_row + n * p.state_dstate_stride, s_new);
          y_partial += s_new * c_in[k];
        }
      }
    }
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset /= 2) {
      y_partial += __shfl_xor_sync(0xffffffffu, y_partial, offset, kLanes);
    }
    if (active && lane == 0) {
      float y = 0.f;  // a padding row's output
      if (live) {
        y = y_partial;
        if (D_base != nullptr) {
          y += x_val * D_base[h * p.D_head_stride + d * p.D_dim_stride];
        }
        if (z_base != nullptr) {
          y *= silu(Scalar<T>::load(z_base + b * p.z_batch_stride + h * p.z_head_stride + d * p.z_dim_stride));
        }
      }
      Scalar<T>::store(out_base + b * p.out_batch_stride + h * p.out_head_stride + d * p.out_dim_stride, y);
    }
  }
}

template <typename T, typename S, int kLanes, int kPerLane>
cudaError_t launch_config(const StateUpdateParams& p, cudaStream_t stream) {
  constexpr int64_t kRowsPerBlock = kBlockThreads / kLanes;
  const int64_t rows = p.batch * p.nheads * p.headdim;
  int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  if (blocks > kMaxBlocks) {
    blocks = kMaxBlocks;
  }
  state_update_kernel<T, S, kLanes, kPerLane>
      <<<static_cast<unsigned int>(blocks), kBlockThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename S>
cudaError_t dispatch_dstate(const StateUpdateParams& p, cudaStream_t stream) {
  if (p.dstate <= 4) return launch_config<T, S, 4, 1>(p, stream);
  if (p.dstate <= 8) return launch_config<T, S, 8, 1>(p, stream);
  if (p.dstate <= 16) return launch_config<T, S, 16, 1>(p, stream);
  if (p.dstate <= 32) return launch_config<T, S, 32, 1>(p, stream);
  if (p.dstate <= 64) return launch_config<T, S, 32, 2>(p, stream);
  if (p.dstate <= 128) return launch_config<T, S, 32, 4>(p, stream);
  return launch_config<T, S, 32, 8>(p, stream);
}

template <typename T>
cudaError_t launch_selective_state_update(const StateUpdateParams& p, cudaStream_t stream) {
  if (p.input_kind != Scalar<T>::kind || p.dstate < 0 || p.dstate > kStateUpdateMaxDstate || p.batch < 0 ||
      p.nheads < 0 || p.headdim < 0 || p.ngroups < 1 || p.nheads % p.ngroups != 0 || p.pool < 0 ||
      (p.state_batch_indices == nullptr && p.pool != p.batch)) {
    return cudaErrorInvalidValue;
  }
  if (p.batch == 0 || p.nheads == 0 || p.headdim == 0) {
    return cudaSuccess;  // nothing to do; a launch with an empty grid would fail
  }
  if (p.state == nullptr || p.x == nullptr || p.dt == nullptr || p.A == nullptr || p.B == nullptr ||
      p.C == nullptr || p.out == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (p.state_kind == ScalarKind::kFloat32) {
    return dispatch_dstate<T, float>(p, stream);
  }
  if (p.state_kind == Scalar<T>::kind) {
    return dispatch_dstate<T, T>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace state_update_detail
}  // namespace cuda
}  // namespace lnlm_ssm
