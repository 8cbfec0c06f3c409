// The Mamba-1 selective scan on the CPU, forward and backward.
//
// Math: lnlm_ssm/ops/selective_scan/reference.py. Layout, as prepared by
// lnlm_ssm/ops/selective_scan/cpu.py (b batch, d dim, l seqlen, n dstate,
// g groups; channel d reads group d / (dim / g)):
//
//   u, delta, z, out, grad_out     (b, d, l)  contiguous, input dtype T
//   A                              (d, n)     contiguous, math dtype
//   B, C                           (b, g, l, n) contiguous, math dtype (time-major, so
//                                  the n values of one step are adjacent)
//   D, delta_bias                  (d,)       math dtype
//   initial_state, last_state      (b, d, n)  math dtype
//   checkpoints                    (b, d, ceil(l / K), n): the state entering every
//                                  K-step chunk, saved by the forward for the backward
//
// The math dtype is float (double for double inputs). Work is split over
// channels d (each thread owns whole rows, so the per-channel gradients of A, D
// and delta_bias need no reduction); the loops over dstate are written for the
// vectoriser. The backward walks the chunks in reverse, recomputing each chunk's
// states from its checkpoint, so it never holds (b, d, l, n).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "vec_math.h"

namespace lnlm_ssm {
namespace {

// dstate is padded by the caller to a multiple of kLanes (with A = B = C = 0,
// which keeps the padded states at 0), so that the loops over it are made of
// whole vectors.
constexpr int64_t kLanes = 8;

template <typename acc_t>
const acc_t* optional_data(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<acc_t>() : nullptr;
}

struct Sizes {
  int64_t batch, dim, seqlen, dstate, ngroups, chunk, nchunks;

  Sizes(const at::Tensor& u, const at::Tensor& A, const at::Tensor& B, int64_t checkpoint_every)
      : batch(u.size(0)),
        dim(u.size(1)),
        seqlen(u.size(2)),
        dstate(A.size(1)),
        ngroups(B.size(1)),
        chunk(checkpoint_every),
        nchunks(checkpoint_every > 0 ? (u.size(2) + checkpoint_every - 1) / checkpoint_every : 0) {}

  int64_t channels_per_group() const {
    return dim / ngroups;
  }
};

void check_inputs(
    const at::Tensor& u,
    const at::Tensor& delta,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& C,
    const std::optional<at::Tensor>& z) {
  TORCH_CHECK(u.dim() == 3 && u.is_contiguous(), "selective_scan (cpu): u must be contiguous (batch, dim, seqlen)");
  TORCH_CHECK(delta.sizes() == u.sizes() && delta.is_contiguous() && delta.scalar_type() == u.scalar_type(),
              "selective_scan (cpu): delta must be contiguous, shaped and typed like u");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1) && A.is_contiguous(), "selective_scan (cpu): A must be contiguous (dim, dstate)");
  TORCH_CHECK(B.dim() == 4 && B.is_contiguous() && B.size(0) == u.size(0) && B.size(2) == u.size(2) && B.size(3) == A.size(1),
              "selective_scan (cpu): B must be contiguous (batch, ngroups, seqlen, dstate)");
  TORCH_CHECK(C.sizes() == B.sizes() && C.is_contiguous(), "selective_scan (cpu): C must be shaped like B");
  TORCH_CHECK(u.size(1) % B.size(1) == 0, "selective_scan (cpu): dim must be divisible by ngroups");
  TORCH_CHECK(A.size(1) % kLanes == 0, "selective_scan (cpu): dstate must be padded to a multiple of ", kLanes);
  TORCH_CHECK(A.scalar_type() == B.scalar_type() && B.scalar_type() == C.scalar_type(),
              "selective_scan (cpu): A, B and C must share the math dtype");
  if (z.has_value()) {
    TORCH_CHECK(z->sizes() == u.sizes() && z->is_contiguous() && z->scalar_type() == u.scalar_type(),
                "selective_scan (cpu): z must be contiguous, shaped and typed like u");
  }
}

