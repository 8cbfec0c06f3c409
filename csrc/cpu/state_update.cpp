// selective_state_update on the CPU: one decoding step of the selective SSM.
//
// Inputs are in the canonical layout of lnlm_ssm/ops/state_update/shapes.py
// (b batch, h heads, p headdim, n dstate, g groups; the h/g consecutive heads of
// a group share its B and C), with any strides, 0 included:
//
//   state (b,h,p,n)  updated in place      x, dt, z (b,h,p)      A (h,p,n)
//   B, C (b,g,n)                           D, dt_bias (h,p)      y (b,h,p), returned
//
// With state_batch_indices (b,) (int32 or int64), state is a pool (slots,h,p,n)
// and batch row b steps the slot state_batch_indices[b]; a negative index is a
// padding row, whose y is 0 and which touches no slot. The other indices must
// be distinct slots (two rows updating one slot would race) below the pool size.
//
// For every (b, h, p), as lnlm_ssm/ops/state_update/reference.py:
//   1. dt <- dt + dt_bias; dt <- softplus(dt) if dt_softplus (x > 20 ? x : log1p(exp(x)))
//   2. state <- exp(dt * A) * state + (dt * x) * B
//   3. y <- sum_n state * C; y <- y + D * x; y <- y * silu(z)
//
// Math runs in float (double when x is double). The small per-(b,h) rows
// (x, dt, z, D, dt_bias, B, C) are read in whatever float dtype they have; A is
// brought to the math dtype once per call (keeping stride-0 broadcasts, so an
// A given per head is never materialised); state may be any float dtype and is
// written back in it; y has x's dtype.
//
// Work is split over (b, h) with at::parallel_for, and each task walks blocks of
// heads: the per-row inputs of a block are loaded and transformed (softplus,
// silu) in one vectorised pass, which matters for Mamba-1 (headdim 1). The
// loop over dstate is the hot one: it is written for the vectoriser (exp
// without libm), with fast paths for a state contiguous along dstate and for an
// A constant along dstate (Mamba-2: exp(dt * A) once per (b, h, p)).

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "vec_math.h"

namespace lnlm_ssm {
namespace {

constexpr const char* kOp = "selective_state_update (cpu)";

// ---------------------------------------------------------------- strided rows of any float dtype

// A tensor's data, dtype and strides (in elements); `data` is null for an absent optional.
struct View {
  const char* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t itemsize = 0;
  int64_t stride[4] = {0, 0, 0, 0};

