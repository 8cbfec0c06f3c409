// The Mamba-1 selective scan on the CPU, forward and backward.
//
// Math: lnlm_ssm/ops/selective_scan/reference.py. Layout, as prepared by
// lnlm_ssm/ops/selective_scan/cpu.py (b batch, d dim, l seqlen, n dstate,
// g groups; channel d reads group d / (dim / g)):
//
//   u, delta, z, out, grad_out     (b, d, l)  contiguous, input dtype T
//   A                              (d, n)     contiguous, math dtype
//   B, C                           each either time-varying (b, g, l, n), contiguous,
//                                  time-major (so the n values of one step are
//                                  adjacent), or time-invariant (d, n); math dtype
//   D, delta_bias                  (d,)       math dtype
//   initial_state, last_state      (b, d, n)  math dtype
//   checkpoints                    (b, d, ceil(l / K), n): the state entering every
//                                  K-step chunk, saved by the forward for the backward
//
// Complex A (S4D-style) comes as real planes: every (..., n) above that holds a
// complex value is (..., 2, n) instead, real part then imaginary part (A (d, 2, n),
// B time-varying (b, g, l, 2, n) or time-invariant (d, 2, n), the states (b, d, 2, n),
// checkpoints (b, d, ceil(l / K), 2, n)), and y_t = 2 Re(C_t . h_t). Gradients of the
// planes are dL/d(real part) and dL/d(imaginary part): PyTorch's complex gradient
// once cpu.py puts the planes back together.
//
// The math dtype is float (double for double inputs). Work is split over
// channels d (each thread owns whole rows, so the per-channel gradients of A, D,
// delta_bias and of a time-invariant B or C need no reduction); the loops over
// dstate are written for the vectoriser. The backward walks the chunks in
// reverse, recomputing each chunk's states from its checkpoint, so it never
// holds (b, d, l, n).

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
#include <cmath>
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

// Sizes and forms of a call. The state row of a channel, S values, is n real
// states, or 2 n planes of n complex ones.
struct Sizes {
  int64_t batch, dim, seqlen, dstate, ngroups, chunk, nchunks;
  bool is_complex, var_B, var_C;

  Sizes(const at::Tensor& u, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C, int64_t checkpoint_every)
      : batch(u.size(0)),
        dim(u.size(1)),
        seqlen(u.size(2)),
        dstate(A.size(-1)),
        ngroups(1),
        chunk(checkpoint_every),
        nchunks(checkpoint_every > 0 ? (u.size(2) + checkpoint_every - 1) / checkpoint_every : 0),
        is_complex(A.dim() == 3),
        var_B(B.dim() != A.dim()),
        var_C(C.dim() != A.dim()) {
    // Only the time-varying ones are grouped (check_inputs makes them agree).
    if (var_B) {
      ngroups = B.size(1);
    } else if (var_C) {
      ngroups = C.size(1);
    }
  }

  int64_t channels_per_group() const {
    return dim / ngroups;
  }

  int64_t state_row() const {
    return is_complex ? 2 * dstate : dstate;
  }

  // Elements of one (batch, group) slice of a time-varying B or C.
  int64_t group_slice() const {
    return seqlen * state_row();
  }
};

// B or C: time-invariant, shaped like A, or time-varying (b, g, l, <A's state row>).
void check_projection(const char* name, const at::Tensor& M, const at::Tensor& u, const at::Tensor& A) {
  TORCH_CHECK(M.is_contiguous() && M.scalar_type() == A.scalar_type(), "selective_scan (cpu): ", name,
              " must be contiguous in the math dtype of A");
  if (M.dim() == A.dim()) {
    TORCH_CHECK(M.sizes() == A.sizes(), "selective_scan (cpu): a time-invariant ", name, " must be shaped like A");
    return;
  }
  TORCH_CHECK(M.dim() == A.dim() + 2 && M.size(0) == u.size(0) && M.size(2) == u.size(2) &&
                  M.sizes().slice(3) == A.sizes().slice(1),
              "selective_scan (cpu): a time-varying ", name, " must be (batch, ngroups, seqlen, <A's state row>)");
  TORCH_CHECK(u.size(1) % M.size(1) == 0, "selective_scan (cpu): dim must be divisible by ngroups");
}

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
  TORCH_CHECK((A.dim() == 2 || (A.dim() == 3 && A.size(1) == 2)) && A.size(0) == u.size(1) && A.is_contiguous(),
              "selective_scan (cpu): A must be contiguous (dim, dstate), or (dim, 2, dstate) when complex");
  TORCH_CHECK(A.size(-1) % kLanes == 0, "selective_scan (cpu): dstate must be padded to a multiple of ", kLanes);
  check_projection("B", B, u, A);
  check_projection("C", C, u, A);
  TORCH_CHECK(B.dim() == A.dim() || C.dim() == A.dim() || B.size(1) == C.size(1),
              "selective_scan (cpu): time-varying B and C must have the same ngroups");
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

