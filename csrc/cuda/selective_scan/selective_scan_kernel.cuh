// The Mamba-1 selective scan kernels, forward and backward, templated on the
// input type T. Included by selective_scan_{fp32,fp16,bf16}.cu, one type each,
// so the three compile in parallel. No torch headers. Layout: selective_scan.h.
//
// Work split: a sequential walk over time per thread, many channels per block.
//   A block owns kChannels consecutive channels of one (batch, group) and walks
//   the whole sequence in time tiles of kTile steps. kSplit adjacent lanes share a
//   channel, each holding kNPer of its dstate states in registers (lane s holds
//   n = s*kNPer .. s*kNPer + kNPer - 1), so a channel's y_t = sum_n C h is one
//   register sum plus log2(kSplit) xor-shuffles. Per time tile the block stages
//   u, delta (kChannels x kTile) and B, C (kTile x dstate) in shared memory with
//   loads whose consecutive lanes read consecutive time steps (coalesced when the
//   sequence dimension is the fastest), walks the tile, and writes the outputs
//   back the same way.
// Why a sequential walk and not a parallel scan over time: the walk does the
//   least arithmetic per (step, state): one exp2 and two FMAs, which on an H100
//   is what bounds the scan (b8 d2048 n16 l4096 is 1e9 exps, ~0.27 ms on the
//   special-function units against ~0.18 ms to move its bf16 bytes), while a
//   parallel scan adds a combine of (decay, drive) pairs per level. Splitting
//   dstate over kSplit lanes gives the parallelism a scan over time would have
//   given: b8 d2048 n16 runs 64K threads (512 blocks of 128).
//
// Desk check against lnlm_ssm/ops/selective_scan/reference.py, per channel:
//   step 1   delta_t <- softplus(delta_t + delta_bias)   load_seq_tiles (while staging)
//   step 2   h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t,
//            y_t = C_t . h_t                             walk_tile, exp(x A) as
//                                                        exp2(x (A log2 e)) with A
//                                                        prescaled once per thread
//   step 3   y_t += D u_t                                walk_tile (lane s == 0)
//            out_t = y_t silu(z_t)                       forward epilogue
// Backward (reverse-mode of the same steps; dh_t is the gradient of h_t,
// carried backwards in `lam` = exp(delta_{t+1} A) dh_{t+1}, starting from
// grad_last_state):
//   step 3   gy_t = dout_t silu(z_t);  dz_t = dout_t y_t silu'(z_t);
//            dD += gy_t u_t;  du_t += gy_t D
//   step 2   dh_t = gy_t C_t + lam;   dC_t += gy_t h_t;   dB_t += dh_t delta_t u_t
//            d(delta_t) = sum_n dh_t (A exp(delta_t A) h_{t-1} + B_t u_t)
//            du_t += delta_t sum_n dh_t B_t;  dA += dh_t delta_t exp(delta_t A) h_{t-1}
//            lam <- exp(delta_t A) dh_t   (after t = 0: dinitial_state)
//   step 1   ddelta_t = d(delta_t) softplus'(x) = d(delta_t) (1 - exp(-delta_t));
//            ddelta_bias += ddelta_t
// dB, dC sum over the channels of a group and dA, dD, ddelta_bias over the
// batch: each block sums its own channels in shared memory and adds the result
// to the (zeroed) global tensors with atomics.
// A time-invariant B or C ((d, n), one row per channel) is not staged: each lane
// reads its channel's row from global memory where it is used; its gradient sums
// each channel's steps of a tile in shared memory and adds them to the row.
//
// Chunking: the forward saves the state entering every K = checkpoint_every
// steps. The backward walks the chunks in reverse; for each it first walks the
// chunk forward from its checkpoint to find the state entering each time tile
// (kept in thread-local memory), then takes the tiles in reverse: recompute the
// tile's states into registers, then walk it backwards. It never holds more
// than one tile's states.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "selective_scan/selective_scan.h"