  View() = default;
  explicit View(const at::Tensor& t)
      : data(static_cast<const char*>(t.const_data_ptr())), dtype(t.scalar_type()), itemsize(t.element_size()) {
    for (int64_t d = 0; d < t.dim(); ++d) {
      stride[d] = t.stride(d);
    }
  }
  explicit View(const std::optional<at::Tensor>& t) : View() {
    if (t.has_value()) {
      *this = View(*t);
    }
  }
  bool present() const {
    return data != nullptr;
  }
  // The row [i0, :] of a 2-d tensor, or [i0, i1, :] of a 3-d one; its stride is stride[ndim - 1].
  const char* row(int64_t i0) const {
    return data + i0 * stride[0] * itemsize;
  }
  const char* row(int64_t i0, int64_t i1) const {
    return data + (i0 * stride[0] + i1 * stride[1]) * itemsize;
  }
};

template <typename acc_t, typename src_t>
inline void load_as(const char* src, int64_t stride, int64_t len, acc_t* out) {
  const src_t* s = reinterpret_cast<const src_t*>(src);
  if (stride == 1) {
    for (int64_t i = 0; i < len; ++i) {
      out[i] = static_cast<acc_t>(s[i]);
    }
  } else {
    for (int64_t i = 0; i < len; ++i) {
      out[i] = static_cast<acc_t>(s[i * stride]);
    }
  }
}

// out[i] = src[i * stride], converted from `dtype` to acc_t.
template <typename acc_t>
inline void load_row(const char* src, at::ScalarType dtype, int64_t stride, int64_t len, acc_t* out) {
  switch (dtype) {
    case at::kFloat:
      return load_as<acc_t, float>(src, stride, len, out);
    case at::kDouble:
      return load_as<acc_t, double>(src, stride, len, out);
    case at::kBFloat16:
      return load_as<acc_t, c10::BFloat16>(src, stride, len, out);
    case at::kHalf:
      return load_as<acc_t, c10::Half>(src, stride, len, out);
    default:
      TORCH_INTERNAL_ASSERT(false, kOp, ": unexpected dtype ", dtype);
  }
}

// out[(h - h0) * P + p] = t[b, h, p] for the heads h0 <= h < h0 + nh of a
// (batch, nheads, headdim) tensor, or t[h, p] of a (nheads, headdim) one (b < 0).
template <typename acc_t>
inline void load_heads(const View& t, int64_t b, int64_t h0, int64_t nh, int64_t P, acc_t* out) {
  const int64_t hs = b < 0 ? t.stride[0] : t.stride[1];
  const int64_t ps = b < 0 ? t.stride[1] : t.stride[2];
  const char* base = b < 0 ? t.row(h0) : t.row(b, h0);
  if (P == 1) {
    return load_row(base, t.dtype, hs, nh, out);
  }
  if (hs == P * ps) {
    return load_row(base, t.dtype, ps, nh * P, out);
  }
  for (int64_t i = 0; i < nh; ++i) {
    load_row(base + i * hs * t.itemsize, t.dtype, ps, P, out + i * P);
  }
}

template <typename dst_t, typename acc_t>
inline void store_as(const acc_t* src, int64_t len, char* dst) {
  dst_t* d = reinterpret_cast<dst_t*>(dst);
  for (int64_t i = 0; i < len; ++i) {
    d[i] = static_cast<dst_t>(src[i]);
  }
}

// Contiguous dst[i] = src[i], converted from acc_t to `dtype`.
template <typename acc_t>
inline void store_row(const acc_t* src, int64_t len, at::ScalarType dtype, char* dst) {
  switch (dtype) {
    case at::kFloat:
      return store_as<float>(src, len, dst);
    case at::kDouble:
      return store_as<double>(src, len, dst);
    case at::kBFloat16:
      return store_as<c10::BFloat16>(src, len, dst);
    case at::kHalf:
      return store_as<c10::Half>(src, len, dst);
    default:
      TORCH_INTERNAL_ASSERT(false, kOp, ": unexpected dtype ", dtype);
  }
}

// ---------------------------------------------------------------- the kernel

// Step 2 and the sum of step 3 along one (b, h, p) row of the state:
//   state[n] <- exp(dt * A[n]) * state[n] + dtx * B[n];  returns sum_n state[n] * C[n].
// kScalarA: A is constant along dstate (stride 0). kContig: the strides along
// dstate are 1 (state's, and A's unless kScalarA).
template <typename acc_t, typename state_t, bool kScalarA, bool kContig>
inline acc_t update_row(
    state_t* __restrict__ s,
    int64_t s_stride,
    const acc_t* __restrict__ a,
    int64_t a_stride,
    acc_t dt,
    acc_t dtx,
    const acc_t* __restrict__ Bv,
    const acc_t* __restrict__ Cv,
    int64_t N) {
  acc_t acc = 0;
  if constexpr (kScalarA) {
    const acc_t decay = std::exp(dt * a[0]);
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; ++n) {
      state_t& sn = s[kContig ? n : n * s_stride];
      const acc_t v = decay * static_cast<acc_t>(sn) + dtx * Bv[n];
      sn = static_cast<state_t>(v);
      acc += v * Cv[n];
    }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; ++n) {
      state_t& sn = s[kContig ? n : n * s_stride];
      const acc_t decay = exp_vec(dt * a[kContig ? n : n * a_stride]);
      const acc_t v = decay * static_cast<acc_t>(sn) + dtx * Bv[n];
      sn = static_cast<state_t>(v);
      acc += v * Cv[n];
    }
  }
  return acc;
}