// Steps whose per-step scalars (step size, gate) are computed together,
// vectorised over time, before the sequential recurrence runs over them.
constexpr int64_t kBlock = 64;

// dt[i] = softplus(delta[i] + bias) (or without softplus), and the derivative
// of that map, d dt / d delta, when `ddt` is given.
template <typename T, typename acc_t>
inline void step_sizes(const T* delta, int64_t len, acc_t bias, bool softplus_on, acc_t* dt, acc_t* ddt) {
  if (!softplus_on) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      dt[i] = static_cast<acc_t>(delta[i]) + bias;
    }
    if (ddt) {
      std::fill(ddt, ddt + len, acc_t(1));
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    dt[i] = softplus_vec(static_cast<acc_t>(delta[i]) + bias);
  }
  if (ddt) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const acc_t raw = static_cast<acc_t>(delta[i]) + bias;
      ddt[i] = raw > acc_t(20) ? acc_t(1) : sigmoid_vec(raw);
    }
  }
}

// Each block reads kChannels rows of kBlock steps: streams too short and too many
// for the hardware prefetcher, so the next block of a row is requested by hand.
template <typename T>
inline void prefetch_next_block(const T* row_block, int64_t len, int64_t remaining) {
  constexpr int64_t kLine = 64 / sizeof(T);
  const int64_t ahead = std::min<int64_t>(kBlock, remaining - len);
  for (int64_t i = 0; i < ahead; i += kLine) {
    __builtin_prefetch(row_block + len + i);
  }
}

// The forward advances kChannels channels of one group together, one per
// vector lane: their B and C are shared, so each state element needs no
// horizontal sum, and the lanes' recurrences are independent (the backward, by
// contrast, vectorises along dstate, where dB and dC accumulate as whole vectors).
constexpr int64_t kChannels = 16;

// `len` steps of the recurrence for a block of channels, from state h (updated):
//   h[n][c] <- exp(dt[i][c] A[n][c]) h[n][c] + dtu[i][c] B_i[n],   y[i][c] = sum_n C_i[n] h[n][c]
// Layouts: aT, h (dstate, kChannels); dt, dtu, y (len, kChannels); B, C time-major from step 0.
template <typename acc_t>
void recur_channels(
    const acc_t* __restrict__ aT,
    const acc_t* __restrict__ B,
    const acc_t* __restrict__ C,
    const acc_t* __restrict__ dt,
    const acc_t* __restrict__ dtu,
    int64_t len,
    int64_t N,
    acc_t* __restrict__ h,
    acc_t* __restrict__ y) {
  for (int64_t i = 0; i < len; ++i) {
    const acc_t* __restrict__ dti = dt + i * kChannels;
    const acc_t* __restrict__ dtui = dtu + i * kChannels;
    acc_t acc[kChannels] = {};
    for (int64_t n = 0; n < N; ++n) {
      const acc_t bn = B[i * N + n], cn = C[i * N + n];
      acc_t* __restrict__ hn = h + n * kChannels;
      const acc_t* __restrict__ an = aT + n * kChannels;
#pragma omp simd
      for (int64_t c = 0; c < kChannels; ++c) {
        const acc_t v = exp_vec(dti[c] * an[c]) * hn[c] + dtui[c] * bn;
        hn[c] = v;
        acc[c] += v * cn;
      }
    }
    std::copy_n(acc, kChannels, y + i * kChannels);
  }
}

