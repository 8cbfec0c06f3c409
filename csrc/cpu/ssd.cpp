// The Mamba-2 SSD chunked scan on the CPU, forward and backward.
//
// Math: lnlm_ssm/ops/ssd/reference.py (mamba_chunk_scan_ref). Layout, as
// prepared by lnlm_ssm/ops/ssd/cpu.py (b batch, l seqlen, h heads, p headdim,
// g groups, n dstate, c chunks; head i reads group i / (h / g)):
//
//   x, z, out, grad_out, dx, dz   (b, l, h, p)  contiguous, input dtype T
//   dt, ddt                       (b, l, h)     contiguous, math dtype (dt before bias/softplus/limit)
//   A, dt_bias                    (h,)          math dtype
//   D                             (h, p)        math dtype
//   B, C, dB, dC                  (b, l, g, n)  contiguous, math dtype
//   seq_idx                       (b, l)        int64, non-decreasing along l
//   initial_states, final_states  (b, h, p, n)  math dtype
//   chunk_states                  (b, h, c, p, n): the state entering each chunk, saved by
//                                 the forward for the backward (and an output: the varlen
//                                 states are made from it, so it may have a gradient)
//
// The math dtype is float (double for double inputs). Per (batch, chunk,
// head), with the chunk's steps t, s and cum_t = Σ_{k≤t} Δ_k A:
//
//   y      = (C B^T ∘ L) (Δ X) + diag(exp(cum)) C H^T        L[t,s] = exp(cum_t - cum_s), s ≤ t
//   H_next = exp(cum_end) H + Σ_s Δ_s exp(cum_end - cum_s) X_s ⊗ B_s
//
// where H is the state entering the chunk (restricted to the packed sequences
// it belongs to, see ChunkSeq). The matrix products run through ATen's CPU
// gemm (MKL or its equivalent) on one chunk at a time, inside
// at::parallel_for, so that every T x T matrix lives in one thread's cache and
// (b, h, c, T, T) is never materialised; C B^T is computed once for the heads
// of a group. The forward runs in three passes: each chunk's own contribution
// to the state (parallel), the state passing along the chunks (parallel over
// rows and heads), then the outputs (parallel). The backward mirrors it: the
// gradient at y and each chunk's share of its entering state's gradient, the
// reverse state passing, then everything else. It recomputes the decays and,
// when there is a gate z, y.
//
// Numerics: cum is summed in double and kept as a float pair (hi + lo), so
// that cum_t - cum_s stays exact for nearby t, s however large cum grows; exp
// only ever sees s ≤ t of one packed sequence (the mask is applied to its
// argument), never a large positive number; decays below e^-40 are flushed
// to 0 (see decay_exp).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "vec_math.h"

namespace lnlm_ssm {
namespace {

constexpr const char* kOp = "ssd_chunk_scan (cpu)";

// Row blocks of the triangular products: block [r0, r1) of a chunk's
// lower-triangular matrix only meets the columns [0, r1), which skips 3/8 of
// the work at chunk 256 while each gemm stays big enough to run near peak.
constexpr int64_t kBlock = 64;

// ---------------------------------------------------------------- matmul

// c (m x n, row stride ldc) = op(a) op(b), or += when `accumulate`. op(a) is
// m x k: a[i * lda + j], or a[j * lda + i] when `trans_a`; likewise op(b), k x n.
template <typename acc_t>
void matmul(
    int64_t m,
    int64_t n,
    int64_t k,
    const acc_t* a,
    int64_t lda,
    bool trans_a,
    const acc_t* b,
    int64_t ldb,
    bool trans_b,
    acc_t* c,
    int64_t ldc,
    bool accumulate) {
  if (m <= 0 || n <= 0) {
    return;
  }
  if (k <= 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) {
        std::fill_n(c + i * ldc, n, acc_t(0));
      }
    }
    return;
  }
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto strides = [](bool trans, int64_t ld) { return trans ? std::vector<int64_t>{1, ld} : std::vector<int64_t>{ld, 1}; };
  const at::Tensor lhs = at::from_blob(const_cast<acc_t*>(a), {m, k}, strides(trans_a, lda), options);
  const at::Tensor rhs = at::from_blob(const_cast<acc_t*>(b), {k, n}, strides(trans_b, ldb), options);
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  if (accumulate) {
    at::cpu::addmm_(out, lhs, rhs);
  } else {
    at::cpu::mm_out(out, lhs, rhs);
  }
}

// y (len x w) = M x (or +=), M lower-triangular (len x len) with zeros above
// the diagonal inside each row block.
template <typename acc_t>
void lower_mm(int64_t len, int64_t w, const acc_t* M, int64_t ldm, const acc_t* x, int64_t ldx, acc_t* y, int64_t ldy, bool accumulate) {
  for (int64_t r0 = 0; r0 < len; r0 += kBlock) {
    const int64_t r1 = std::min(len, r0 + kBlock);
    matmul(r1 - r0, w, r1, M + r0 * ldm, ldm, false, x, ldx, false, y + r0 * ldy, ldy, accumulate);
  }
}

// y (len x w) = M^T x (or +=), M as in lower_mm.
template <typename acc_t>
void lower_t_mm(int64_t len, int64_t w, const acc_t* M, int64_t ldm, const acc_t* x, int64_t ldx, acc_t* y, int64_t ldy, bool accumulate) {
  for (int64_t c0 = 0; c0 < len; c0 += kBlock) {
    const int64_t c1 = std::min(len, c0 + kBlock);
    matmul(c1 - c0, w, len - c0, M + c0 * ldm + c0, ldm, true, x + c0 * ldx, ldx, false, y + c0 * ldy, ldy, accumulate);
  }
}

// out = u v^T (len x len, u and v: len x k) on the row blocks' columns
// [0, r1) only: the lower triangle and the diagonal blocks.
template <typename acc_t>
void lower_outer(int64_t len, int64_t k, const acc_t* u, int64_t ldu, const acc_t* v, int64_t ldv, acc_t* out, int64_t ldo) {
  for (int64_t r0 = 0; r0 < len; r0 += kBlock) {
    const int64_t r1 = std::min(len, r0 + kBlock);
    matmul(r1 - r0, r1, k, u + r0 * ldu, ldu, false, v, ldv, true, out + r0 * ldo, ldo, false);
  }
}

// ---------------------------------------------------------------- problem

struct Problem {
  int64_t batch, seqlen, nheads, headdim, ngroups, dstate, chunk, nchunks;
  int64_t heads_per_group, heads_per_block, head_blocks;
  bool dt_softplus;
  double dt_min, dt_max;