// The real forward advances kChannels channels of one group together, one per
// vector lane: their time-varying B and C are shared (a time-invariant one has a
// value per lane), so each state element needs no horizontal sum, and the lanes'
// recurrences are independent (the backward, by contrast, vectorises along
// dstate, where dB and dC accumulate as whole vectors).
constexpr int64_t kChannels = 16;

// `len` steps of the recurrence for a block of channels, from state h (updated):
//   h[n][c] <- exp(dt[i][c] A[n][c]) h[n][c] + dtu[i][c] B_i[n][c],   y[i][c] = sum_n C_i[n][c] h[n][c]
// Layouts: aT, h (dstate, kChannels); dt, dtu, y (len, kChannels). A time-varying
// B or C (kVarB, kVarC) is time-major from step 0, one value per step and state
// shared by the lanes; a time-invariant one is (dstate, kChannels), one per lane.
template <bool kVarB, bool kVarC, typename acc_t>
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
      acc_t* __restrict__ hn = h + n * kChannels;
      const acc_t* __restrict__ an = aT + n * kChannels;
      const acc_t* __restrict__ bn = B + (kVarB ? i * N + n : n * kChannels);
      const acc_t* __restrict__ cn = C + (kVarC ? i * N + n : n * kChannels);
#pragma omp simd
      for (int64_t c = 0; c < kChannels; ++c) {
        const acc_t v = exp_vec(dti[c] * an[c]) * hn[c] + dtui[c] * bn[kVarB ? 0 : c];
        hn[c] = v;
        acc[c] += v * cn[kVarC ? 0 : c];
      }
    }
    std::copy_n(acc, kChannels, y + i * kChannels);
  }
}

// Rows d0 .. d0 + nc of a (dim, N) tensor laid out by lane, (N, kChannels); lanes past nc are 0.
template <typename acc_t>
void by_lane(const acc_t* M, int64_t d0, int64_t nc, int64_t N, std::vector<acc_t>& out) {
  std::fill(out.begin(), out.end(), acc_t(0));
  for (int64_t c = 0; c < nc; ++c) {
    for (int64_t n = 0; n < N; ++n) {
      out[n * kChannels + c] = M[(d0 + c) * N + n];
    }
  }
}