template <typename T, typename acc_t>
void forward_kernel(
    const Sizes& s,
    const T* u,
    const T* delta,
    const T* z,
    const acc_t* A,
    const acc_t* B,
    const acc_t* C,
    const acc_t* D,
    const acc_t* delta_bias,
    const acc_t* initial_state,
    bool delta_softplus,
    T* out,
    acc_t* last_state,
    acc_t* checkpoints) {
  const int64_t L = s.seqlen, N = s.dstate, P = s.channels_per_group();
  const int64_t blocks_per_group = (P + kChannels - 1) / kChannels;
  at::parallel_for(0, s.ngroups * blocks_per_group, 1, [&](int64_t block_begin, int64_t block_end) {
    // Lanes past the block's last channel run on zeros and are never stored.
    std::vector<acc_t> aT(N * kChannels), h(N * kChannels);
    acc_t dt[kBlock * kChannels], dtu[kBlock * kChannels], y[kBlock * kChannels], column[kBlock];
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t g = block / blocks_per_group;
      const int64_t d0 = g * P + (block % blocks_per_group) * kChannels;
      const int64_t nc = std::min(kChannels, (g + 1) * P - d0);
      std::fill(aT.begin(), aT.end(), acc_t(0));
      for (int64_t c = 0; c < nc; ++c) {
        for (int64_t n = 0; n < N; ++n) {
          aT[n * kChannels + c] = A[(d0 + c) * N + n];
        }
      }
      for (int64_t b = 0; b < s.batch; ++b) {
        const acc_t* Bg = B + (b * s.ngroups + g) * L * N;
        const acc_t* Cg = C + (b * s.ngroups + g) * L * N;
        const int64_t state0 = (b * s.dim + d0) * N;  // channel d0's state in (batch, dim, dstate)
        std::fill(h.begin(), h.end(), acc_t(0));
        std::fill_n(dt, kBlock * kChannels, acc_t(0));
        std::fill_n(dtu, kBlock * kChannels, acc_t(0));
        if (initial_state) {
          for (int64_t c = 0; c < nc; ++c) {
            for (int64_t n = 0; n < N; ++n) {
              h[n * kChannels + c] = initial_state[state0 + c * N + n];
            }
          }
        }
        for (int64_t t0 = 0; t0 < L; t0 += kBlock) {
          const int64_t len = std::min(kBlock, L - t0);
          if (checkpoints && t0 % s.chunk == 0) {
            for (int64_t c = 0; c < nc; ++c) {
              acc_t* ck = checkpoints + ((b * s.dim + d0 + c) * s.nchunks + t0 / s.chunk) * N;
              for (int64_t n = 0; n < N; ++n) {
                ck[n] = h[n * kChannels + c];
              }
            }
          }
          // Per-step scalars, vectorised over time along each channel, then laid out by lane.
          for (int64_t c = 0; c < nc; ++c) {
            const int64_t row = (b * s.dim + d0 + c) * L + t0;
            prefetch_next_block(delta + row, len, L - t0);
            prefetch_next_block(u + row, len, L - t0);
            if (z) {
              prefetch_next_block(z + row, len, L - t0);
            }
            step_sizes(delta + row, len, delta_bias ? delta_bias[d0 + c] : acc_t(0), delta_softplus, column,
                       static_cast<acc_t*>(nullptr));
            for (int64_t i = 0; i < len; ++i) {
              dt[i * kChannels + c] = column[i];
              dtu[i * kChannels + c] = column[i] * static_cast<acc_t>(u[row + i]);
            }
          }
          recur_channels(aT.data(), Bg + t0 * N, Cg + t0 * N, dt, dtu, len, N, h.data(), y);
          for (int64_t c = 0; c < nc; ++c) {
            const int64_t row = (b * s.dim + d0 + c) * L + t0;
            const acc_t skip = D ? D[d0 + c] : acc_t(0);
            for (int64_t i = 0; i < len; ++i) {
              column[i] = y[i * kChannels + c];
            }
            if (z) {
#pragma omp simd
              for (int64_t i = 0; i < len; ++i) {
                const acc_t zi = static_cast<acc_t>(z[row + i]);
                const acc_t yi = column[i] + skip * static_cast<acc_t>(u[row + i]);
                out[row + i] = static_cast<T>(yi * zi * sigmoid_vec(zi));
              }
            } else {
#pragma omp simd
              for (int64_t i = 0; i < len; ++i) {
                out[row + i] = static_cast<T>(column[i] + skip * static_cast<acc_t>(u[row + i]));
              }
            }
          }
        }
        for (int64_t c = 0; c < nc; ++c) {
          for (int64_t n = 0; n < N; ++n) {
            last_state[state0 + c * N + n] = h[n * kChannels + c];
          }
        }
      }
    }
  });
}