  Problem(const at::Tensor& x, const at::Tensor& B, int64_t chunk_size, bool softplus, double lo, double hi)
      : batch(x.size(0)),
        seqlen(x.size(1)),
        nheads(x.size(2)),
        headdim(x.size(3)),
        ngroups(B.size(2)),
        dstate(B.size(3)),
        chunk(chunk_size),
        nchunks((x.size(1) + chunk_size - 1) / chunk_size),
        heads_per_group(x.size(2) / B.size(2)),
        dt_softplus(softplus),
        dt_min(lo),
        dt_max(hi) {
    // The heads of a group share C B^T, computed once per task: a task takes
    // a block of a group's heads, split finer only when (batch, chunk, group)
    // alone gives too few tasks to keep every thread busy.
    const int64_t tasks = std::max<int64_t>(1, batch * nchunks * ngroups);
    const int64_t wanted = (4 * at::get_num_threads() + tasks - 1) / tasks;
    const int64_t blocks = std::max<int64_t>(1, std::min(wanted, heads_per_group));
    heads_per_block = std::max<int64_t>(1, (heads_per_group + blocks - 1) / blocks);
    head_blocks = (heads_per_group + heads_per_block - 1) / heads_per_block;
  }

  int64_t group_tasks() const {
    return batch * nchunks * ngroups * head_blocks;
  }
  // Offsets of step t of row b in the (b, l, h, ...) and (b, l, g, n) layouts.
  int64_t x_row(int64_t b, int64_t t, int64_t h) const {
    return ((b * seqlen + t) * nheads + h) * headdim;
  }
  int64_t bc_row(int64_t b, int64_t t, int64_t g) const {
    return ((b * seqlen + t) * ngroups + g) * dstate;
  }
  int64_t state(int64_t b, int64_t h, int64_t c) const {
    return ((b * nheads + h) * nchunks + c) * headdim * dstate;
  }
};

// A task of the grouped passes: (batch, chunk, group, block of the group's heads).
struct GroupTask {
  int64_t b, c, g, head_begin, head_end;

  GroupTask(const Problem& P, int64_t task) {
    const int64_t block = task % P.head_blocks;
    const int64_t bcg = task / P.head_blocks;
    g = bcg % P.ngroups;
    c = (bcg / P.ngroups) % P.nchunks;
    b = bcg / (P.ngroups * P.nchunks);
    head_begin = g * P.heads_per_group + block * P.heads_per_block;
    head_end = std::min(head_begin + P.heads_per_block, (g + 1) * P.heads_per_group);
  }
};

// Where the packed sequences of one row start inside one chunk. seq_idx is
// non-decreasing, so the steps of one sequence are a run: step t sees steps
// [start[t], t] of the chunk. The state entering the chunk belongs to the
// sequence of the step before it (of step 0 for the first chunk) and reaches
// the first `enter_len` steps; the state leaving it holds the inputs of steps
// [tail_start, len) only.
struct ChunkSeq {
  int64_t t0 = 0, len = 0, enter_len = 0, tail_start = 0;
  std::vector<int64_t> start;

  void init(const Problem& P, const int64_t* seq_idx, int64_t b, int64_t c) {
    t0 = c * P.chunk;
    len = std::min(P.chunk, P.seqlen - t0);
    start.assign(len, 0);
    if (!seq_idx) {
      enter_len = len;
      tail_start = 0;
      return;
    }
    const int64_t* seq = seq_idx + b * P.seqlen + t0;
    for (int64_t t = 1; t < len; ++t) {
      start[t] = seq[t] == seq[t - 1] ? start[t - 1] : t;
    }
    const int64_t entering = t0 > 0 ? seq[-1] : seq[0];
    enter_len = 0;
    while (enter_len < len && seq[enter_len] == entering) {
      ++enter_len;
    }
    tail_start = start[len - 1];
  }
};

// exp of a log-decay (<= 0 for a stable SSM; -inf for a masked entry), with
// the decays below e^-40 (4e-18, under half an ulp of the undecayed 1 even in
// double) flushed to 0. Their products would otherwise reach the subnormal
// range, where every multiply takes a microcode assist: a 256 x 256 x 64 sgemm
// on subnormal inputs runs ~170x slower, and strong decay makes most of a
// chunk's decays that small. exp_vec itself only sees arguments >= -40, as its
// result for the smallest ones is subnormal too.
template <typename acc_t>
inline acc_t decay_exp(acc_t v) {
  constexpr acc_t kFloor = -40;
  const acc_t e = exp_vec(v < kFloor ? kFloor : v);
  return v < kFloor ? acc_t(0) : e;
}

// Per-step scalars of one (batch, chunk, head).
template <typename acc_t>
struct Steps {
  std::vector<acc_t> u;         // Δ_t
  std::vector<acc_t> du_ddt;    // dΔ_t / d dt_t (backward only)
  std::vector<acc_t> hi, lo;    // cum_t = hi_t + lo_t
  std::vector<acc_t> enter;     // exp(cum_t) where the entering state reaches t, else 0
  std::vector<acc_t> leave;     // exp(cum_end - cum_t) where step t reaches the leaving state, else 0
  std::vector<acc_t> to_block;  // exp(cum_e - cum_t), e the last step of t's block of kBlock steps
  acc_t decay = 0;              // exp(cum_end) if the state survives the chunk, else 0

  explicit Steps(int64_t T) : u(T), du_ddt(T), hi(T), lo(T), enter(T), leave(T), to_block(T) {}

  // cum_t - cum_s
  acc_t between(int64_t t, int64_t s) const {
    return (hi[t] - hi[s]) + (lo[t] - lo[s]);
  }

  // Δ = clamp(softplus(dt + dt_bias)) along the chunk of head h, then the
  // prefix sums of Δ A and the decays built from them. (One simple loop per
  // quantity, on raw pointers, so that each vectorises.)
  void compute(const Problem& P, const ChunkSeq& cs, const acc_t* dt, acc_t A, acc_t bias, bool derivative) {
    const int64_t len = cs.len, stride = P.nheads;
    const acc_t dt_min = static_cast<acc_t>(P.dt_min), dt_max = static_cast<acc_t>(P.dt_max);
    acc_t* __restrict__ raw = du_ddt.data();  // dt + dt_bias, until it is replaced by the derivative
    acc_t* __restrict__ delta = u.data();
    for (int64_t t = 0; t < len; ++t) {
      raw[t] = dt[t * stride] + bias;
    }
    if (P.dt_softplus) {
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) {
        delta[t] = softplus_vec(raw[t]);
      }
    } else {
      std::copy_n(raw, len, delta);
    }
    if (derivative) {
      // d clamp(v) / dv is 1 inside [dt_min, dt_max] and 0 outside; d softplus(r) / dr = sigmoid(r).
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) {
        const acc_t v = delta[t], r = raw[t];
        const acc_t dsoft = P.dt_softplus ? (r > acc_t(20) ? acc_t(1) : sigmoid_vec(r)) : acc_t(1);
        raw[t] = (v >= dt_min && v <= dt_max) ? dsoft : acc_t(0);
      }
    }
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      delta[t] = std::min(std::max(delta[t], dt_min), dt_max);
    }
    acc_t* __restrict__ h = hi.data();
    acc_t* __restrict__ l = lo.data();
    double sum = 0;
    for (int64_t t = 0; t < len; ++t) {
      sum += static_cast<double>(delta[t] * A);
      h[t] = static_cast<acc_t>(sum);
      l[t] = static_cast<acc_t>(sum - static_cast<double>(h[t]));
    }
    const int64_t end = len - 1;
    const acc_t h_end = h[end], l_end = l[end];
    acc_t* __restrict__ e_in = enter.data();
    acc_t* __restrict__ e_out = leave.data();
    acc_t* __restrict__ e_block = to_block.data();
    const int64_t el = cs.enter_len, ts = cs.tail_start;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      e_in[t] = decay_exp(t < el ? h[t] + l[t] : -std::numeric_limits<acc_t>::infinity());
    }
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      e_out[t] = decay_exp(t >= ts ? (h_end - h[t]) + (l_end - l[t]) : -std::numeric_limits<acc_t>::infinity());
    }
    for (int64_t b0 = 0; b0 < len; b0 += kBlock) {
      const int64_t b1 = std::min(len, b0 + kBlock);
      const acc_t h_b = h[b1 - 1], l_b = l[b1 - 1];
#pragma omp simd
      for (int64_t t = b0; t < b1; ++t) {
        e_block[t] = decay_exp((h_b - h[t]) + (l_b - l[t]));
      }
    }
    decay = cs.enter_len == len ? decay_exp(hi[end] + lo[end]) : acc_t(0);
  }
};