struct Inputs {
  int64_t batch, nheads, headdim, dstate, ngroups;
  View x, dt, B, C, D, z, dt_bias;
  bool dt_softplus;
  const int64_t* slots;  // the state row of each batch row (negative: padding), or null: row b is slot b
};

template <typename acc_t, typename state_t>
void state_update(const at::Tensor& state, const at::Tensor& A, const Inputs& in, at::Tensor& y) {
  const int64_t H = in.nheads, P = in.headdim, N = in.dstate;
  const int64_t heads_per_group = H / in.ngroups;
  state_t* const st = state.mutable_data_ptr<state_t>();
  const int64_t ss0 = state.stride(0), ss1 = state.stride(1), ss2 = state.stride(2), ss3 = state.stride(3);
  const acc_t* const a = A.const_data_ptr<acc_t>();
  const int64_t as0 = A.stride(0), as1 = A.stride(1), as2 = A.stride(2);
  const bool scalar_a = as2 == 0 || N == 1;
  const bool contig = ss3 == 1 && (scalar_a || as2 == 1);
  char* const y_data = static_cast<char*>(y.mutable_data_ptr());
  const int64_t y_row_bytes = P * y.element_size();
  const at::ScalarType y_dtype = y.scalar_type();

  // Tasks of ~16K state elements, so that small problems stay on one thread;
  // within a task, blocks of heads of one batch row with ~1K (h, p) rows, whose
  // per-row inputs are loaded and transformed together (vectorised).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, P * (N + 4)));
  const int64_t block_heads = std::max<int64_t>(1, 1024 / P);
  at::parallel_for(0, in.batch * H, grain, [&](int64_t begin, int64_t end) {
    const int64_t rows = std::min(end - begin, block_heads) * P;
    std::vector<acc_t> buffer(5 * rows + 2 * N);
    acc_t* const dt = buffer.data();  // per (h, p) row of the block: dt after step 1
    acc_t* const x = dt + rows;
    acc_t* const yv = x + rows;
    acc_t* const tmp = yv + rows;  // dt_bias, then D
    acc_t* const gate = tmp + rows;  // silu(z)
    acc_t* const Bv = gate + rows;
    acc_t* const Cv = Bv + N;
    int64_t loaded_bg = -1;  // the (b, g) whose B and C rows are in Bv, Cv

    for (int64_t bh0 = begin; bh0 < end;) {
      const int64_t b = bh0 / H, h0 = bh0 % H;
      const int64_t nh = std::min({end - bh0, H - h0, block_heads});
      const int64_t len = nh * P;
      const int64_t slot = in.slots == nullptr ? b : in.slots[b];
      if (slot < 0) {
        std::fill(yv, yv + len, acc_t{0});
        store_row(yv, len, y_dtype, y_data + bh0 * y_row_bytes);
        bh0 += nh;
        continue;
      }

      // Step 1: dt, for the block.
      load_heads(in.dt, b, h0, nh, P, dt);
      if (in.dt_bias.present()) {
        load_heads(in.dt_bias, -1, h0, nh, P, tmp);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          dt[i] += tmp[i];
        }
      }
      if (in.dt_softplus) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          dt[i] = softplus_vec(dt[i]);
        }
      }
      load_heads(in.x, b, h0, nh, P, x);

      // Steps 2 and 3 (the sum over dstate), row by row of the state.
      for (int64_t i = 0; i < nh; ++i) {
        const int64_t h = h0 + i, g = h / heads_per_group;
        if (b * in.ngroups + g != loaded_bg) {
          load_row(in.B.row(b, g), in.B.dtype, in.B.stride[2], N, Bv);
          load_row(in.C.row(b, g), in.C.dtype, in.C.stride[2], N, Cv);
          loaded_bg = b * in.ngroups + g;
        }
        state_t* const s_bh = st + slot * ss0 + h * ss1;
        const acc_t* const a_h = a + h * as0;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t r = i * P + p;
          state_t* const s = s_bh + p * ss2;
          const acc_t* const a_p = a_h + p * as1;
          const acc_t dtx = dt[r] * x[r];
          if (scalar_a) {
            yv[r] = contig ? update_row<acc_t, state_t, true, true>(s, ss3, a_p, as2, dt[r], dtx, Bv, Cv, N)
                           : update_row<acc_t, state_t, true, false>(s, ss3, a_p, as2, dt[r], dtx, Bv, Cv, N);
          } else {
            yv[r] = contig ? update_row<acc_t, state_t, false, true>(s, ss3, a_p, as2, dt[r], dtx, Bv, Cv, N)
                           : update_row<acc_t, state_t, false, false>(s, ss3, a_p, as2, dt[r], dtx, Bv, Cv, N);
          }
        }
      }

      // Step 3: skip connection and gate, for the block.
      if (in.D.present()) {
        load_heads(in.D, -1, h0, nh, P, tmp);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          yv[i] += x[i] * tmp[i];
        }
      }
      if (in.z.present()) {
        load_heads(in.z, b, h0, nh, P, gate);
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          yv[i] *= gate[i] * sigmoid_vec(gate[i]);
        }
      }
      store_row(yv, len, y_dtype, y_data + bh0 * y_row_bytes);  // y is contiguous: the block is one run
      bh0 += nh;
    }
  });
}