// Recompute `len` steps of one row from state hs[0..N): writes the state after
// step i to hs[(i + 1) N ..] and exp(dt[i] A) to decays[i N ..].
template <typename acc_t>
void recompute_states(
    const acc_t* __restrict__ a,
    const acc_t* __restrict__ B,
    const acc_t* __restrict__ dt,
    const acc_t* __restrict__ dtu,
    int64_t len,
    int64_t N,
    acc_t* __restrict__ hs,
    acc_t* __restrict__ decays) {
  for (int64_t i = 0; i < len; ++i) {
    const acc_t* __restrict__ Bi = B + i * N;
    const acc_t* __restrict__ prev = hs + i * N;
    acc_t* __restrict__ next = hs + (i + 1) * N;
    acc_t* __restrict__ dec = decays + i * N;
    const acc_t dti = dt[i], dtui = dtu[i];
    for (int64_t n0 = 0; n0 < N; n0 += kLanes) {
#pragma omp simd
      for (int64_t n = n0; n < n0 + kLanes; ++n) {
        dec[n] = exp_vec(dti * a[n]);
        next[n] = dec[n] * prev[n] + dtui * Bi[n];
      }
    }
  }
}

// y[i] = C_i . h_i for the recomputed states of a chunk.
template <typename acc_t>
void readout(const acc_t* __restrict__ C, const acc_t* __restrict__ hs, int64_t len, int64_t N, acc_t* __restrict__ y) {
  for (int64_t i = 0; i < len; ++i) {
    const acc_t* __restrict__ Ci = C + i * N;
    const acc_t* __restrict__ cur = hs + (i + 1) * N;
    acc_t acc = 0;
    for (int64_t n0 = 0; n0 < N; n0 += kLanes) {
#pragma omp simd reduction(+ : acc)
      for (int64_t n = n0; n < n0 + kLanes; ++n) {
        acc += Ci[n] * cur[n];
      }
    }
    y[i] = acc;
  }
}

// Backpropagate through `len` steps of one row, last step first. gh holds the
// gradient w.r.t. the state after the last step and leaves holding it w.r.t.
// the state before the first. Per step i it writes gdt[i] (d loss / d dt_i) and
// gBu[i] = sum_n (d loss / d h_i)[n] B_i[n], and accumulates dA, dB and dC.
template <typename acc_t>
void backprop_states(
    const acc_t* __restrict__ a,
    const acc_t* __restrict__ B,
    const acc_t* __restrict__ C,
    const acc_t* __restrict__ hs,
    const acc_t* __restrict__ decays,
    const acc_t* __restrict__ dt,
    const acc_t* __restrict__ u,
    const acc_t* __restrict__ gy,
    int64_t len,
    int64_t N,
    acc_t* __restrict__ gh,
    acc_t* __restrict__ da,
    acc_t* __restrict__ dB,
    acc_t* __restrict__ dC,
    acc_t* __restrict__ gdt,
    acc_t* __restrict__ gBu) {
  for (int64_t i = len - 1; i >= 0; --i) {
    const acc_t* __restrict__ Bi = B + i * N;
    const acc_t* __restrict__ Ci = C + i * N;
    const acc_t* __restrict__ prev = hs + i * N;
    const acc_t* __restrict__ cur = hs + (i + 1) * N;
    const acc_t* __restrict__ dec = decays + i * N;
    acc_t* __restrict__ dBi = dB + i * N;
    acc_t* __restrict__ dCi = dC + i * N;
    const acc_t gyi = gy[i], dti = dt[i], ui = u[i], dtui = dt[i] * u[i];
    acc_t g_dt = 0, g_bu = 0;
    for (int64_t n0 = 0; n0 < N; n0 += kLanes) {
#pragma omp simd reduction(+ : g_dt, g_bu)
      for (int64_t n = n0; n < n0 + kLanes; ++n) {
        // h_i = dec * h_{i-1} + dt u B,  y_i = C . h_i,  dec = exp(dt A)
        const acc_t g_h = gh[n] + gyi * Ci[n];
        dCi[n] += gyi * cur[n];
        const acc_t g_dec = g_h * prev[n] * dec[n];
        g_dt += g_dec * a[n] + g_h * Bi[n] * ui;
        da[n] += g_dec * dti;
        g_bu += g_h * Bi[n];
        dBi[n] += g_h * dtui;
        gh[n] = g_h * dec[n];
      }
    }
    gdt[i] = g_dt;
    gBu[i] = g_bu;
  }
}