// M[t, s] = CB[t, s] L[t, s], L[t, s] = exp(cum_t - cum_s) for s in [start_t, t]
// and 0 elsewhere in the row's columns [0, r1) (see lower_mm); L is stored
// too when asked (the backward needs it). Left of the diagonal block, with e
// the last step of s's block, L[t, s] = exp(cum_t - cum_e) exp(cum_e - cum_s):
// one exp per row and block of columns instead of one per entry. Both factors
// are decays over steps in order (e < t, s <= e), so neither can overflow
// where L does not.
template <typename acc_t>
void decay_matrix(const ChunkSeq& cs, const Steps<acc_t>& st, const acc_t* CB, int64_t ld, acc_t* M, acc_t* L) {
  const acc_t* __restrict__ to_block = st.to_block.data();
  const acc_t* __restrict__ hi = st.hi.data();
  const acc_t* __restrict__ lo = st.lo.data();
  for (int64_t t = 0; t < cs.len; ++t) {
    const int64_t s0 = cs.start[t], r0 = t / kBlock * kBlock, r1 = std::min(cs.len, r0 + kBlock);
    const acc_t* __restrict__ cb = CB + t * ld;
    acc_t* m = M + t * ld;
    acc_t* l = L ? L + t * ld : m;  // without L, m holds L until it is scaled by CB
    for (int64_t c0 = 0; c0 < r0; c0 += kBlock) {
      const acc_t f = s0 < c0 + kBlock ? decay_exp(st.between(t, c0 + kBlock - 1)) : acc_t(0);
#pragma omp simd
      for (int64_t s = c0; s < c0 + kBlock; ++s) {
        l[s] = s >= s0 ? f * to_block[s] : acc_t(0);
      }
    }
    const acc_t hi_t = hi[t], lo_t = lo[t];
    // The mask is applied to the exponent: exp never sees s > t (nor another sequence).
#pragma omp simd
    for (int64_t s = r0; s <= t; ++s) {
      l[s] = decay_exp(s >= s0 ? (hi_t - hi[s]) + (lo_t - lo[s]) : -std::numeric_limits<acc_t>::infinity());
    }
    std::fill(l + t + 1, l + r1, acc_t(0));
#pragma omp simd
    for (int64_t s = 0; s < r1; ++s) {
      m[s] = cb[s] * l[s];
    }
  }
}

// The heads of a task are processed in tiles of up to kTile: a tile's rows of
// x (and z, grad_out, out, ...) are read and written one step at a time,
// kTile * p contiguous values, rather than one head's p values at a stride of
// h * p, where every row is a new cache miss that the prefetchers do not see
// coming.
constexpr int64_t kTile = 8;

// Heads [h0, h0 + nh) of steps [t0, t0 + len) of row b of a (b, l, h, p)
// tensor -> dst (nh, len, p) in the math dtype.
template <typename T, typename acc_t>
void gather_heads(const Problem& P, const T* src, int64_t b, int64_t t0, int64_t len, int64_t h0, int64_t nh, acc_t* dst) {
  const int64_t p = P.headdim;
  for (int64_t t = 0; t < len; ++t) {
    const T* row = src + P.x_row(b, t0 + t, h0);
    for (int64_t k = 0; k < nh; ++k) {
      const T* __restrict__ s = row + k * p;
      acc_t* __restrict__ d = dst + (k * len + t) * p;
#pragma omp simd
      for (int64_t j = 0; j < p; ++j) {
        d[j] = static_cast<acc_t>(s[j]);
      }
    }
  }
}

template <typename T, typename acc_t>
struct Inputs {
  const T* x;
  const acc_t* dt;
  const acc_t* A;
  const acc_t* B;
  const acc_t* C;
  const acc_t* D;
  const T* z;
  const acc_t* dt_bias;
  const int64_t* seq_idx;

  acc_t bias(int64_t h) const {
    return dt_bias ? dt_bias[h] : acc_t(0);
  }
  const acc_t* dt_row(const Problem& P, int64_t b, int64_t t0, int64_t h) const {
    return dt + (b * P.seqlen + t0) * P.nheads + h;
  }
};

// Per-thread scratch of the grouped passes (T = chunk, p = headdim, n = dstate).
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> CB, M, L, dM, dG;       // T x T
  std::vector<acc_t> X, Y;                   // kTile x T x p: the tile's x, and its y (or dx)
  std::vector<acc_t> Xdt, dXdt, dXw, Xw;     // T x p
  std::vector<acc_t> Cs, dCi;                // T x n
  std::vector<acc_t> cols, da, denter, du, dw;  // T
  std::vector<acc_t> zeros;                  // p: stands in for an absent D, and for dXw's rows before the tail
  std::vector<Steps<acc_t>> steps;           // kTile: the tile's heads

  Scratch(const Problem& P, bool backward)
      : CB(P.chunk * P.chunk),
        M(P.chunk * P.chunk),
        X(kTile * P.chunk * P.headdim),
        Y(kTile * P.chunk * P.headdim),
        Xdt(P.chunk * P.headdim),
        Cs(P.chunk * P.dstate),
        zeros(P.headdim, acc_t(0)),
        steps(kTile, Steps<acc_t>(P.chunk)) {
    if (backward) {
      const int64_t T = P.chunk, p = P.headdim, n = P.dstate;
      for (auto* v : {&L, &dM, &dG}) {
        v->resize(T * T);
      }
      for (auto* v : {&dXdt, &dXw, &Xw}) {
        v->resize(T * p);
      }
      dCi.resize(T * n);
      for (auto* v : {&cols, &da, &denter, &du, &dw}) {
        v->resize(T);
      }
    }
  }
};

// The chunk's C B^T for group g, on the lower row blocks.
template <typename T, typename acc_t>
void group_scores(const Problem& P, const Inputs<T, acc_t>& in, const GroupTask& task, const ChunkSeq& cs, acc_t* CB) {
  const int64_t off = P.bc_row(task.b, cs.t0, task.g), ld = P.ngroups * P.dstate;
  lower_outer(cs.len, P.dstate, in.C + off, ld, in.B + off, ld, CB, P.chunk);
}