// ---------------------------------------------------------------- argument checks

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_arg(const char* name, const at::Tensor& t, std::initializer_list<int64_t> shape, const char* layout) {
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(
      is_float(t.scalar_type()),
      kOp, ": ", name, " must have dtype float32, float64, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(
      t.sizes().equals(shape),
      kOp, ": ", name, " must have shape ", c10::IntArrayRef(shape), " ", layout, ", got ", t.sizes());
}

// `t` with its dtype changed; dimensions broadcast with stride 0 stay broadcast (not materialised).
at::Tensor cast_keep_broadcast(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) {
    return t;
  }
  std::vector<int64_t> compact(t.sizes().begin(), t.sizes().end());
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.stride(d) == 0) {
      compact[d] = 1;
    }
  }
  return t.as_strided(compact, t.strides()).to(dtype).expand(t.sizes());
}

// The state row of each batch row, from state_batch_indices (checked: see the header comment).
std::vector<int64_t> slots_of_rows(const at::Tensor& indices, int64_t batch, int64_t pool) {
  TORCH_CHECK(indices.device().is_cpu(), kOp, ": state_batch_indices must be a CPU tensor, got one on ",
              indices.device());
  TORCH_CHECK(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
              kOp, ": state_batch_indices must have dtype int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK(indices.dim() == 1 && indices.size(0) == batch,
              kOp, ": state_batch_indices must have shape [", batch, "] (batch), got ", indices.sizes());
  std::vector<int64_t> slots(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t i = b * indices.stride(0);
    slots[b] = indices.scalar_type() == at::kInt ? int64_t{indices.const_data_ptr<int32_t>()[i]}
                                                 : indices.const_data_ptr<int64_t>()[i];
    TORCH_CHECK(slots[b] < pool, kOp, ": state_batch_indices must be slots in [0, ", pool,
                ") of state or negative (padding), got ", slots[b], " for batch row ", b);
  }
  std::vector<int64_t> sorted = slots;
  std::sort(sorted.begin(), sorted.end());
  const auto repeated = std::adjacent_find(sorted.begin(), sorted.end(),
                                           [](int64_t a, int64_t b) { return a >= 0 && a == b; });
  if (repeated != sorted.end()) {
    TORCH_CHECK(false, kOp, ": state_batch_indices must not repeat a slot (two rows would update it in place at once), "
                "got ", *repeated, " more than once");
  }
  return slots;
}