template <typename T, typename acc_t>
void backward_kernel(
    const Sizes& s,
    const T* grad_out,
    const acc_t* grad_last,
    const T* u,
    const T* delta,
    const T* z,
    const acc_t* A,
    const acc_t* B,
    const acc_t* C,
    const acc_t* D,
    const acc_t* delta_bias,
    const acc_t* checkpoints,
    bool delta_softplus,
    T* du,
    T* ddelta,
    T* dz,
    acc_t* dA,
    acc_t* dB_partial,  // (threads, b, g, l, n): each thread's share of dB, summed by the caller
    acc_t* dC_partial,
    acc_t* dD,
    acc_t* ddelta_bias,
    acc_t* dinitial_state) {
  const int64_t L = s.seqlen, N = s.dstate, K = s.chunk;
  const int64_t bc_size = s.batch * s.ngroups * L * N;
  at::parallel_for(0, s.dim, 1, [&](int64_t d_begin, int64_t d_end) {
    acc_t* dB_mine = dB_partial + at::get_thread_num() * bc_size;
    acc_t* dC_mine = dC_partial + at::get_thread_num() * bc_size;
    // One chunk's recomputed states (before and after each step) and decays,
    // and per-step scalars: step size, its derivative w.r.t. delta, u, the
    // gradient at y (through the gate), and the gradients of dt and of dt u.
    std::vector<acc_t> h_buf((K + 1) * N), decay_buf(K * N), step_buf(8 * K), gh_buf(N);
    acc_t* hs = h_buf.data();
    acc_t* decays = decay_buf.data();
    acc_t* gh = gh_buf.data();
    acc_t* __restrict__ dts = step_buf.data();
    acc_t* __restrict__ ddts = dts + K;
    acc_t* __restrict__ us = ddts + K;
    acc_t* __restrict__ dtus = us + K;
    acc_t* __restrict__ ys = dtus + K;
    acc_t* __restrict__ gys = ys + K;
    acc_t* __restrict__ gdts = gys + K;
    acc_t* __restrict__ gBus = gdts + K;
    for (int64_t d = d_begin; d < d_end; ++d) {
      const acc_t* a = A + d * N;
      const acc_t bias = delta_bias ? delta_bias[d] : acc_t(0);
      const acc_t skip = D ? D[d] : acc_t(0);
      const int64_t g = d / s.channels_per_group();
      acc_t dD_sum = 0, dbias_sum = 0;
      for (int64_t b = 0; b < s.batch; ++b) {
        const int64_t bc_offset = (b * s.ngroups + g) * L * N;
        if (grad_last) {
          std::copy_n(grad_last + (b * s.dim + d) * N, N, gh);
        } else {
          std::fill_n(gh, N, acc_t(0));
        }
        for (int64_t c = s.nchunks - 1; c >= 0; --c) {
          const int64_t t0 = c * K, len = std::min(K, L - t0);
          const int64_t row = (b * s.dim + d) * L + t0;
          step_sizes(delta + row, len, bias, delta_softplus, dts, ddts);
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) {
            us[i] = static_cast<acc_t>(u[row + i]);
            dtus[i] = dts[i] * us[i];
            gys[i] = static_cast<acc_t>(grad_out[row + i]);
          }
          std::copy_n(checkpoints + ((b * s.dim + d) * s.nchunks + c) * N, N, hs);
          recompute_states(a, B + bc_offset + t0 * N, dts, dtus, len, N, hs, decays);
          if (z) {
            // out = y * silu(z), with y recomputed from the states.
            readout(C + bc_offset + t0 * N, hs, len, N, ys);
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) {
              const acc_t zi = static_cast<acc_t>(z[row + i]);
              const acc_t sg = sigmoid_vec(zi);
              const acc_t y = ys[i] + skip * us[i];
              dz[row + i] = static_cast<T>(gys[i] * y * sg * (acc_t(1) + zi * (acc_t(1) - sg)));
              gys[i] *= zi * sg;
            }
          }
          backprop_states(
              a, B + bc_offset + t0 * N, C + bc_offset + t0 * N, hs, decays, dts, us, gys, len, N, gh, dA + d * N,
              dB_mine + bc_offset + t0 * N, dC_mine + bc_offset + t0 * N, gdts, gBus);
#pragma omp simd reduction(+ : dD_sum, dbias_sum)
          for (int64_t i = 0; i < len; ++i) {
            const acc_t g_delta = gdts[i] * ddts[i];
            ddelta[row + i] = static_cast<T>(g_delta);
            du[row + i] = static_cast<T>(gys[i] * skip + dts[i] * gBus[i]);
            dbias_sum += g_delta;
            dD_sum += gys[i] * us[i];
          }
        }
        std::copy_n(gh, N, dinitial_state + (b * s.dim + d) * N);
      }
      if (dD) {
        dD[d] = dD_sum;
      }
      if (ddelta_bias) {
        ddelta_bias[d] = dbias_sum;
      }
    }
  });
}