// y of one head over the chunk (without D and the gate) into Y (len x p), from
// its x in X (len x p) and its entering state H (p x n). Leaves Δ X in ws.Xdt
// and the decay matrix in ws.M (and L in ws.L when it has room).
template <typename T, typename acc_t>
void head_output(
    const Problem& P,
    const Inputs<T, acc_t>& in,
    const GroupTask& task,
    const ChunkSeq& cs,
    const Steps<acc_t>& st,
    const acc_t* H,
    const acc_t* X,
    acc_t* Y,
    Scratch<acc_t>& ws) {
  const int64_t len = cs.len, p = P.headdim, n = P.dstate;
  for (int64_t t = 0; t < len; ++t) {
    const acc_t ut = st.u[t];
    const acc_t* __restrict__ xr = X + t * p;
    acc_t* __restrict__ xd = ws.Xdt.data() + t * p;
#pragma omp simd
    for (int64_t j = 0; j < p; ++j) {
      xd[j] = ut * xr[j];
    }
  }
  decay_matrix(cs, st, ws.CB.data(), P.chunk, ws.M.data(), ws.L.empty() ? nullptr : ws.L.data());
  lower_mm(len, p, ws.M.data(), P.chunk, ws.Xdt.data(), p, Y, p, false);
  // The entering state, decayed to each step it reaches, read out through C.
  const int64_t el = cs.enter_len, ldc = P.ngroups * n;
  const acc_t* Cg = in.C + P.bc_row(task.b, cs.t0, task.g);
  for (int64_t t = 0; t < el; ++t) {
    const acc_t e = st.enter[t];
    const acc_t* __restrict__ cr = Cg + t * ldc;
    acc_t* __restrict__ cs_row = ws.Cs.data() + t * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      cs_row[j] = e * cr[j];
    }
  }
  matmul(el, p, n, ws.Cs.data(), n, false, H, n, true, Y, p, true);
}

// ---------------------------------------------------------------- forward

// Pass 1: each chunk's own contribution to the state leaving it, written
// where pass 2 will put the entering state; and its decay. Tasks: (batch,
// chunk, tile of heads).
template <typename T, typename acc_t>
void chunk_contributions(const Problem& P, const Inputs<T, acc_t>& in, acc_t* states, acc_t* decays) {
  const int64_t p = P.headdim, n = P.dstate, tiles = (P.nheads + kTile - 1) / kTile;
  at::parallel_for(0, P.batch * P.nchunks * tiles, 1, [&](int64_t begin, int64_t end) {
    ChunkSeq cs;
    Steps<acc_t> st(P.chunk);
    std::vector<acc_t> X(kTile * P.chunk * p);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task % tiles, c = (task / tiles) % P.nchunks, b = task / (tiles * P.nchunks);
      const int64_t h0 = tile * kTile, nh = std::min(kTile, P.nheads - h0);
      cs.init(P, in.seq_idx, b, c);
      // Only the steps of the chunk's last sequence reach the state leaving it.
      const int64_t ts = cs.tail_start, rows = cs.len - ts;
      gather_heads(P, in.x, b, cs.t0 + ts, rows, h0, nh, X.data());
      for (int64_t k = 0; k < nh; ++k) {
        const int64_t h = h0 + k;
        st.compute(P, cs, in.dt_row(P, b, cs.t0, h), in.A[h], in.bias(h), false);
        acc_t* Xw = X.data() + k * rows * p;
        for (int64_t i = 0; i < rows; ++i) {
          const acc_t w = st.u[ts + i] * st.leave[ts + i];
          acc_t* __restrict__ xr = Xw + i * p;
#pragma omp simd
          for (int64_t j = 0; j < p; ++j) {
            xr[j] *= w;
          }
        }
        matmul(p, n, rows, Xw, p, true, in.B + P.bc_row(b, cs.t0 + ts, h / P.heads_per_group), P.ngroups * n, false,
               states + P.state(b, h, c), n, false);
        decays[(b * P.nheads + h) * P.nchunks + c] = st.decay;
      }
    }
  });
}

// Pass 2: along the chunks of each (row, head), replace each contribution by
// the state entering the chunk; the state after the last chunk is the final one.
template <typename acc_t>
void pass_states(const Problem& P, const acc_t* initial, const acc_t* decays, acc_t* states, acc_t* final_states) {
  const int64_t size = P.headdim * P.dstate;
  at::parallel_for(0, P.batch * P.nheads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> own(size);
    for (int64_t bh = begin; bh < end; ++bh) {
      acc_t* __restrict__ h = final_states + bh * size;
      if (initial) {
        std::copy_n(initial + bh * size, size, h);
      } else {
        std::fill_n(h, size, acc_t(0));
      }
      for (int64_t c = 0; c < P.nchunks; ++c) {
        acc_t* __restrict__ slot = states + (bh * P.nchunks + c) * size;
        const acc_t decay = decays[bh * P.nchunks + c];
        std::copy_n(slot, size, own.data());
        std::copy_n(h, size, slot);
#pragma omp simd
        for (int64_t i = 0; i < size; ++i) {
          h[i] = decay * h[i] + own[i];
        }
      }
    }
  });
}