at::Tensor selective_state_update_cpu(
    const at::Tensor& state,
    const at::Tensor& x,
    const at::Tensor& dt,
    const at::Tensor& A,
    const at::Tensor& B,
    const at::Tensor& C,
    const std::optional<at::Tensor>& D,
    const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& dt_bias,
    bool dt_softplus,
    const std::optional<at::Tensor>& state_batch_indices) {
  const bool pooled = state_batch_indices.has_value();
  const char* const state_layout = pooled ? "(pool, nheads, headdim, dstate)" : "(batch, nheads, headdim, dstate)";
  TORCH_CHECK(state.dim() == 4, kOp, ": state must have 4 dimensions ", state_layout, ", got shape ", state.sizes());
  TORCH_CHECK(x.dim() == 3, kOp, ": x must have 3 dimensions (batch, nheads, headdim), got shape ", x.sizes());
  TORCH_CHECK(B.dim() == 3, kOp, ": B must have 3 dimensions (batch, ngroups, dstate), got shape ", B.sizes());
  const int64_t batch = x.size(0), nheads = state.size(1), headdim = state.size(2), dstate = state.size(3);
  const int64_t pool = pooled ? state.size(0) : batch;
  const int64_t ngroups = B.size(1);
  check_arg("state", state, {pool, nheads, headdim, dstate}, state_layout);
  check_arg("x", x, {batch, nheads, headdim}, "(batch, nheads, headdim)");
  check_arg("dt", dt, {batch, nheads, headdim}, "(batch, nheads, headdim)");
  check_arg("A", A, {nheads, headdim, dstate}, "(nheads, headdim, dstate)");
  check_arg("B", B, {batch, ngroups, dstate}, "(batch, ngroups, dstate)");
  check_arg("C", C, {batch, ngroups, dstate}, "(batch, ngroups, dstate)");
  if (D.has_value()) {
    check_arg("D", *D, {nheads, headdim}, "(nheads, headdim)");
  }
  if (z.has_value()) {
    check_arg("z", *z, {batch, nheads, headdim}, "(batch, nheads, headdim)");
  }
  if (dt_bias.has_value()) {
    check_arg("dt_bias", *dt_bias, {nheads, headdim}, "(nheads, headdim)");
  }
  TORCH_CHECK(
      ngroups > 0 && nheads % ngroups == 0,
      kOp, ": nheads (", nheads, ") must be divisible by ngroups (", ngroups, ", from B)");
  TORCH_CHECK(
      at::has_internal_overlap(state) != at::MemOverlap::Yes,
      kOp, ": state is updated in place, so it must not be a view whose elements overlap (such as an expanded "
      "tensor); got strides ", state.strides());

  const std::vector<int64_t> slots = pooled ? slots_of_rows(*state_batch_indices, batch, pool) : std::vector<int64_t>{};

  at::Tensor y = at::empty({batch, nheads, headdim}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (y.numel() == 0) {
    return y;
  }
  const bool use_double = x.scalar_type() == at::kDouble;
  const at::Tensor A_acc = cast_keep_broadcast(A, use_double ? at::kDouble : at::kFloat);
  const Inputs in{batch, nheads, headdim, dstate, ngroups, View(x), View(dt), View(B), View(C),
                  View(D), View(z), View(dt_bias), dt_softplus, pooled ? slots.data() : nullptr};

  auto run = [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    switch (state.scalar_type()) {
      case at::kFloat:
        return state_update<acc_t, float>(state, A_acc, in, y);
      case at::kDouble:
        return state_update<acc_t, double>(state, A_acc, in, y);
      case at::kBFloat16:
        return state_update<acc_t, c10::BFloat16>(state, A_acc, in, y);
      case at::kHalf:
        return state_update<acc_t, c10::Half>(state, A_acc, in, y);
      default:
        TORCH_INTERNAL_ASSERT(false, kOp, ": unexpected state dtype ", state.scalar_type());
    }
  };
  if (use_double) {
    run(double{});
  } else {
    run(float{});
  }
  return y;
}

}  // namespace
}  // namespace lnlm_ssm

TORCH_LIBRARY_IMPL(lnlm_ssm, CPU, m) {
  m.impl("selective_state_update", &lnlm_ssm::selective_state_update_cpu);
}
