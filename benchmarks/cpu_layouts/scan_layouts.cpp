// Which way should the CPU selective-scan forward vectorise: over dstate or over dim?
//
// Build and run (the flags setup.py uses; 2 threads as in scan_speed.py):
//   g++ -O3 -fopenmp -fno-math-errno -fno-trapping-math -march=native -mprefer-vector-width=512 \
//       -I csrc/cpu benchmarks/cpu_layouts/scan_layouts.cpp -o /tmp/scan_layouts
//   OMP_NUM_THREADS=2 /tmp/scan_layouts
//
// Both variants run the same recurrence, h = exp(dt A) h + dt u B, y = C . h, over the
// same inputs (b 2, d 1536, n 16, l 2048, fp32), with the per-step dt and dt*u already
// computed, each variant reading them in the layout it prefers (prepared untimed), so
// only the layout of the inner loops differs:
//   "over dstate": one channel at a time, the n states of a step in vector lanes; the
//                  readout C . h is a horizontal sum per step;
//   "over dim":    16 channels of a group at a time, one per lane (the layout
//                  csrc/cpu/selective_scan.cpp's forward uses); B and C are broadcasts
//                  and the readout needs no horizontal sum.
// It prints the median of 9 runs of each and checks that both give the same y.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "vec_math.h"

using lnlm_ssm::exp_vec;

constexpr int kBatch = 2, kDim = 1536, kState = 16, kLen = 2048, kLanes = 16;

struct Inputs {
  std::vector<float> dt, dtu, A, B, C;  // dt, dtu (b, d, l); A (d, n); B, C (b, l, n)
  std::vector<float> dt_lanes, dtu_lanes;  // dt, dtu as (b, d / kLanes, l, kLanes)
};

void over_dstate(const Inputs& in, std::vector<float>& y) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < kBatch; ++b) {
    for (int d = 0; d < kDim; ++d) {
      float h[kState] = {};
      const float* a = &in.A[d * kState];
      const size_t row = (size_t(b) * kDim + d) * kLen;
      for (int t = 0; t < kLen; ++t) {
        const float* Bt = &in.B[(size_t(b) * kLen + t) * kState];
        const float* Ct = &in.C[(size_t(b) * kLen + t) * kState];
        const float dt = in.dt[row + t], dtu = in.dtu[row + t];
        float acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int n = 0; n < kState; ++n) {
          h[n] = exp_vec(dt * a[n]) * h[n] + dtu * Bt[n];
          acc += Ct[n] * h[n];
        }
        y[row + t] = acc;
      }
    }
  }
}

void over_dim(const Inputs& in, std::vector<float>& y) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < kBatch; ++b) {
    for (int d0 = 0; d0 < kDim; d0 += kLanes) {
      float aT[kState * kLanes], h[kState * kLanes] = {};
      for (int c = 0; c < kLanes; ++c) {
        for (int n = 0; n < kState; ++n) aT[n * kLanes + c] = in.A[(d0 + c) * kState + n];
      }
      const size_t row0 = (size_t(b) * kDim + d0) * kLen;
      for (int t = 0; t < kLen; ++t) {
        const float* Bt = &in.B[(size_t(b) * kLen + t) * kState];
        const float* Ct = &in.C[(size_t(b) * kLen + t) * kState];
        const float* dt = &in.dt_lanes[row0 + size_t(t) * kLanes];
        const float* dtu = &in.dtu_lanes[row0 + size_t(t) * kLanes];
        float acc[kLanes] = {};
        for (int n = 0; n < kState; ++n) {
#pragma omp simd
          for (int c = 0; c < kLanes; ++c) {
            const float v = exp_vec(dt[c] * aT[n * kLanes + c]) * h[n * kLanes + c] + dtu[c] * Bt[n];
            h[n * kLanes + c] = v;
            acc[c] += v * Ct[n];
          }
        }
        for (int c = 0; c < kLanes; ++c) y[row0 + size_t(c) * kLen + t] = acc[c];
      }
    }
  }
}

template <typename F>
double median_ms(F&& f) {
  std::vector<double> ms;
  f();  // warm-up
  for (int i = 0; i < 9; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

int main() {
  std::mt19937 gen(0);
  std::uniform_real_distribution<float> unit(0.f, 1.f);
  std::normal_distribution<float> normal(0.f, 1.f);
  Inputs in;
  const size_t bdl = size_t(kBatch) * kDim * kLen, bln = size_t(kBatch) * kLen * kState;
  in.dt.resize(bdl), in.dtu.resize(bdl), in.A.resize(kDim * kState), in.B.resize(bln), in.C.resize(bln);
  for (size_t i = 0; i < bdl; ++i) in.dt[i] = 0.1f * unit(gen), in.dtu[i] = in.dt[i] * normal(gen);
  in.dt_lanes.resize(bdl), in.dtu_lanes.resize(bdl);
  for (int b = 0; b < kBatch; ++b) {
    for (int d = 0; d < kDim; ++d) {
      for (int t = 0; t < kLen; ++t) {
        const size_t from = (size_t(b) * kDim + d) * kLen + t;
        const size_t to = (size_t(b) * kDim + d / kLanes * kLanes) * kLen + size_t(t) * kLanes + d % kLanes;
        in.dt_lanes[to] = in.dt[from], in.dtu_lanes[to] = in.dtu[from];
      }
    }
  }
  for (auto& v : in.A) v = -0.5f - unit(gen);
  for (auto& v : in.B) v = normal(gen);
  for (auto& v : in.C) v = normal(gen);

  std::vector<float> y1(bdl), y2(bdl);
  const double ms_dstate = median_ms([&] { over_dstate(in, y1); });
  const double ms_dim = median_ms([&] { over_dim(in, y2); });
  float err = 0, scale = 0;
  for (size_t i = 0; i < bdl; ++i) err = std::max(err, std::fabs(y1[i] - y2[i])), scale = std::max(scale, std::fabs(y1[i]));
  std::printf("selective-scan forward recurrence, b %d d %d n %d l %d fp32, %d threads\n", kBatch, kDim, kState, kLen,
              omp_get_max_threads());
  std::printf("  over dstate: %8.2f ms (median of 9)\n", ms_dstate);
  std::printf("  over dim:    %8.2f ms (median of 9)   %.2fx\n", ms_dim, ms_dstate / ms_dim);
  std::printf("  max |y_dstate - y_dim| = %.3g (max |y| %.3g)\n", err, scale);
  return err <= 1e-4f * (1 + scale) ? 0 : 1;
}