namespace lnlm_ssm {
namespace cuda {
namespace selective_scan_detail {

constexpr int kThreads = 128;
constexpr unsigned int kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
struct Io;

template <>
struct Io<float> {
  static constexpr ScalarKind kind = ScalarKind::kFloat32;
  static __device__ __forceinline__ float load(const float* p) { return *p; }
  static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
};

template <>
struct Io<__half> {
  static constexpr ScalarKind kind = ScalarKind::kFloat16;
  static __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
  static __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
};

template <>
struct Io<__nv_bfloat16> {
  static constexpr ScalarKind kind = ScalarKind::kBFloat16;
  static __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
};

// PyTorch's softplus (threshold 20).
__device__ __forceinline__ float softplus(float v) { return v > 20.f ? v : log1pf(expf(v)); }

__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + expf(-v)); }

// kSplit lanes per channel, kNPer states per lane; time tiles of kTileFwd
// (forward) and kTileBwd (backward) steps, each dividing kSelectiveScanCheckpointQuantum.
template <int kSplit_, int kNPer_, int kTileFwd_, int kTileBwd_>
struct Config {
  static constexpr int kSplit = kSplit_;
  static constexpr int kNPer = kNPer_;
  static constexpr int kTileFwd = kTileFwd_;
  static constexpr int kTileBwd = kTileBwd_;
  static constexpr int kChannels = kThreads / kSplit;
  static constexpr int kNPad = kSplit * kNPer;  // dstate padded; padded states keep A = B = C = 0
  static_assert(kSplit >= 1 && kSplit <= 32 && (kSplit & (kSplit - 1)) == 0, "kSplit: a power of two <= 32");
  static_assert(kNPer % 4 == 0, "B and C are read from shared memory as float4");
  static_assert(kSelectiveScanCheckpointQuantum % kTileFwd == 0, "forward tiles must divide the checkpoints");
  static_assert(kSelectiveScanCheckpointQuantum % kTileBwd == 0, "backward tiles must divide the checkpoints");
};

// The block's place: batch b, group g, its first channel d0 and how many of
// its kChannels channels exist (the last block of a group may be partial).
struct BlockPlace {
  int64_t b, g, d0;
  int nchannels;
};

template <int kChannels>
__device__ __forceinline__ BlockPlace block_place(const SelectiveScanParams& p) {
  const int64_t per_group = p.dim / p.ngroups;
  const int64_t cblocks = (per_group + kChannels - 1) / kChannels;
  const int64_t bid = blockIdx.x;
  const int64_t cb = bid % cblocks;
  const int64_t bg = bid / cblocks;
  BlockPlace place;
  place.g = bg % p.ngroups;
  place.b = bg / p.ngroups;
  place.d0 = place.g * per_group + cb * kChannels;
  const int64_t left = per_group - cb * kChannels;
  place.nchannels = static_cast<int>(left < kChannels ? left : kChannels);
  return place;
}

// Stages u and delta (softplus'd, step 1) of steps [t0, t0 + valid) as
// [channel][kRow] floats, zero outside the block's channels and the sequence.
template <typename T, int kChannels, int kTile>
__device__ __forceinline__ void load_seq_tiles(const SelectiveScanParams& p, const BlockPlace& place, int64_t t0,
                                               int valid, float* u_s, float* dt_s) {
  constexpr int kRow = kTile + 1;  // odd row length: lanes of different channels hit different banks
  const T* const u = static_cast<const T*>(p.u);
  const T* const delta = static_cast<const T*>(p.delta);
  for (int i = threadIdx.x; i < kChannels * kTile; i += kThreads) {
    const int c = i / kTile;
    const int t = i % kTile;
    float uv = 0.f, dv = 0.f;
    if (c < place.nchannels && t < valid) {
      const int64_t d = place.d0 + c;
      const int64_t l = t0 + t;
      uv = Io<T>::load(u + place.b * p.u_batch_stride + d * p.u_dim_stride + l * p.u_seq_stride);
      dv = Io<T>::load(delta + place.b * p.delta_batch_stride + d * p.delta_dim_stride + l * p.delta_seq_stride);
      if (p.delta_bias != nullptr) {
        dv += p.delta_bias[d * p.delta_bias_stride];
      }
      if (p.delta_softplus) {
        dv = softplus(dv);
      }
    }
    u_s[c * kRow + t] = uv;
    dt_s[c * kRow + t] = dv;
  }
}

// Stages one of B, C for steps [t0, t0 + valid) as [step][kNPad] floats, zero
// for padded states and steps past the sequence.
template <int kNPad, int kTile>
__device__ __forceinline__ void load_bc_tile(const SelectiveScanParams& p, const BlockPlace& place, int64_t t0,
                                             int valid, const float* src, int64_t batch_stride, int64_t group_stride,
                                             int64_t dstate_stride, int64_t seq_stride, float* dst_s) {
  const float* const base = src + place.b * batch_stride + place.g * group_stride;
  for (int i = threadIdx.x; i < kNPad * kTile; i += kThreads) {
    const int n = i / kTile;
    const int t = i % kTile;
    float v = 0.f;
    if (n < p.dstate && t < valid) {
      v = base[n * dstate_stride + (t0 + t) * seq_stride];
    }
    dst_s[t * kNPad + n] = v;
  }
}

template <int kNPer>
__device__ __forceinline__ void load_row(const float* src_s, float (&v)[kNPer]) {
#pragma unroll
  for (int j = 0; j < kNPer / 4; ++j) {
    const float4 q = reinterpret_cast<const float4*>(src_s)[j];
    v[4 * j] = q.x;
    v[4 * j + 1] = q.y;
    v[4 * j + 2] = q.z;
    v[4 * j + 3] = q.w;
  }
}

template <int kNPer>
__device__ __forceinline__ void store_row(float* dst_s, const float (&v)[kNPer]) {
#pragma unroll
  for (int j = 0; j < kNPer / 4; ++j) {
    reinterpret_cast<float4*>(dst_s)[j] = make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
  }
}

// Where a lane reads the kNPer values of B or C for its states at a step: the
// staged tile of a time-varying one, or the channel's row of a time-invariant
// one, read from global memory at each use (through the read-only cache) rather
// than held in registers, which the time-varying case would then pay for too.
template <int kNPer>
struct ProjectionSource {
  bool varying;
  const float* fixed;  // the lane's first state of a time-invariant one; nullptr for a lane without a channel
  int64_t stride;      // between states of that row
  int nvalid;          // how many of the lane's states exist