template <bool kVarB, bool kVarC, typename T, typename acc_t>
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
    std::vector<acc_t> bT(kVarB ? 0 : N * kChannels), cT(kVarC ? 0 : N * kChannels);
    acc_t dt[kBlock * kChannels], dtu[kBlock * kChannels], y[kBlock * kChannels], column[kBlock];
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t g = block / blocks_per_group;
      const int64_t d0 = g * P + (block % blocks_per_group) * kChannels;
      const int64_t nc = std::min(kChannels, (g + 1) * P - d0);
      by_lane(A, d0, nc, N, aT);
      if constexpr (!kVarB) {
        by_lane(B, d0, nc, N, bT);
      }
      if constexpr (!kVarC) {
        by_lane(C, d0, nc, N, cT);
      }
      for (int64_t b = 0; b < s.batch; ++b) {
        // A time-varying B or C moves on by N values per step; a time-invariant one stays.
        const acc_t* Bg = kVarB ? B + (b * s.ngroups + g) * L * N : bT.data();
        const acc_t* Cg = kVarC ? C + (b * s.ngroups + g) * L * N : cT.data();
        const int64_t b_step = kVarB ? N : 0, c_step = kVarC ? N : 0;
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
          recur_channels<kVarB, kVarC>(aT.data(), Bg + t0 * b_step, Cg + t0 * c_step, dt, dtu, len, N, h.data(), y);
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
// step i to hs[(i + 1) N ..] and exp(dt[i] A) to decays[i N ..]. B moves on by
// b_step values per step (0: time-invariant).
template <typename acc_t>
void recompute_states(
    const acc_t* __restrict__ a,
    const acc_t* __restrict__ B,
    int64_t b_step,
    const acc_t* __restrict__ dt,
    const acc_t* __restrict__ dtu,
    int64_t len,
    int64_t N,
    acc_t* __restrict__ hs,
    acc_t* __restrict__ decays) {
  for (int64_t i = 0; i < len; ++i) {
    const acc_t* __restrict__ Bi = B + i * b_step;
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
void readout(
    const acc_t* __restrict__ C, int64_t c_step, const acc_t* __restrict__ hs, int64_t len, int64_t N,
    acc_t* __restrict__ y) {
  for (int64_t i = 0; i < len; ++i) {
    const acc_t* __restrict__ Ci = C + i * c_step;
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
// gBu[i] = sum_n (d loss / d h_i)[n] B_i[n], and accumulates dA, dB and dC (dB
// and dC move on by b_step and c_step per step, as B and C do).
template <typename acc_t>
void backprop_states(
    const acc_t* __restrict__ a,
    const acc_t* __restrict__ B,
    int64_t b_step,
    const acc_t* __restrict__ C,
    int64_t c_step,
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
    const acc_t* __restrict__ Bi = B + i * b_step;
    const acc_t* __restrict__ Ci = C + i * c_step;
    const acc_t* __restrict__ prev = hs + i * N;
    const acc_t* __restrict__ cur = hs + (i + 1) * N;
    const acc_t* __restrict__ dec = decays + i * N;
    acc_t* __restrict__ dBi = dB + i * b_step;
    acc_t* __restrict__ dCi = dC + i * c_step;
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

// The complex counterparts of the three above. Every state row is two planes,
// [0, N) the real parts and [N, 2N) the imaginary ones, and so are a (A), B, C,
// the decays exp(dt A) and gh. The decay is exp(dt Re A) (cos(dt Im A) + i sin(dt Im A)).
template <typename acc_t>
void recompute_states_complex(
    const acc_t* __restrict__ a,
    const acc_t* __restrict__ B,
    int64_t b_step,
    const acc_t* __restrict__ dt,
    const acc_t* __restrict__ dtu,
    int64_t len,
    int64_t N,
    acc_t* __restrict__ hs,
    acc_t* __restrict__ decays) {
  const int64_t S = 2 * N;
  for (int64_t i = 0; i < len; ++i) {
    const acc_t* __restrict__ Bi = B + i * b_step;
    const acc_t* __restrict__ prev = hs + i * S;
    acc_t* __restrict__ next = hs + (i + 1) * S;
    acc_t* __restrict__ dec = decays + i * S;
    const acc_t dti = dt[i], dtui = dtu[i];
#pragma omp simd
    for (int64_t n = 0; n < N; ++n) {
      const acc_t magnitude = exp_vec(dti * a[n]), angle = dti * a[N + n];
      const acc_t dr = magnitude * std::cos(angle), di = magnitude * std::sin(angle);
      dec[n] = dr;
      dec[N + n] = di;
      next[n] = dr * prev[n] - di * prev[N + n] + dtui * Bi[n];
      next[N + n] = dr * prev[N + n] + di * prev[n] + dtui * Bi[N + n];
    }
  }
}

// y[i] = 2 Re(C_i . h_i) = 2 sum_n (Re C Re h - Im C Im h).
template <typename acc_t>
void readout_complex(
    const acc_t* __restrict__ C, int64_t c_step, const acc_t* __restrict__ hs, int64_t len, int64_t N,
    acc_t* __restrict__ y) {
  for (int64_t i = 0; i < len; ++i) {
    const acc_t* __restrict__ Ci = C + i * c_step;
    const acc_t* __restrict__ cur = hs + (i + 1) * 2 * N;
    acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; ++n) {
      acc += Ci[n] * cur[n] - Ci[N + n] * cur[N + n];
    }
    y[i] = 2 * acc;
  }
}

// With g = dL/dRe + i dL/dIm (PyTorch's complex gradient), a product w = p q
// sends conj(q) g_w to p, and a real r that w depends on gets Re(g_w conj(dw/dr)).
// Per step, with x = exp(dt A) h_{i-1}:
//   g_h   = (gradient from step i + 1) + 2 gy conj(C)     (y = 2 Re(C . h))
//   dC   += 2 gy conj(h_i)            dB += dt u g_h       dA += dt conj(x) g_h
//   g_dt += Re(g_h conj(A x)) + u Re(g_h conj(B))         g_Bu += Re(g_h conj(B))
//   gradient to step i - 1: conj(exp(dt A)) g_h
template <typename acc_t>
void backprop_states_complex(
    const acc_t* __restrict__ a,
    const acc_t* __restrict__ B,
    int64_t b_step,
    const acc_t* __restrict__ C,
    int64_t c_step,
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
  const int64_t S = 2 * N;
  for (int64_t i = len - 1; i >= 0; --i) {
    const acc_t* __restrict__ Bi = B + i * b_step;
    const acc_t* __restrict__ Ci = C + i * c_step;
    const acc_t* __restrict__ prev = hs + i * S;
    const acc_t* __restrict__ cur = hs + (i + 1) * S;
    const acc_t* __restrict__ dec = decays + i * S;
    acc_t* __restrict__ dBi = dB + i * b_step;
    acc_t* __restrict__ dCi = dC + i * c_step;
    const acc_t gy2 = 2 * gy[i], dti = dt[i], ui = u[i], dtui = dt[i] * u[i];
    acc_t g_dt = 0, g_bu = 0;
#pragma omp simd reduction(+ : g_dt, g_bu)
    for (int64_t n = 0; n < N; ++n) {
      const acc_t ghr = gh[n] + gy2 * Ci[n], ghi = gh[N + n] - gy2 * Ci[N + n];
      dCi[n] += gy2 * cur[n];
      dCi[N + n] -= gy2 * cur[N + n];
      const acc_t dr = dec[n], di = dec[N + n];
      const acc_t xr = dr * prev[n] - di * prev[N + n], xi = dr * prev[N + n] + di * prev[n];
      const acc_t axr = a[n] * xr - a[N + n] * xi, axi = a[n] * xi + a[N + n] * xr;
      const acc_t g_b = ghr * Bi[n] + ghi * Bi[N + n];
      g_dt += ghr * axr + ghi * axi + ui * g_b;
      g_bu += g_b;
      da[n] += dti * (xr * ghr + xi * ghi);
      da[N + n] += dti * (xr * ghi - xi * ghr);
      dBi[n] += dtui * ghr;
      dBi[N + n] += dtui * ghi;
      gh[n] = dr * ghr + di * ghi;
      gh[N + n] = dr * ghi - di * ghr;
    }
    gdt[i] = g_dt;
    gBu[i] = g_bu;
  }
}

// The forward for complex A, one row (batch, channel) at a time, vectorised
// along dstate like the backward (the lanes of the real forward share B and C
// between channels; complex A is a rarer, smaller case).
template <typename T, typename acc_t>
void forward_kernel_complex(
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
  const int64_t L = s.seqlen, N = s.dstate, S = s.state_row();
  const int64_t b_step = s.var_B ? S : 0, c_step = s.var_C ? S : 0;
  at::parallel_for(0, s.batch * s.dim, 1, [&](int64_t row_begin, int64_t row_end) {
    // A block's states (before and after each step) and decays, and its per-step scalars.
    std::vector<acc_t> h_buf((kBlock + 1) * S), decay_buf(kBlock * S);
    acc_t* hs = h_buf.data();
    acc_t dts[kBlock], dtus[kBlock], ys[kBlock];
    for (int64_t bd = row_begin; bd < row_end; ++bd) {
      const int64_t b = bd / s.dim, d = bd % s.dim, g = d / s.channels_per_group();
      const acc_t* Bp = s.var_B ? B + (b * s.ngroups + g) * s.group_slice() : B + d * S;
      const acc_t* Cp = s.var_C ? C + (b * s.ngroups + g) * s.group_slice() : C + d * S;
      const acc_t bias = delta_bias ? delta_bias[d] : acc_t(0);
      const acc_t skip = D ? D[d] : acc_t(0);
      if (initial_state) {
        std::copy_n(initial_state + bd * S, S, hs);
      } else {
        std::fill_n(hs, S, acc_t(0));
      }
      for (int64_t t0 = 0; t0 < L; t0 += kBlock) {
        const int64_t len = std::min(kBlock, L - t0);
        const int64_t row = bd * L + t0;
        if (checkpoints && t0 % s.chunk == 0) {
          std::copy_n(hs, S, checkpoints + (bd * s.nchunks + t0 / s.chunk) * S);
        }
        step_sizes(delta + row, len, bias, delta_softplus, dts, static_cast<acc_t*>(nullptr));
        for (int64_t i = 0; i < len; ++i) {
          dtus[i] = dts[i] * static_cast<acc_t>(u[row + i]);
        }
        recompute_states_complex(A + d * S, Bp + t0 * b_step, b_step, dts, dtus, len, N, hs, decay_buf.data());
        readout_complex(Cp + t0 * c_step, c_step, hs, len, N, ys);
        for (int64_t i = 0; i < len; ++i) {
          const acc_t yi = ys[i] + skip * static_cast<acc_t>(u[row + i]);
          if (z) {
            const acc_t zi = static_cast<acc_t>(z[row + i]);
            out[row + i] = static_cast<T>(yi * zi * sigmoid_vec(zi));
          } else {
            out[row + i] = static_cast<T>(yi);
          }
        }
        std::copy_n(hs + len * S, S, hs);  // the next block starts from the last state
      }
      std::copy_n(hs, S, last_state + bd * S);
    }
  });
}

// dB and dC: a time-varying one goes to the thread's own (b, g, l, <row>) slice of
// (threads, b, g, l, <row>), summed by the caller; a time-invariant one, (d, <row>),
// to the rows of the thread's own channels.
template <bool kComplex, typename T, typename acc_t>
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
    acc_t* dB,
    acc_t* dC,
    acc_t* dD,
    acc_t* ddelta_bias,
    acc_t* dinitial_state) {
  const int64_t L = s.seqlen, N = s.dstate, S = s.state_row(), K = s.chunk;
  const int64_t b_step = s.var_B ? S : 0, c_step = s.var_C ? S : 0;
  const int64_t varying_size = s.batch * s.ngroups * s.group_slice();
  at::parallel_for(0, s.dim, 1, [&](int64_t d_begin, int64_t d_end) {
    acc_t* dB_mine = s.var_B ? dB + at::get_thread_num() * varying_size : dB;
    acc_t* dC_mine = s.var_C ? dC + at::get_thread_num() * varying_size : dC;
    // One chunk's recomputed states (before and after each step) and decays,
    // and per-step scalars: step size, its derivative w.r.t. delta, u, the
    // gradient at y (through the gate), and the gradients of dt and of dt u.
    std::vector<acc_t> h_buf((K + 1) * S), decay_buf(K * S), step_buf(8 * K), gh_buf(S);
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
      const acc_t* a = A + d * S;
      const acc_t bias = delta_bias ? delta_bias[d] : acc_t(0);
      const acc_t skip = D ? D[d] : acc_t(0);
      const int64_t g = d / s.channels_per_group();
      acc_t dD_sum = 0, dbias_sum = 0;
      for (int64_t b = 0; b < s.batch; ++b) {
        const int64_t group_offset = (b * s.ngroups + g) * s.group_slice();
        const int64_t B_offset = s.var_B ? group_offset : d * S;
        const int64_t C_offset = s.var_C ? group_offset : d * S;
        if (grad_last) {
          std::copy_n(grad_last + (b * s.dim + d) * S, S, gh);
        } else {
          std::fill_n(gh, S, acc_t(0));
        }
        for (int64_t c = s.nchunks - 1; c >= 0; --c) {
          const int64_t t0 = c * K, len = std::min(K, L - t0);
          const int64_t row = (b * s.dim + d) * L + t0;
          const acc_t* Bc = B + B_offset + t0 * b_step;
          const acc_t* Cc = C + C_offset + t0 * c_step;
          step_sizes(delta + row, len, bias, delta_softplus, dts, ddts);
#pragma omp simd
          for (int64_t i = 0; i < len; ++i) {
            us[i] = static_cast<acc_t>(u[row + i]);
            dtus[i] = dts[i] * us[i];
            gys[i] = static_cast<acc_t>(grad_out[row + i]);
          }
          std::copy_n(checkpoints + ((b * s.dim + d) * s.nchunks + c) * S, S, hs);
          if constexpr (kComplex) {
            recompute_states_complex(a, Bc, b_step, dts, dtus, len, N, hs, decays);
          } else {
            recompute_states(a, Bc, b_step, dts, dtus, len, N, hs, decays);
          }
          if (z) {
            // out = y * silu(z), with y recomputed from the states.
            if constexpr (kComplex) {
              readout_complex(Cc, c_step, hs, len, N, ys);
            } else {
              readout(Cc, c_step, hs, len, N, ys);
            }
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) {
              const acc_t zi = static_cast<acc_t>(z[row + i]);
              const acc_t sg = sigmoid_vec(zi);
              const acc_t y = ys[i] + skip * us[i];
              dz[row + i] = static_cast<T>(gys[i] * y * sg * (acc_t(1) + zi * (acc_t(1) - sg)));
              gys[i] *= zi * sg;
            }
          }
          acc_t* dBc = dB_mine + B_offset + t0 * b_step;
          acc_t* dCc = dC_mine + C_offset + t0 * c_step;
          if constexpr (kComplex) {
            backprop_states_complex(
                a, Bc, b_step, Cc, c_step, hs, decays, dts, us, gys, len, N, gh, dA + d * S, dBc, dCc, gdts, gBus);
          } else {
            backprop_states(
                a, Bc, b_step, Cc, c_step, hs, decays, dts, us, gys, len, N, gh, dA + d * S, dBc, dCc, gdts, gBus);
          }
#pragma omp simd reduction(+ : dD_sum, dbias_sum)
          for (int64_t i = 0; i < len; ++i) {
            const acc_t g_delta = gdts[i] * ddts[i];
            ddelta[row + i] = static_cast<T>(g_delta);
            du[row + i] = static_cast<T>(gys[i] * skip + dts[i] * gBus[i]);
            dbias_sum += g_delta;
            dD_sum += gys[i] * us[i];
          }
        }
        std::copy_n(gh, S, dinitial_state + (b * s.dim + d) * S);
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

// (batch, dim, <A's state row>) and (batch, dim, nchunks, <A's state row>).
std::vector<int64_t> state_shape(const Sizes& s, const at::Tensor& A, bool chunked) {
  std::vector<int64_t> shape{s.batch, s.dim};
  if (chunked) {
    shape.push_back(s.nchunks);
  }
  shape.insert(shape.end(), A.sizes().begin() + 1, A.sizes().end());
  return shape;
}

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
  const Sizes s(u, A, B, C, checkpoint_every);
  if (initial_state.has_value()) {
    TORCH_CHECK(initial_state->is_contiguous() && initial_state->sizes() == at::IntArrayRef(state_shape(s, A, false)) &&
                    initial_state->scalar_type() == A.scalar_type(),
                "selective_scan (cpu): initial_state must be contiguous (batch, dim, <A's state row>) in the math "
                "dtype");
  }
  auto out = at::empty_like(u);
  auto last_state = at::empty(state_shape(s, A, false), A.options());
  auto checkpoints = at::empty(state_shape(s, A, true), A.options());
  LNLM_DISPATCH_SCAN_TYPES(u.scalar_type(), "selective_scan_fwd (cpu)", [&] {
    const auto launch = [&](auto kernel) {
      kernel(s, u.const_data_ptr<T>(), delta.const_data_ptr<T>(), z ? z->const_data_ptr<T>() : nullptr,
             A.const_data_ptr<acc_t>(), B.const_data_ptr<acc_t>(), C.const_data_ptr<acc_t>(), optional_data<acc_t>(D),
             optional_data<acc_t>(delta_bias), optional_data<acc_t>(initial_state), delta_softplus,
             out.mutable_data_ptr<T>(), last_state.mutable_data_ptr<acc_t>(),
             checkpoint_every > 0 ? checkpoints.mutable_data_ptr<acc_t>() : nullptr);
    };
    // The real forward has one kernel per form of B and C (time-varying or not).
    if (s.is_complex) {
      launch(forward_kernel_complex<T, acc_t>);
    } else if (s.var_B && s.var_C) {
      launch(forward_kernel<true, true, T, acc_t>);
    } else if (s.var_B) {
      launch(forward_kernel<true, false, T, acc_t>);
    } else if (s.var_C) {
      launch(forward_kernel<false, true, T, acc_t>);
    } else {
      launch(forward_kernel<false, false, T, acc_t>);
    }
  });
  return {out, last_state, checkpoints};
}

// dB or dC before the backward: a time-varying one gets one zeroed copy per thread, summed after.
at::Tensor projection_grad_buffer(const at::Tensor& M, bool varying, int64_t threads) {
  if (!varying) {
    return at::zeros_like(M);
  }
  std::vector<int64_t> shape{threads};
  shape.insert(shape.end(), M.sizes().begin(), M.sizes().end());
  return at::zeros(shape, M.options());
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
  const Sizes s(u, A, B, C, checkpoint_every);
  TORCH_CHECK(checkpoints.is_contiguous() && checkpoints.sizes() == at::IntArrayRef(state_shape(s, A, true)),
              "selective_scan (cpu): checkpoints do not match the inputs");
  if (grad_last_state.has_value()) {
    TORCH_CHECK(grad_last_state->is_contiguous() &&
                    grad_last_state->sizes() == at::IntArrayRef(state_shape(s, A, false)) &&
                    grad_last_state->scalar_type() == A.scalar_type(),
                "selective_scan (cpu): grad_last_state must be contiguous (batch, dim, <A's state row>) in the math "
                "dtype");
  }
  const int64_t threads = at::get_num_threads();
  auto du = at::empty_like(u);
  auto ddelta = at::empty_like(delta);
  auto dz = z.has_value() ? at::empty_like(*z) : at::empty({0}, u.options());
  auto dA = at::zeros_like(A);
  auto dB = projection_grad_buffer(B, s.var_B, threads);
  auto dC = projection_grad_buffer(C, s.var_C, threads);
  auto dD = at::empty({D.has_value() ? s.dim : 0}, A.options());
  auto ddelta_bias = at::empty({delta_bias.has_value() ? s.dim : 0}, A.options());
  auto dinitial_state = at::empty(state_shape(s, A, false), A.options());
  LNLM_DISPATCH_SCAN_TYPES(u.scalar_type(), "selective_scan_bwd (cpu)", [&] {
    const auto run = s.is_complex ? &backward_kernel<true, T, acc_t> : &backward_kernel<false, T, acc_t>;
    run(s, grad_out.const_data_ptr<T>(), optional_data<acc_t>(grad_last_state), u.const_data_ptr<T>(),
        delta.const_data_ptr<T>(), z ? z->const_data_ptr<T>() : nullptr, A.const_data_ptr<acc_t>(),
        B.const_data_ptr<acc_t>(), C.const_data_ptr<acc_t>(), optional_data<acc_t>(D), optional_data<acc_t>(delta_bias),
        checkpoints.const_data_ptr<acc_t>(), delta_softplus, du.mutable_data_ptr<T>(), ddelta.mutable_data_ptr<T>(),
        z ? dz.mutable_data_ptr<T>() : nullptr, dA.mutable_data_ptr<acc_t>(), dB.mutable_data_ptr<acc_t>(),
        dC.mutable_data_ptr<acc_t>(), D ? dD.mutable_data_ptr<acc_t>() : nullptr,
        delta_bias ? ddelta_bias.mutable_data_ptr<acc_t>() : nullptr, dinitial_state.mutable_data_ptr<acc_t>());
  });
  return {du, ddelta, dA, s.var_B ? dB.sum(0) : dB, s.var_C ? dC.sum(0) : dC, dD, dz, ddelta_bias, dinitial_state};
}

}  // namespace

TORCH_LIBRARY_IMPL(lnlm_ssm, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd);
  m.impl("selective_scan_bwd", &selective_scan_bwd);
}

}  // namespace lnlm_ssm