#define LNLM_DISPATCH_SCAN_TYPES(dtype, NAME, ...)                                             \
  [&] {                                                                                        \
    switch (dtype) {                                                                           \
      case at::kFloat: { using T = float; using acc_t = float; return __VA_ARGS__(); }         \
      case at::kDouble: { using T = double; using acc_t = double; return __VA_ARGS__(); }      \
      case at::kBFloat16: { using T = c10::BFloat16; using acc_t = float; return __VA_ARGS__(); } \
      case at::kHalf: { using T = c10::Half; using acc_t = float; return __VA_ARGS__(); }      \
      default: TORCH_CHECK(false, NAME, ": unsupported dtype ", dtype);                        \
    }                                                                                          \
  }()

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_fwd(
    const at::Tensor& u,
    const at::Tensor& delta,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& C,
    const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias,
    const std::optional<at::Tensor>& initial_state,
    bool delta_softplus,
    int64_t checkpoint_every) {
  check_inputs(u, delta, A, B, C, z);
  TORCH_CHECK(checkpoint_every >= 0 && checkpoint_every % kBlock == 0,
              "selective_scan (cpu): checkpoint_every must be a non-negative multiple of ", kBlock);
  const Sizes s(u, A, B, checkpoint_every);
  auto out = at::empty_like(u);
  auto last_state = at::empty({s.batch, s.dim, s.dstate}, A.options());
  auto checkpoints = at::empty({s.batch, s.dim, s.nchunks, s.dstate}, A.options());
  LNLM_DISPATCH_SCAN_TYPES(u.scalar_type(), "selective_scan_fwd (cpu)", [&] {
    forward_kernel<T, acc_t>(
        s, u.const_data_ptr<T>(), delta.const_data_ptr<T>(), z ? z->const_data_ptr<T>() : nullptr,
        A.const_data_ptr<acc_t>(), B.const_data_ptr<acc_t>(), C.const_data_ptr<acc_t>(), optional_data<acc_t>(D),
        optional_data<acc_t>(delta_bias), optional_data<acc_t>(initial_state), delta_softplus, out.mutable_data_ptr<T>(),
        last_state.mutable_data_ptr<acc_t>(), checkpoint_every > 0 ? checkpoints.mutable_data_ptr<acc_t>() : nullptr);
  });
  return {out, last_state, checkpoints};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_bwd(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_last_state,
    const at::Tensor& u,
    const at::Tensor& delta,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& C,
    const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& delta_bias,
    const at::Tensor& checkpoints,
    bool delta_softplus,
    int64_t checkpoint_every) {
  check_inputs(u, delta, A, B, C, z);
  TORCH_CHECK(checkpoint_every > 0 && checkpoint_every % kBlock == 0,
              "selective_scan (cpu): the backward needs checkpoint_every, a positive multiple of ", kBlock);
  TORCH_CHECK(grad_out.sizes() == u.sizes() && grad_out.is_contiguous() && grad_out.scalar_type() == u.scalar_type(),
              "selective_scan (cpu): grad_out must be contiguous, shaped and typed like u");
  const Sizes s(u, A, B, checkpoint_every);
  TORCH_CHECK(checkpoints.is_contiguous() && checkpoints.sizes() == at::IntArrayRef({s.batch, s.dim, s.nchunks, s.dstate}),
              "selective_scan (cpu): checkpoints do not match the inputs");
  if (grad_last_state.has_value()) {
    TORCH_CHECK(grad_last_state->is_contiguous() && grad_last_state->sizes() == at::IntArrayRef({s.batch, s.dim, s.dstate}) &&
                    grad_last_state->scalar_type() == A.scalar_type(),
                "selective_scan (cpu): grad_last_state must be contiguous (batch, dim, dstate) in the math dtype");
  }
  const int64_t threads = at::get_num_threads();
  auto du = at::empty_like(u);
  auto ddelta = at::empty_like(delta);
  auto dz = z.has_value() ? at::empty_like(*z) : at::empty({0}, u.options());
  auto dA = at::zeros_like(A);
  auto dB_partial = at::zeros({threads, s.batch, s.ngroups, s.seqlen, s.dstate}, A.options());
  auto dC_partial = at::zeros_like(dB_partial);
  auto dD = at::empty({D.has_value() ? s.dim : 0}, A.options());
  auto ddelta_bias = at::empty({delta_bias.has_value() ? s.dim : 0}, A.options());
  auto dinitial_state = at::empty({s.batch, s.dim, s.dstate}, A.options());
  LNLM_DISPATCH_SCAN_TYPES(u.scalar_type(), "selective_scan_bwd (cpu)", [&] {
    backward_kernel<T, acc_t>(
        s, grad_out.const_data_ptr<T>(), optional_data<acc_t>(grad_last_state), u.const_data_ptr<T>(),
        delta.const_data_ptr<T>(), z ? z->const_data_ptr<T>() : nullptr, A.const_data_ptr<acc_t>(),
        B.const_data_ptr<acc_t>(), C.const_data_ptr<acc_t>(), optional_data<acc_t>(D), optional_data<acc_t>(delta_bias),
        checkpoints.const_data_ptr<acc_t>(), delta_softplus, du.mutable_data_ptr<T>(), ddelta.mutable_data_ptr<T>(),
        z ? dz.mutable_data_ptr<T>() : nullptr, dA.mutable_data_ptr<acc_t>(), dB_partial.mutable_data_ptr<acc_t>(),
        dC_partial.mutable_data_ptr<acc_t>(), D ? dD.mutable_data_ptr<acc_t>() : nullptr,
        delta_bias ? ddelta_bias.mutable_data_ptr<acc_t>() : nullptr, dinitial_state.mutable_data_ptr<acc_t>());
  });
  return {du, ddelta, dA, dB_partial.sum(0), dC_partial.sum(0), dD, dz, ddelta_bias, dinitial_state};
}

}  // namespace

TORCH_LIBRARY_IMPL(lnlm_ssm, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd);
  m.impl("selective_scan_bwd", &selective_scan_bwd);
}

}  // namespace lnlm_ssm