  __device__ __forceinline__ void row(const float* tile_row_s, float (&v)[kNPer]) const {
    if (varying) {
      load_row<kNPer>(tile_row_s, v);
      return;
    }
#pragma unroll
    for (int k = 0; k < kNPer; ++k) {
      v[k] = fixed != nullptr && k < nvalid ? __ldg(fixed + k * stride) : 0.f;
    }
  }
};

template <int kNPer>
__device__ __forceinline__ ProjectionSource<kNPer> projection_source(bool time_invariant, const float* M,
                                                                     int64_t dim_stride, int64_t dstate_stride,
                                                                     bool active, int64_t d, int n0, int nvalid) {
  ProjectionSource<kNPer> src;
  src.varying = !time_invariant;
  src.fixed = time_invariant && active ? M + d * dim_stride + n0 * dstate_stride : nullptr;
  src.stride = dstate_stride;
  src.nvalid = nvalid;
  return src;
}

// Sum over the kSplit lanes of a channel; every lane gets the sum.
template <int kSplit>
__device__ __forceinline__ float channel_sum(float v) {
#pragma unroll
  for (int offset = kSplit / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

// Step 2 over `valid` steps of a staged tile (and step 3's D u when kWithY):
// advances h, and with kWithY lane 0 of each channel writes y_t (before the
// gate) to y_row[t]. `valid` is the same for the whole block, so every lane
// reaches the shuffles.
template <typename Cfg, bool kWithY>
__device__ __forceinline__ void walk_tile(float (&h)[Cfg::kNPer], const float (&A2)[Cfg::kNPer], const float* u_row,
                                          const float* dt_row, const float* B_s, const float* C_s,
                                          const ProjectionSource<Cfg::kNPer>& B_src,
                                          const ProjectionSource<Cfg::kNPer>& C_src, int valid, int n0,
                                          int lane_in_channel, float D_val, float* y_row) {
  constexpr int kNPer = Cfg::kNPer;
  for (int t = 0; t < valid; ++t) {
    const float uv = u_row[t];
    const float dv = dt_row[t];
    const float drive = dv * uv;
    float Bv[kNPer];
    B_src.row(B_s + t * Cfg::kNPad + n0, Bv);
    float y = 0.f;
    if constexpr (kWithY) {
      float Cv[kNPer];
      C_src.row(C_s + t * Cfg::kNPad + n0, Cv);
#pragma unroll
      for (int k = 0; k < kNPer; ++k) {
        h[k] = exp2f(dv * A2[k]) * h[k] + drive * Bv[k];
        y += Cv[k] * h[k];
      }
      y = channel_sum<Cfg::kSplit>(y);
      if (lane_in_channel == 0) {
        y_row[t] = y + D_val * uv;
      }
    } else {
#pragma unroll
      for (int k = 0; k < kNPer; ++k) {
        h[k] = exp2f(dv * A2[k]) * h[k] + drive * Bv[k];
      }
    }
  }
}

// The per-thread view of its channel and states.
template <typename Cfg>
struct Lane {
  int c;               // channel within the block
  int s;               // lane within the channel
  int n0;              // first state this lane holds
  bool active;         // the channel exists
  int64_t d;           // the channel
  int nvalid;          // how many of this lane's kNPer states exist (0..kNPer)

  __device__ __forceinline__ Lane(const SelectiveScanParams& p, const BlockPlace& place) {
    c = static_cast<int>(threadIdx.x) / Cfg::kSplit;
    s = static_cast<int>(threadIdx.x) % Cfg::kSplit;
    n0 = s * Cfg::kNPer;
    active = c < place.nchannels;
    d = place.d0 + c;
    const int64_t left = p.dstate - n0;
    nvalid = left <= 0 ? 0 : (left < Cfg::kNPer ? static_cast<int>(left) : Cfg::kNPer);
  }
};

template <typename T, typename Cfg>
__global__ void __launch_bounds__(kThreads) selective_scan_fwd_kernel(const SelectiveScanParams p) {
  constexpr int kTile = Cfg::kTileFwd;
  constexpr int kC = Cfg::kChannels;
  constexpr int kRow = kTile + 1;
  constexpr int kNPer = Cfg::kNPer;
  __shared__ float u_s[kC * kRow];
  __shared__ float dt_s[kC * kRow];
  __shared__ float y_s[kC * kRow];
  __shared__ __align__(16) float B_s[kTile * Cfg::kNPad];
  __shared__ __align__(16) float C_s[kTile * Cfg::kNPad];

  const BlockPlace place = block_place<kC>(p);
  const Lane<Cfg> lane(p, place);

  float h[kNPer];
  float A2[kNPer];
#pragma unroll
  for (int k = 0; k < kNPer; ++k) {
    const int64_t n = lane.n0 + k;
    const bool have = lane.active && k < lane.nvalid;
    A2[k] = have ? p.A[lane.d * p.A_dim_stride + n * p.A_dstate_stride] * kLog2e : 0.f;
    h[k] = have && p.initial_state != nullptr
               ? p.initial_state[place.b * p.initial_state_batch_stride + lane.d * p.initial_state_dim_stride +
                                 n * p.initial_state_dstate_stride]
               : 0.f;
  }
  const float D_val = lane.active && p.D != nullptr ? p.D[lane.d * p.D_stride] : 0.f;
  const T* const z = static_cast<const T*>(p.z);
  T* const out = static_cast<T*>(p.out);
  const ProjectionSource<kNPer> B_src = projection_source<kNPer>(
      p.B_time_invariant, p.B, p.B_dim_stride, p.B_dstate_stride, lane.active, lane.d, lane.n0, lane.nvalid);
  const ProjectionSource<kNPer> C_src = projection_source<kNPer>(
      p.C_time_invariant, p.C, p.C_dim_stride, p.C_dstate_stride, lane.active, lane.d, lane.n0, lane.nvalid);

  for (int64_t t0 = 0; t0 < p.seqlen; t0 += kTile) {
    const int valid = static_cast<int>(p.seqlen - t0 < kTile ? p.seqlen - t0 : kTile);
    __syncthreads();  // the previous tile's epilogue has read y_s
    load_seq_tiles<T, kC, kTile>(p, place, t0, valid, u_s, dt_s);
    if (!p.B_time_invariant) {
      load_bc_tile<Cfg::kNPad, kTile>(p, place, t0, valid, p.B, p.B_batch_stride, p.B_group_stride,
                                      p.B_dstate_stride, p.B_seq_stride, B_s);
    }
    if (!p.C_time_invariant) {
      load_bc_tile<Cfg::kNPad, kTile>(p, place, t0, valid, p.C, p.C_batch_stride, p.C_group_stride,
                                      p.C_dstate_stride, p.C_seq_stride, C_s);
    }
    __syncthreads();

    if (p.checkpoint_every > 0 && t0 % p.checkpoint_every == 0 && lane.active) {
      float* const cp = p.checkpoints + place.b * p.checkpoints_batch_stride + lane.d * p.checkpoints_dim_stride +
                        (t0 / p.checkpoint_every) * p.checkpoints_chunk_stride;
#pragma unroll
      for (int k = 0; k < kNPer; ++k) {
        if (k < lane.nvalid) cp[(lane.n0 + k) * p.checkpoints_dstate_stride] = h[k];
      }
    }

    walk_tile<Cfg, true>(h, A2, u_s + lane.c * kRow, dt_s + lane.c * kRow, B_s, C_s, B_src, C_src, valid,
                         lane.n0, lane.s, D_val, y_s + lane.c * kRow);
    __syncthreads();

    // Step 3's gate, and the store, with consecutive lanes on consecutive steps.
    for (int i = threadIdx.x; i < kC * kTile; i += kThreads) {
      const int c = i / kTile;
      const int t = i % kTile;
      if (c < place.nchannels && t < valid) {
        const int64_t d = place.d0 + c;
        const int64_t l = t0 + t;
        float y = y_s[c * kRow + t];
        if (z != nullptr) {
          const float zv = Io<T>::load(z + place.b * p.z_batch_stride + d * p.z_dim_stride + l * p.z_seq_stride);
          y *= zv * sigmoid(zv);
        }
        Io<T>::store(out + place.b * p.out_batch_stride + d * p.out_dim_stride + l * p.out_seq_stride, y);
      }
    }
  }

  if (lane.active) {
#pragma unroll
    for (int k = 0; k < kNPer; ++k) {
      if (k < lane.nvalid) {
        p.last_state[place.b * p.last_state_batch_stride + lane.d * p.last_state_dim_stride +
                     (lane.n0 + k) * p.last_state_dstate_stride] = h[k];
      }
    }
  }
}

// Shared memory of the backward, in floats: B, C tiles; the per-channel dB and
// dC terms [step][channel][state] (each step's row padded by 4 floats so the
// reduction's lanes, one step each, spread over banks); seven [channel][kRow]
// tiles (u, delta, gy, dz factor, y, du, ddelta).
template <typename Cfg>
struct BwdSmem {
  static constexpr int kTile = Cfg::kTileBwd;
  static constexpr int kRow = kTile + 1;
  static constexpr int kBC = kTile * Cfg::kNPad;
  static constexpr int kTermStep = Cfg::kChannels * Cfg::kNPad + 4;
  static constexpr int kTerms = kTile * kTermStep;
  static constexpr int kSeq = Cfg::kChannels * kRow;
  static constexpr int kFloats = 2 * kBC + 2 * kTerms + 7 * kSeq;
  static constexpr size_t kBytes = sizeof(float) * kFloats;
  static_assert(kBC % 4 == 0 && kTermStep % 4 == 0, "float4 rows must stay 16-byte aligned");
};

template <typename T, typename Cfg>
__global__ void __launch_bounds__(kThreads) selective_scan_bwd_kernel(const SelectiveScanParams p) {
  using Smem = BwdSmem<Cfg>;
  constexpr int kTile = Cfg::kTileBwd;
  constexpr int kC = Cfg::kChannels;
  constexpr int kRow = Smem::kRow;
  constexpr int kNPer = Cfg::kNPer;
  constexpr int kNPad = Cfg::kNPad;
  constexpr int kMaxTiles = static_cast<int>(kSelectiveScanMaxCheckpointEvery / kTile);

  extern __shared__ float4 smem_f4[];
  float* const B_s = reinterpret_cast<float*>(smem_f4);
  float* const C_s = B_s + Smem::kBC;
  float* const dB_terms = C_s + Smem::kBC;
  float* const dC_terms = dB_terms + Smem::kTerms;
  float* const u_s = dC_terms + Smem::kTerms;
  float* const dt_s = u_s + Smem::kSeq;
  float* const gy_s = dt_s + Smem::kSeq;
  float* const zf_s = gy_s + Smem::kSeq;
  float* const y_s = zf_s + Smem::kSeq;
  float* const du_s = y_s + Smem::kSeq;
  float* const dd_s = du_s + Smem::kSeq;

  const BlockPlace place = block_place<kC>(p);
  const Lane<Cfg> lane(p, place);
  const T* const z = static_cast<const T*>(p.z);
  const T* const grad_out = static_cast<const T*>(p.grad_out);
  const bool has_z = z != nullptr;

  float A[kNPer], A2[kNPer], lam[kNPer], dA_acc[kNPer];
#pragma unroll
  for (int k = 0; k < kNPer; ++k) {
    const int64_t n = lane.n0 + k;
    const bool have = lane.active && k < lane.nvalid;
    A[k] = have ? p.A[lane.d * p.A_dim_stride + n * p.A_dstate_stride] : 0.f;
    A2[k] = A[k] * kLog2e;
    lam[k] = have && p.grad_last_state != nullptr
                 ? p.grad_last_state[place.b * p.grad_last_state_batch_stride +
                                     lane.d * p.grad_last_state_dim_stride + n * p.grad_last_state_dstate_stride]
                 : 0.f;
    dA_acc[k] = 0.f;
  }
  const float D_val = lane.active && p.D != nullptr ? p.D[lane.d * p.D_stride] : 0.f;
  float dD_acc = 0.f, dbias_acc = 0.f;
  const ProjectionSource<kNPer> B_src = projection_source<kNPer>(
      p.B_time_invariant, p.B, p.B_dim_stride, p.B_dstate_stride, lane.active, lane.d, lane.n0, lane.nvalid);
  const ProjectionSource<kNPer> C_src = projection_source<kNPer>(
      p.C_time_invariant, p.C, p.C_dim_stride, p.C_dstate_stride, lane.active, lane.d, lane.n0, lane.nvalid);

  const int64_t K = p.checkpoint_every;
  const int64_t nchunks = (p.seqlen + K - 1) / K;
  float starts[kMaxTiles][kNPer];  // the state entering each tile of the chunk (thread-local memory)

  for (int64_t chunk = nchunks - 1; chunk >= 0; --chunk) {
    const int64_t c0 = chunk * K;
    const int64_t clen = p.seqlen - c0 < K ? p.seqlen - c0 : K;
    const int ntiles = static_cast<int>((clen + kTile - 1) / kTile);

    float h[kNPer];
    const float* const cp = p.checkpoints + place.b * p.checkpoints_batch_stride +
                            lane.d * p.checkpoints_dim_stride + chunk * p.checkpoints_chunk_stride;
#pragma unroll
    for (int k = 0; k < kNPer; ++k) {
      h[k] = lane.active && k < lane.nvalid ? cp[(lane.n0 + k) * p.checkpoints_dstate_stride] : 0.f;
      starts[0][k] = h[k];
    }
    // The chunk forward, for the state entering each of its tiles.
    for (int j = 0; j + 1 < ntiles; ++j) {
      const int64_t t0 = c0 + static_cast<int64_t>(j) * kTile;
      __syncthreads();
      load_seq_tiles<T, kC, kTile>(p, place, t0, kTile, u_s, dt_s);
      if (!p.B_time_invariant) {
        load_bc_tile<kNPad, kTile>(p, place, t0, kTile, p.B, p.B_batch_stride, p.B_group_stride,
                                   p.B_dstate_stride, p.B_seq_stride, B_s);
      }
      __syncthreads();
      walk_tile<Cfg, false>(h, A2, u_s + lane.c * kRow, dt_s + lane.c * kRow, B_s, C_s, B_src, C_src, kTile,
                            lane.n0, lane.s, D_val, nullptr);
#pragma unroll
      for (int k = 0; k < kNPer; ++k) starts[j + 1][k] = h[k];
    }

    for (int j = ntiles - 1; j >= 0; --j) {
      const int64_t t0 = c0 + static_cast<int64_t>(j) * kTile;
      const int valid = static_cast<int>(p.seqlen - t0 < kTile ? p.seqlen - t0 : kTile);
      __syncthreads();
      load_seq_tiles<T, kC, kTile>(p, place, t0, valid, u_s, dt_s);
      if (!p.B_time_invariant) {
        load_bc_tile<kNPad, kTile>(p, place, t0, valid, p.B, p.B_batch_stride, p.B_group_stride,
                                   p.B_dstate_stride, p.B_seq_stride, B_s);
      }
      if (!p.C_time_invariant) {
        load_bc_tile<kNPad, kTile>(p, place, t0, valid, p.C, p.C_batch_stride, p.C_group_stride,
                                   p.C_dstate_stride, p.C_seq_stride, C_s);
      }
      // Step 3 backwards, the parts that need no state: gy = dout silu(z) and
      // dz's factor dout silu'(z), silu'(z) = sigmoid(z) (1 + z (1 - sigmoid(z))).
      for (int i = threadIdx.x; i < kC * kTile; i += kThreads) {
        const int c = i / kTile;
        const int t = i % kTile;
        float gy = 0.f, zf = 0.f;
        if (c < place.nchannels && t < valid) {
          const int64_t d = place.d0 + c;
          const int64_t l = t0 + t;
          const float g = Io<T>::load(grad_out + place.b * p.grad_out_batch_stride + d * p.grad_out_dim_stride +
                                      l * p.grad_out_seq_stride);
          gy = g;
          if (has_z) {
            const float zv = Io<T>::load(z + place.b * p.z_batch_stride + d * p.z_dim_stride + l * p.z_seq_stride);
            const float sg = sigmoid(zv);
            gy = g * zv * sg;
            zf = g * sg * (1.f + zv * (1.f - sg));
          }
        }
        gy_s[c * kRow + t] = gy;
        zf_s[c * kRow + t] = zf;
      }
      __syncthreads();

      const float* const u_row = u_s + lane.c * kRow;
      const float* const dt_row = dt_s + lane.c * kRow;
      const float* const gy_row = gy_s + lane.c * kRow;
      float hs[kNPer];  // h entering the tile
      float hist[kTile][kNPer];  // hist[t] = h_t; registers: every loop over t below is unrolled
#pragma unroll
      for (int k = 0; k < kNPer; ++k) hs[k] = h[k] = starts[j][k];

      // Recompute step 2 over the tile (and y, which dz needs).
#pragma unroll
      for (int t = 0; t < kTile; ++t) {
        if (t < valid) {
          const float uv = u_row[t];
          const float dv = dt_row[t];
          float Bv[kNPer];
          B_src.row(B_s + t * kNPad + lane.n0, Bv);
#pragma unroll
          for (int k = 0; k < kNPer; ++k) {
            h[k] = exp2f(dv * A2[k]) * h[k] + dv * uv * Bv[k];
            hist[t][k] = h[k];
          }
          if (has_z) {
            float Cv[kNPer];
            C_src.row(C_s + t * kNPad + lane.n0, Cv);
            float y = 0.f;
#pragma unroll
            for (int k = 0; k < kNPer; ++k) y += Cv[k] * h[k];
            y = channel_sum<Cfg::kSplit>(y);
            if (lane.s == 0) y_s[lane.c * kRow + t] = y + D_val * uv;
          }
        }
      }

      // Step 2 and 3 backwards, last step first.
#pragma unroll
      for (int t = kTile - 1; t >= 0; --t) {
        if (t < valid) {
          const float uv = u_row[t];
          const float dv = dt_row[t];
          const float gy = gy_row[t];
          float Bv[kNPer], Cv[kNPer], dBv[kNPer], dCv[kNPer];
          B_src.row(B_s + t * kNPad + lane.n0, Bv);
          C_src.row(C_s + t * kNPad + lane.n0, Cv);
          float ddelta = 0.f, du = 0.f;
#pragma unroll
          for (int k = 0; k < kNPer; ++k) {
            const float dh = gy * Cv[k] + lam[k];
            const float decay = exp2f(dv * A2[k]);
            const float decayed = decay * (t > 0 ? hist[t - 1][k] : hs[k]);  // exp(delta_t A) h_{t-1}
            dCv[k] = gy * hist[t][k];
            dBv[k] = dh * dv * uv;
            ddelta += dh * (decayed * A[k] + Bv[k] * uv);
            du += dh * Bv[k];
            dA_acc[k] += dh * decayed * dv;
            lam[k] = decay * dh;
          }
          store_row<kNPer>(dB_terms + t * Smem::kTermStep + lane.c * kNPad + lane.n0, dBv);
          store_row<kNPer>(dC_terms + t * Smem::kTermStep + lane.c * kNPad + lane.n0, dCv);
          ddelta = channel_sum<Cfg::kSplit>(ddelta);
          du = channel_sum<Cfg::kSplit>(du);
          if (lane.s == 0) {
            // Step 1 backwards: softplus'(x) = sigmoid(x) = 1 - exp(-softplus(x)).
            const float ddelta_raw = p.delta_softplus ? ddelta * -expm1f(-dv) : ddelta;
            dd_s[lane.c * kRow + t] = ddelta_raw;
            du_s[lane.c * kRow + t] = du * dv + gy * D_val;
            dbias_acc += ddelta_raw;
            dD_acc += gy * uv;
          }
        }
      }
      __syncthreads();

      // Per-step outputs, consecutive lanes on consecutive steps.
      T* const du_out = static_cast<T*>(p.du);
      T* const dd_out = static_cast<T*>(p.ddelta);
      T* const dz_out = static_cast<T*>(p.dz);
      for (int i = threadIdx.x; i < kC * kTile; i += kThreads) {
        const int c = i / kTile;
        const int t = i % kTile;
        if (c < place.nchannels && t < valid) {
          const int64_t d = place.d0 + c;
          const int64_t l = t0 + t;
          Io<T>::store(du_out + place.b * p.du_batch_stride + d * p.du_dim_stride + l * p.du_seq_stride,
                       du_s[c * kRow + t]);
          Io<T>::store(dd_out + place.b * p.ddelta_batch_stride + d * p.ddelta_dim_stride + l * p.ddelta_seq_stride,
                       dd_s[c * kRow + t]);
          if (has_z) {
            Io<T>::store(dz_out + place.b * p.dz_batch_stride + d * p.dz_dim_stride + l * p.dz_seq_stride,
                         y_s[c * kRow + t] * zf_s[c * kRow + t]);
          }
        }
      }
      // dB, dC, time-varying: this block's channels summed per step, then added to the group's.
      if (!p.B_time_invariant || !p.C_time_invariant) {
        for (int i = threadIdx.x; i < kNPad * kTile; i += kThreads) {
          const int n = i / kTile;
          const int t = i % kTile;
          if (n < p.dstate && t < valid) {
            float sb = 0.f, sc = 0.f;
            for (int c = 0; c < kC; ++c) {
              sb += dB_terms[t * Smem::kTermStep + c * kNPad + n];
              sc += dC_terms[t * Smem::kTermStep + c * kNPad + n];
            }
            const int64_t l = t0 + t;
            if (!p.B_time_invariant) {
              atomicAdd(p.dB + place.b * p.dB_batch_stride + place.g * p.dB_group_stride + n * p.dB_dstate_stride +
                            l * p.dB_seq_stride,
                        sb);
            }
            if (!p.C_time_invariant) {
              atomicAdd(p.dC + place.b * p.dC_batch_stride + place.g * p.dC_group_stride + n * p.dC_dstate_stride +
                            l * p.dC_seq_stride,
                        sc);
            }
          }
        }
      }
      // Time-invariant: each channel's steps summed, then added to its (d, n) row (over the batch, too).
      if (p.B_time_invariant || p.C_time_invariant) {
        for (int i = threadIdx.x; i < kC * kNPad; i += kThreads) {
          const int c = i / kNPad;
          const int n = i % kNPad;
          if (c < place.nchannels && n < p.dstate) {
            float sb = 0.f, sc = 0.f;
            for (int t = 0; t < valid; ++t) {
              sb += dB_terms[t * Smem::kTermStep + c * kNPad + n];
              sc += dC_terms[t * Smem::kTermStep + c * kNPad + n];
            }
            const int64_t d = place.d0 + c;
            if (p.B_time_invariant) atomicAdd(p.dB + d * p.dB_dim_stride + n * p.dB_dstate_stride, sb);
            if (p.C_time_invariant) atomicAdd(p.dC + d * p.dC_dim_stride + n * p.dC_dstate_stride, sc);
          }
        }
      }
    }
  }

  if (lane.active) {
#pragma unroll
    for (int k = 0; k < kNPer; ++k) {
      if (k < lane.nvalid) {
        const int64_t n = lane.n0 + k;
        p.dinitial_state[place.b * p.dinitial_state_batch_stride + lane.d * p.dinitial_state_dim_stride +
                         n * p.dinitial_state_dstate_stride] = lam[k];
        atomicAdd(p.dA + lane.d * p.dA_dim_stride + n * p.dA_dstate_stride, dA_acc[k]);
      }
    }
    if (lane.s == 0) {
      if (p.dD != nullptr) atomicAdd(p.dD + lane.d * p.dD_stride, dD_acc);
      if (p.ddelta_bias != nullptr) atomicAdd(p.ddelta_bias + lane.d * p.ddelta_bias_stride, dbias_acc);
    }
  }
}

inline int64_t num_blocks(const SelectiveScanParams& p, int channels_per_block) {
  const int64_t per_group = p.dim / p.ngroups;
  return p.batch * p.ngroups * ((per_group + channels_per_block - 1) / channels_per_block);
}

constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;

template <typename T, typename Cfg>
cudaError_t launch_fwd(const SelectiveScanParams& p, cudaStream_t stream) {
  const int64_t blocks = num_blocks(p, Cfg::kChannels);
  if (blocks > kMaxGridX) return cudaErrorInvalidValue;
  selective_scan_fwd_kernel<T, Cfg><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename Cfg>
cudaError_t launch_bwd(const SelectiveScanParams& p, cudaStream_t stream) {
  const int64_t blocks = num_blocks(p, Cfg::kChannels);
  if (blocks > kMaxGridX) return cudaErrorInvalidValue;
  constexpr size_t bytes = BwdSmem<Cfg>::kBytes;
  const cudaError_t err = cudaFuncSetAttribute(selective_scan_bwd_kernel<T, Cfg>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  selective_scan_bwd_kernel<T, Cfg><<<static_cast<unsigned int>(blocks), kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

// dstate -> (lanes per channel, states per lane, forward tile, backward tile).
// Forward tiles keep the static shared memory under 48 KB; backward tiles keep
// kTileBwd * kNPer = 64 or fewer history registers per thread.
template <typename T, bool kBackward>
cudaError_t dispatch(const SelectiveScanParams& p, cudaStream_t stream) {
#define LNLM_SSM_SCAN_CONFIG(SPLIT, NPER, TF, TB)                                 \
  return kBackward ? launch_bwd<T, Config<SPLIT, NPER, TF, TB>>(p, stream) \
                   : launch_fwd<T, Config<SPLIT, NPER, TF, TB>>(p, stream)
  if (p.dstate <= 4) LNLM_SSM_SCAN_CONFIG(1, 4, 16, 8);
  if (p.dstate <= 8) LNLM_SSM_SCAN_CONFIG(2, 4, 32, 16);
  if (p.dstate <= 16) LNLM_SSM_SCAN_CONFIG(4, 4, 64, 16);
  if (p.dstate <= 32) LNLM_SSM_SCAN_CONFIG(8, 4, 64, 16);
  if (p.dstate <= 64) LNLM_SSM_SCAN_CONFIG(16, 4, 64, 16);
  if (p.dstate <= 128) LNLM_SSM_SCAN_CONFIG(32, 4, 32, 16);
  LNLM_SSM_SCAN_CONFIG(32, 8, 16, 8);
#undef LNLM_SSM_SCAN_CONFIG
}

inline bool common_params_ok(const SelectiveScanParams& p, ScalarKind kind) {
  const int64_t K = p.checkpoint_every;
  return p.input_kind == kind && p.dstate >= 1 && p.dstate <= kSelectiveScanMaxDstate && p.batch >= 0 &&
         p.dim >= 0 && p.seqlen >= 0 && p.ngroups >= 1 && p.dim % p.ngroups == 0 && K >= 0 &&
         K <= kSelectiveScanMaxCheckpointEvery && K % kSelectiveScanCheckpointQuantum == 0 && p.u != nullptr &&
         p.delta != nullptr && p.A != nullptr && p.B != nullptr && p.C != nullptr;
}

template <typename T>
cudaError_t launch_selective_scan_fwd(const SelectiveScanParams& p, cudaStream_t stream) {
  // Tensors without elements may come with null pointers.
  const bool has_steps = p.seqlen > 0;
  if (!common_params_ok(p, Io<T>::kind) || p.last_state == nullptr ||
      (has_steps && (p.out == nullptr || (p.checkpoint_every > 0 && p.checkpoints == nullptr)))) {
    return cudaErrorInvalidValue;
  }
  if (p.batch == 0 || p.dim == 0) return cudaSuccess;  // an empty grid cannot be launched
  return dispatch<T, false>(p, stream);
}

template <typename T>
cudaError_t launch_selective_scan_bwd(const SelectiveScanParams& p, cudaStream_t stream) {
  const bool has_steps = p.seqlen > 0;
  if (!common_params_ok(p, Io<T>::kind) || p.checkpoint_every == 0 || p.dA == nullptr ||
      p.dinitial_state == nullptr || (p.D != nullptr && p.dD == nullptr) ||
      (p.delta_bias != nullptr && p.ddelta_bias == nullptr) ||
      (has_steps && (p.checkpoints == nullptr || p.grad_out == nullptr || p.du == nullptr || p.ddelta == nullptr ||
                     p.dB == nullptr || p.dC == nullptr || (p.z != nullptr && p.dz == nullptr)))) {
    return cudaErrorInvalidValue;
  }
  if (p.batch == 0 || p.dim == 0) return cudaSuccess;
  return dispatch<T, true>(p, stream);
}

}  // namespace selective_scan_detail
}  // namespace cuda
}  // namespace lnlm_ssm