// Pass 3: the outputs, with D and the gate.
template <typename T, typename acc_t>
void outputs(const Problem& P, const Inputs<T, acc_t>& in, const acc_t* states, T* out) {
  const int64_t p = P.headdim;
  at::parallel_for(0, P.group_tasks(), 1, [&](int64_t begin, int64_t end) {
    ChunkSeq cs;
    Scratch<acc_t> ws(P, false);
    for (int64_t index = begin; index < end; ++index) {
      const GroupTask task(P, index);
      cs.init(P, in.seq_idx, task.b, task.c);
      const int64_t len = cs.len;
      group_scores(P, in, task, cs, ws.CB.data());
      for (int64_t h0 = task.head_begin; h0 < task.head_end; h0 += kTile) {
        const int64_t nh = std::min(kTile, task.head_end - h0);
        gather_heads(P, in.x, task.b, cs.t0, len, h0, nh, ws.X.data());
        for (int64_t k = 0; k < nh; ++k) {
          const int64_t h = h0 + k;
          Steps<acc_t>& st = ws.steps[k];
          st.compute(P, cs, in.dt_row(P, task.b, cs.t0, h), in.A[h], in.bias(h), false);
          head_output(P, in, task, cs, st, states + P.state(task.b, h, task.c), ws.X.data() + k * len * p,
                      ws.Y.data() + k * len * p, ws);
        }
        for (int64_t t = 0; t < len; ++t) {
          const int64_t row = P.x_row(task.b, cs.t0 + t, h0);
          for (int64_t k = 0; k < nh; ++k) {
            const acc_t* __restrict__ D = in.D ? in.D + (h0 + k) * p : ws.zeros.data();
            const acc_t* __restrict__ y = ws.Y.data() + (k * len + t) * p;
            const acc_t* __restrict__ xr = ws.X.data() + (k * len + t) * p;
            T* __restrict__ o = out + row + k * p;
            if (in.z) {
              const T* __restrict__ zr = in.z + row + k * p;
#pragma omp simd
              for (int64_t j = 0; j < p; ++j) {
                const acc_t zj = static_cast<acc_t>(zr[j]);
                o[j] = static_cast<T>((y[j] + D[j] * xr[j]) * zj * sigmoid_vec(zj));
              }
            } else {
#pragma omp simd
              for (int64_t j = 0; j < p; ++j) {
                o[j] = static_cast<T>(y[j] + D[j] * xr[j]);
              }
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------- backward

// Backward pass 1: the gradient at y (through the gate, y recomputed when
// there is one) into gy, laid out (b, h, l, p) for pass 3; dz; each (batch,
// chunk, head)'s share of dD; each chunk's part of the gradient of its
// entering state, Σ_t exp(cum_t) gy_t ⊗ C_t, into dstates; the chunk decays.
template <typename T, typename acc_t>
void output_grads(
    const Problem& P,
    const Inputs<T, acc_t>& in,
    const T* grad_out,
    const acc_t* states,
    acc_t* gy,
    T* dz,
    acc_t* dD_partial,
    acc_t* dstates,
    acc_t* decays) {
  const int64_t p = P.headdim, n = P.dstate;
  at::parallel_for(0, P.group_tasks(), 1, [&](int64_t begin, int64_t end) {
    ChunkSeq cs;
    Scratch<acc_t> ws(P, false);
    for (int64_t index = begin; index < end; ++index) {
      const GroupTask task(P, index);
      cs.init(P, in.seq_idx, task.b, task.c);
      const int64_t len = cs.len, el = cs.enter_len;
      if (in.z) {
        group_scores(P, in, task, cs, ws.CB.data());
      }
      for (int64_t h0 = task.head_begin; h0 < task.head_end; h0 += kTile) {
        const int64_t nh = std::min(kTile, task.head_end - h0);
        gather_heads(P, in.x, task.b, cs.t0, len, h0, nh, ws.X.data());
        for (int64_t k = 0; k < nh; ++k) {
          const int64_t h = h0 + k;
          Steps<acc_t>& st = ws.steps[k];
          st.compute(P, cs, in.dt_row(P, task.b, cs.t0, h), in.A[h], in.bias(h), false);
          decays[(task.b * P.nheads + h) * P.nchunks + task.c] = st.decay;
          if (in.z) {
            head_output(P, in, task, cs, st, states + P.state(task.b, h, task.c), ws.X.data() + k * len * p,
                        ws.Y.data() + k * len * p, ws);
          }
          if (dD_partial) {
            std::fill_n(dD_partial + ((task.b * P.nchunks + task.c) * P.nheads + h) * p, p, acc_t(0));
          }
        }
        for (int64_t t = 0; t < len; ++t) {
          const int64_t row = P.x_row(task.b, cs.t0 + t, h0);
          for (int64_t k = 0; k < nh; ++k) {
            const int64_t h = h0 + k;
            const acc_t* __restrict__ xr = ws.X.data() + (k * len + t) * p;
            const T* __restrict__ go = grad_out + row + k * p;
            acc_t* __restrict__ g = gy + ((task.b * P.nheads + h) * P.seqlen + cs.t0 + t) * p;
            if (in.z) {
              const acc_t* __restrict__ D = in.D ? in.D + h * p : ws.zeros.data();
              const acc_t* __restrict__ y = ws.Y.data() + (k * len + t) * p;
              const T* __restrict__ zr = in.z + row + k * p;
              T* __restrict__ dzr = dz + row + k * p;
#pragma omp simd
              for (int64_t j = 0; j < p; ++j) {
                const acc_t zj = static_cast<acc_t>(zr[j]), gj = static_cast<acc_t>(go[j]);
                const acc_t sg = sigmoid_vec(zj);
                const acc_t v = y[j] + D[j] * xr[j];
                dzr[j] = static_cast<T>(gj * v * sg * (acc_t(1) + zj * (acc_t(1) - sg)));
                g[j] = gj * zj * sg;
              }
            } else {
#pragma omp simd
              for (int64_t j = 0; j < p; ++j) {
                g[j] = static_cast<acc_t>(go[j]);
              }
            }
            if (dD_partial) {
              acc_t* __restrict__ dD = dD_partial + ((task.b * P.nchunks + task.c) * P.nheads + h) * p;
#pragma omp simd
              for (int64_t j = 0; j < p; ++j) {
                dD[j] += g[j] * xr[j];
              }
            }
          }
        }
        // exp(cum_t) gy_t over the steps the entering state reaches, then Σ_t (.) ⊗ C_t.
        for (int64_t k = 0; k < nh; ++k) {
          const int64_t h = h0 + k;
          const acc_t* g = gy + ((task.b * P.nheads + h) * P.seqlen + cs.t0) * p;
          for (int64_t t = 0; t < el; ++t) {
            const acc_t e = ws.steps[k].enter[t];
            const acc_t* __restrict__ gr = g + t * p;
            acc_t* __restrict__ eg = ws.Xdt.data() + t * p;
#pragma omp simd
            for (int64_t j = 0; j < p; ++j) {
              eg[j] = e * gr[j];
            }
          }
          matmul(p, n, el, ws.Xdt.data(), p, true, in.C + P.bc_row(task.b, cs.t0, task.g), P.ngroups * n, false,
                 dstates + P.state(task.b, h, task.c), n, false);
        }
      }
    }
  });
}

// Backward pass 2: along the chunks of each (row, head) in reverse. In:
// dstates holds each chunk's own part of its entering state's gradient, to
// which grad_entering (the gradient of the chunk_states output, if any) adds.
// Out: dstates holds the gradient of the state leaving each chunk; ddecays the
// gradient of each chunk's decay; dinitial the entering state's gradient.
template <typename acc_t>
void pass_state_grads(
    const Problem& P,
    const acc_t* grad_final,
    const acc_t* grad_entering,
    const acc_t* states,
    const acc_t* decays,
    acc_t* dstates,
    acc_t* ddecays,
    acc_t* dinitial) {
  const int64_t size = P.headdim * P.dstate;
  at::parallel_for(0, P.batch * P.nheads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> own(size);
    for (int64_t bh = begin; bh < end; ++bh) {
      acc_t* __restrict__ g = dinitial + bh * size;  // the running gradient, of the state leaving chunk c
      if (grad_final) {
        std::copy_n(grad_final + bh * size, size, g);
      } else {
        std::fill_n(g, size, acc_t(0));
      }
      for (int64_t c = P.nchunks - 1; c >= 0; --c) {
        acc_t* __restrict__ slot = dstates + (bh * P.nchunks + c) * size;
        const acc_t* __restrict__ H = states + (bh * P.nchunks + c) * size;
        const acc_t decay = decays[bh * P.nchunks + c];
        std::copy_n(slot, size, own.data());
        if (grad_entering) {
          const acc_t* __restrict__ ge = grad_entering + (bh * P.nchunks + c) * size;
#pragma omp simd
          for (int64_t i = 0; i < size; ++i) {
            own[i] += ge[i];
          }
        }
        std::copy_n(g, size, slot);
        acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < size; ++i) {
          dot += g[i] * H[i];
          g[i] = decay * g[i] + own[i];
        }
        ddecays[bh * P.nchunks + c] = dot;
      }
    }
  });
}

// Backward pass 3, for one head: dx into dX (len x p), dt, and this head's
// parts of dA, of dG (the gradient of the group's C B^T, summed over heads)
// and of dB, dC (added in place). g: gy (len x p); H, dS: the state entering
// the chunk and the gradient of the one leaving it; ddecay: the gradient of
// the chunk's decay.
template <typename T, typename acc_t>
void head_input_grads(
    const Problem& P,
    const Inputs<T, acc_t>& in,
    const GroupTask& task,
    const ChunkSeq& cs,
    int64_t h,
    const Steps<acc_t>& st,
    const acc_t* X,
    const acc_t* g,
    const acc_t* H,
    const acc_t* dS,
    acc_t ddecay,
    acc_t* dX,
    acc_t* ddt,
    acc_t* dA,
    acc_t* dBg,
    acc_t* dCg,
    Scratch<acc_t>& ws) {
  const int64_t len = cs.len, el = cs.enter_len, ts = cs.tail_start;
  const int64_t p = P.headdim, n = P.dstate, TT = P.chunk, ldbc = P.ngroups * n;
  const int64_t bc0 = P.bc_row(task.b, cs.t0, task.g);
  const acc_t* Bg = in.B + bc0;
  const acc_t* Cg = in.C + bc0;
  acc_t* da = ws.da.data();        // d loss / d a_k, a_k = Δ_k A: within the chunk, then into the leaving state
  acc_t* denter = ws.denter.data();  // d loss / d exp(cum_t), times exp(cum_t)
  acc_t* dw = ws.dw.data();
  for (int64_t t = 0; t < len; ++t) {
    const acc_t ut = st.u[t];
    const acc_t* __restrict__ xr = X + t * p;
    acc_t* __restrict__ xd = ws.Xdt.data() + t * p;
#pragma omp simd
    for (int64_t j = 0; j < p; ++j) {
      xd[j] = ut * xr[j];
    }
  }
  decay_matrix(cs, st, ws.CB.data(), TT, ws.M.data(), ws.L.data());

  // The gradient of each a_k is gathered from the decays it is part of (the
  // decay over steps (s, t] holds a_k for s < k <= t) instead of going through
  // cum: there, every decay's term would be added at t and taken away again at
  // s, and the largest terms (of the shortest decays) would cancel in every
  // a_k before s, leaving little of fp32's precision.

  // Within the chunk: y = M (Δ X), M = CB ∘ L, L[t, s] = exp(cum_t - cum_s).
  // Walking up from the last row, col[s] sums dM ∘ M over the rows walked, so
  // that da_t = Σ_{s < t} col[s] once row t is in.
  lower_t_mm(len, p, ws.M.data(), TT, g, p, ws.dXdt.data(), p, false);
  lower_outer(len, p, g, p, ws.Xdt.data(), p, ws.dM.data(), TT);
  acc_t* __restrict__ col = ws.cols.data();
  std::fill_n(col, len, acc_t(0));
  for (int64_t t = len - 1; t >= 0; --t) {
    const int64_t s0 = cs.start[t];
    const acc_t* __restrict__ dm = ws.dM.data() + t * TT;
    const acc_t* __restrict__ l = ws.L.data() + t * TT;
    const acc_t* __restrict__ m = ws.M.data() + t * TT;
    acc_t* __restrict__ dg = ws.dG.data() + t * TT;
#pragma omp simd
    for (int64_t s = s0; s < t; ++s) {
      dg[s] += dm[s] * l[s];
      col[s] += dm[s] * m[s];
    }
    dg[t] += dm[t] * l[t];
    acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t s = s0; s < t; ++s) {
      sum += col[s];
    }
    da[t] = sum;
  }

  // Into the leaving state: S += Σ_s w_s X_s ⊗ B_s, w_s = Δ_s exp(cum_end - cum_s),
  // whose decay holds a_k for k > s.
  const int64_t tail = len - ts;
  matmul(tail, p, n, Bg + ts * ldbc, ldbc, false, dS, n, true, ws.dXw.data(), p, false);
  std::fill_n(dw, len, acc_t(0));
  for (int64_t i = 0; i < tail; ++i) {
    const int64_t s = ts + i;
    const acc_t w = st.u[s] * st.leave[s];
    const acc_t* __restrict__ xr = X + s * p;
    const acc_t* __restrict__ dxw = ws.dXw.data() + i * p;
    acc_t* __restrict__ xw = ws.Xw.data() + i * p;
    acc_t d = 0;
#pragma omp simd reduction(+ : d)
    for (int64_t j = 0; j < p; ++j) {
      d += dxw[j] * xr[j];
      xw[j] = w * xr[j];
    }
    dw[s] = d;
  }
  matmul(tail, n, p, ws.Xw.data(), p, false, dS, n, false, dBg + ts * ldbc, ldbc, true);
  acc_t before = 0;
  for (int64_t k = ts; k < len; ++k) {
    da[k] += before;
    before += dw[k] * st.u[k] * st.leave[k];
  }

  // From the entering state: y_t += exp(cum_t) C_t H^T, whose decay holds a_k for k <= t.
  for (int64_t t = 0; t < el; ++t) {
    const acc_t e = st.enter[t];
    const acc_t* __restrict__ gr = g + t * p;
    acc_t* __restrict__ eg = ws.Xw.data() + t * p;
#pragma omp simd
    for (int64_t j = 0; j < p; ++j) {
      eg[j] = e * gr[j];
    }
  }
  matmul(el, n, p, ws.Xw.data(), p, false, H, n, false, ws.dCi.data(), n, false);
  std::fill_n(denter, len, acc_t(0));
  for (int64_t t = 0; t < el; ++t) {
    const acc_t* __restrict__ dci = ws.dCi.data() + t * n;
    const acc_t* __restrict__ cr = Cg + t * ldbc;
    acc_t* __restrict__ dcr = dCg + t * ldbc;
    acc_t d = 0;
#pragma omp simd reduction(+ : d)
    for (int64_t j = 0; j < n; ++j) {
      d += dci[j] * cr[j];
      dcr[j] += dci[j];
    }
    denter[t] = d;
  }

  // Δ X and the steps: dx, dΔ (directly and through a = Δ A), dA.
  const acc_t* __restrict__ D = in.D ? in.D + h * p : ws.zeros.data();
  for (int64_t t = 0; t < len; ++t) {
    const acc_t ut = st.u[t];
    const acc_t w = ut * st.leave[t];  // 0 before the tail
    const acc_t* __restrict__ xr = X + t * p;
    const acc_t* __restrict__ dxd = ws.dXdt.data() + t * p;
    const acc_t* __restrict__ dxw = t >= ts ? ws.dXw.data() + (t - ts) * p : ws.zeros.data();
    const acc_t* __restrict__ gr = g + t * p;
    acc_t* __restrict__ dxr = dX + t * p;
    acc_t d = 0;
#pragma omp simd reduction(+ : d)
    for (int64_t j = 0; j < p; ++j) {
      d += dxd[j] * xr[j];
      dxr[j] = ut * dxd[j] + w * dxw[j] + D[j] * gr[j];
    }
    ws.du[t] = d + dw[t] * st.leave[t];
  }
  const acc_t A = in.A[h];
  const acc_t through_decay = ddecay * st.decay;  // the chunk's decay holds every a_k
  acc_t after = 0, dA_sum = 0;
  for (int64_t t = len - 1; t >= 0; --t) {
    after += denter[t];
    const acc_t dak = da[t] + after + through_decay;
    dA_sum += dak * st.u[t];
    ddt[(task.b * P.seqlen + cs.t0 + t) * P.nheads + h] = (ws.du[t] + dak * A) * st.du_ddt[t];
  }
  *dA = dA_sum;
}

// Backward pass 3: the gradients of x, dt, A, B and C.
template <typename T, typename acc_t>
void input_grads(
    const Problem& P,
    const Inputs<T, acc_t>& in,
    const acc_t* gy,
    const acc_t* states,
    const acc_t* dstates,
    const acc_t* ddecays,
    T* dx,
    acc_t* ddt,
    acc_t* dA_partial,
    acc_t* dB_partial,
    acc_t* dC_partial) {
  const int64_t p = P.headdim, TT = P.chunk, ldbc = P.ngroups * P.dstate;
  const int64_t bc_size = P.batch * P.seqlen * ldbc;
  at::parallel_for(0, P.group_tasks(), 1, [&](int64_t begin, int64_t end) {
    ChunkSeq cs;
    Scratch<acc_t> ws(P, true);
    for (int64_t index = begin; index < end; ++index) {
      const GroupTask task(P, index);
      cs.init(P, in.seq_idx, task.b, task.c);
      const int64_t len = cs.len;
      const int64_t bc0 = P.bc_row(task.b, cs.t0, task.g), block = index % P.head_blocks;
      acc_t* dBg = dB_partial + block * bc_size + bc0;
      acc_t* dCg = dC_partial + block * bc_size + bc0;
      group_scores(P, in, task, cs, ws.CB.data());
      std::fill(ws.dG.begin(), ws.dG.end(), acc_t(0));
      for (int64_t h0 = task.head_begin; h0 < task.head_end; h0 += kTile) {
        const int64_t nh = std::min(kTile, task.head_end - h0);
        gather_heads(P, in.x, task.b, cs.t0, len, h0, nh, ws.X.data());
        for (int64_t k = 0; k < nh; ++k) {
          const int64_t h = h0 + k, slot = (task.b * P.nheads + h) * P.nchunks + task.c;
          Steps<acc_t>& st = ws.steps[k];
          st.compute(P, cs, in.dt_row(P, task.b, cs.t0, h), in.A[h], in.bias(h), true);
          head_input_grads(P, in, task, cs, h, st, ws.X.data() + k * len * p,
                           gy + ((task.b * P.nheads + h) * P.seqlen + cs.t0) * p, states + P.state(task.b, h, task.c),
                           dstates + P.state(task.b, h, task.c), ddecays[slot], ws.Y.data() + k * len * p, ddt,
                           dA_partial + (task.b * P.nchunks + task.c) * P.nheads + h, dBg, dCg, ws);
        }
        for (int64_t t = 0; t < len; ++t) {
          T* row = dx + P.x_row(task.b, cs.t0 + t, h0);
          for (int64_t k = 0; k < nh; ++k) {
            const acc_t* __restrict__ s = ws.Y.data() + (k * len + t) * p;
            T* __restrict__ d = row + k * p;
#pragma omp simd
            for (int64_t j = 0; j < p; ++j) {
              d[j] = static_cast<T>(s[j]);
            }
          }
        }
      }
      // C B^T, shared by the block's heads.
      lower_mm(len, P.dstate, ws.dG.data(), TT, in.B + bc0, ldbc, dCg, ldbc, true);
      lower_t_mm(len, P.dstate, ws.dG.data(), TT, in.C + bc0, ldbc, dBg, ldbc, true);
    }
  });
}

// ---------------------------------------------------------------- ops

#define LNLM_DISPATCH_SSD_TYPES(dtype, NAME, ...)                                                  \
  [&] {                                                                                            \
    switch (dtype) {                                                                               \
      case at::kFloat: { using T = float; using acc_t = float; return __VA_ARGS__(); }             \
      case at::kDouble: { using T = double; using acc_t = double; return __VA_ARGS__(); }          \
      case at::kBFloat16: { using T = c10::BFloat16; using acc_t = float; return __VA_ARGS__(); }  \
      case at::kHalf: { using T = c10::Half; using acc_t = float; return __VA_ARGS__(); }          \
      default: TORCH_CHECK(false, NAME, ": unsupported dtype ", dtype);                            \
    }                                                                                              \
  }()

void check_math(const char* name, const at::Tensor& t, at::IntArrayRef sizes, at::ScalarType math) {
  TORCH_CHECK(t.sizes() == sizes && t.is_contiguous() && t.scalar_type() == math, kOp, ": ", name,
              " must be contiguous ", sizes, " in ", math, ", got ", t.sizes(), " ", t.scalar_type());
}

void check_optional(const char* name, const std::optional<at::Tensor>& t, at::IntArrayRef sizes, at::ScalarType dtype) {
  if (t.has_value()) {
    check_math(name, *t, sizes, dtype);
  }
}

at::ScalarType math_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Problem check_inputs(
    const at::Tensor& x,
    const at::Tensor& dt,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& C,
    const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& dt_bias,
    const std::optional<at::Tensor>& seq_idx,
    int64_t chunk_size,
    bool dt_softplus,
    double dt_min,
    double dt_max) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), kOp, ": x must be contiguous (batch, seqlen, nheads, headdim)");
  TORCH_CHECK(B.dim() == 4 && B.size(0) == x.size(0) && B.size(1) == x.size(1), kOp,
              ": B must be (batch, seqlen, ngroups, dstate)");
  TORCH_CHECK(B.size(2) > 0 && x.size(2) % B.size(2) == 0, kOp, ": nheads must be divisible by ngroups");
  TORCH_CHECK(chunk_size > 0, kOp, ": chunk_size must be positive");
  const auto math = math_type(x);
  const int64_t b = x.size(0), l = x.size(1), h = x.size(2), p = x.size(3);
  check_math("dt", dt, {b, l, h}, math);
  check_math("A", A, {h}, math);
  check_math("B", B, B.sizes(), math);
  check_math("C", C, B.sizes(), math);
  check_optional("D", D, {h, p}, math);
  check_optional("dt_bias", dt_bias, {h}, math);
  check_optional("z", z, x.sizes(), x.scalar_type());
  check_optional("seq_idx", seq_idx, {b, l}, at::kLong);
  return Problem(x, B, chunk_size, dt_softplus, dt_min, dt_max);
}

template <typename T, typename acc_t>
Inputs<T, acc_t> inputs(
    const at::Tensor& x,
    const at::Tensor& dt,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& C,
    const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& dt_bias,
    const std::optional<at::Tensor>& seq_idx) {
  return {x.const_data_ptr<T>(),
          dt.const_data_ptr<acc_t>(),
          A.const_data_ptr<acc_t>(),
          B.const_data_ptr<acc_t>(),
          C.const_data_ptr<acc_t>(),
          D ? D->const_data_ptr<acc_t>() : nullptr,
          z ? z->const_data_ptr<T>() : nullptr,
          dt_bias ? dt_bias->const_data_ptr<acc_t>() : nullptr,
          seq_idx ? seq_idx->const_data_ptr<int64_t>() : nullptr};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ssd_chunk_scan_fwd(
    const at::Tensor& x,
    const at::Tensor& dt,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& C,
    const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& dt_bias,
    const std::optional<at::Tensor>& initial_states,
    const std::optional<at::Tensor>& seq_idx,
    int64_t chunk_size,
    bool dt_softplus,
    double dt_min,
    double dt_max) {
  const Problem P = check_inputs(x, dt, A, B, C, D, z, dt_bias, seq_idx, chunk_size, dt_softplus, dt_min, dt_max);
  const auto math = A.options();
  check_optional("initial_states", initial_states, {P.batch, P.nheads, P.headdim, P.dstate}, A.scalar_type());
  auto out = at::empty_like(x);
  auto final_states = at::empty({P.batch, P.nheads, P.headdim, P.dstate}, math);
  auto states = at::empty({P.batch, P.nheads, P.nchunks, P.headdim, P.dstate}, math);
  auto decays = at::empty({P.batch, P.nheads, P.nchunks}, math);
  LNLM_DISPATCH_SSD_TYPES(x.scalar_type(), "ssd_chunk_scan_fwd (cpu)", [&] {
    const auto in = inputs<T, acc_t>(x, dt, A, B, C, D, z, dt_bias, seq_idx);
    chunk_contributions(P, in, states.mutable_data_ptr<acc_t>(), decays.mutable_data_ptr<acc_t>());
    pass_states(P, initial_states ? initial_states->const_data_ptr<acc_t>() : nullptr, decays.const_data_ptr<acc_t>(),
                states.mutable_data_ptr<acc_t>(), final_states.mutable_data_ptr<acc_t>());
    outputs(P, in, states.const_data_ptr<acc_t>(), out.mutable_data_ptr<T>());
  });
  return {out, final_states, states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
ssd_chunk_scan_bwd(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_final_states,
    const std::optional<at::Tensor>& grad_chunk_states,
    const at::Tensor& x,
    const at::Tensor& dt,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& C,
    const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& dt_bias,
    const std::optional<at::Tensor>& seq_idx,
    const at::Tensor& chunk_states,
    int64_t chunk_size,
    bool dt_softplus,
    double dt_min,
    double dt_max) {
  const Problem P = check_inputs(x, dt, A, B, C, D, z, dt_bias, seq_idx, chunk_size, dt_softplus, dt_min, dt_max);
  const auto math = A.options();
  check_math("grad_out", grad_out, x.sizes(), x.scalar_type());
  check_optional("grad_final_states", grad_final_states, {P.batch, P.nheads, P.headdim, P.dstate}, A.scalar_type());
  check_math("chunk_states", chunk_states, {P.batch, P.nheads, P.nchunks, P.headdim, P.dstate}, A.scalar_type());
  check_optional("grad_chunk_states", grad_chunk_states, chunk_states.sizes(), A.scalar_type());
  auto dx = at::empty_like(x);
  auto ddt = at::empty_like(dt);
  auto dz = z ? at::empty_like(*z) : at::empty({0}, x.options());
  auto gy = at::empty({P.batch, P.nheads, P.seqlen, P.headdim}, math);
  auto dstates = at::empty_like(chunk_states);
  auto decays = at::empty({P.batch, P.nheads, P.nchunks}, math);
  auto ddecays = at::empty({P.batch, P.nheads, P.nchunks}, math);
  auto dinitial = at::empty({P.batch, P.nheads, P.headdim, P.dstate}, math);
  auto dA_partial = at::empty({P.batch, P.nchunks, P.nheads}, math);
  auto dD_partial = at::empty({D ? P.batch * P.nchunks : 0, P.nheads, P.headdim}, math);
  auto dB_partial = at::zeros({P.head_blocks, P.batch, P.seqlen, P.ngroups, P.dstate}, math);
  auto dC_partial = at::zeros_like(dB_partial);
  LNLM_DISPATCH_SSD_TYPES(x.scalar_type(), "ssd_chunk_scan_bwd (cpu)", [&] {
    const auto in = inputs<T, acc_t>(x, dt, A, B, C, D, z, dt_bias, seq_idx);
    output_grads(P, in, grad_out.const_data_ptr<T>(), chunk_states.const_data_ptr<acc_t>(), gy.mutable_data_ptr<acc_t>(),
                 z ? dz.mutable_data_ptr<T>() : nullptr, D ? dD_partial.mutable_data_ptr<acc_t>() : nullptr,
                 dstates.mutable_data_ptr<acc_t>(), decays.mutable_data_ptr<acc_t>());
    pass_state_grads(P, grad_final_states ? grad_final_states->const_data_ptr<acc_t>() : nullptr,
                     grad_chunk_states ? grad_chunk_states->const_data_ptr<acc_t>() : nullptr,
                     chunk_states.const_data_ptr<acc_t>(), decays.const_data_ptr<acc_t>(), dstates.mutable_data_ptr<acc_t>(),
                     ddecays.mutable_data_ptr<acc_t>(), dinitial.mutable_data_ptr<acc_t>());
    input_grads(P, in, gy.const_data_ptr<acc_t>(), chunk_states.const_data_ptr<acc_t>(), dstates.const_data_ptr<acc_t>(),
                ddecays.const_data_ptr<acc_t>(), dx.mutable_data_ptr<T>(), ddt.mutable_data_ptr<acc_t>(),
                dA_partial.mutable_data_ptr<acc_t>(), dB_partial.mutable_data_ptr<acc_t>(),
                dC_partial.mutable_data_ptr<acc_t>());
  });
  auto dD = D ? dD_partial.sum(0) : at::empty({0}, math);
  return {dx, ddt, dA_partial.sum({0, 1}), dB_partial.sum(0), dC_partial.sum(0), dD, dz, dinitial};
}

}  // namespace

TORCH_LIBRARY_IMPL(lnlm_ssm, CPU, m) {
  m.impl("ssd_chunk_scan_fwd", &ssd_chunk_scan_fwd);
  m.impl("ssd_chunk_scan_bwd", &ssd_chunk_scan_bwd);
}

}  // namespace lnlm_ssm
