// WKV6 recurrence kernels (forward and backward), shared by the JAX FFI
// and the torch (C ABI) bindings.
//
// Per (batch, head), with the state S [N_key, N_value] in fp32:
//   y_t = r_t (diag(u) k_t^T v_t + S_{t-1})
//   S_t = diag(w_t) S_{t-1} + k_t^T v_t,      w_t = exp(log_w_t)
//
// Rows of the state (and of its gradient G_t below) evolve independently,
// and so do its columns: a pass that owns rows (or columns) can split them
// over blocks. G blocks (the template parameter; not the gradient) run one
// (batch, head) through time, each owning N / G rows or
// columns; G > 1 puts more SMs to work when batch x heads is small (one
// sequence of a 1.6B model is 32 (batch, head) pairs for 132 SMs). In a
// block, thread `own = tid / P` owns C of the block's rows or columns and
// the other index is split over P consecutive lanes (`part = tid % P`,
// indices part + P m, m < N/P), so each thread keeps C N/P state entries
// in registers and the per-step reduction is log2(P) shuffles. Time is
// staged through shared memory kChunk steps at a time (only the entries
// the block reads), so a chunk costs two __syncthreads instead of two per
// step.
//
// Backward (G_t = dL/dS_t, G_{T-1} = dL/dS_final):
//   G_{t-1} = diag(w_t) G_t + r_t^T dy_t
//   dr_t = dy_t S_{t-1}^T + u.k_t (dy_t.v_t)    ("row" pass, forward in t)
//   dk_t = v_t G_t^T     + u.r_t (dy_t.v_t)    ("row" pass, reverse)
//   dv_t = k_t G_t + dy_t sum(r.u.k)_t         ("col" pass, reverse)
//   du   = sum_t r.k (dy.v);  dS_0 = G_{-1}
//   dlog_w_t = sum_{m>t} r_m.dr'_m - sum_{m>=t} k_m.dk'_m + sum_j gS.S_T
// where dr', dk' leave out the u (bonus) term. The last identity is the
// derivative through the cumulative log decay (the state is a function of
// exp(A_{t-1}) r and exp(-A_s) k); it needs no stored states, only the two
// running sums P (forward) and Q (reverse), combined as
// dlog_w = Q + P_{T-1} - P by the caller. The three passes are
// independent and run as one launch (blockIdx.y picks the pass), which
// also triples the number of blocks in flight.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "wkv6_params.cuh"

namespace keras_rwkv_wkv6 {

constexpr int kChunk = 16;  // time steps staged in shared memory at once

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// Sum over a group of P consecutive lanes (P a power of two, <= 32).
template <int P>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int o = 1; o < P; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Block geometry: G blocks per (batch, head), C owned indices per thread,
// the other index split over P lanes; P is picked for 128 threads a
// block where it can be (4 <= P <= 32): enough to stage a chunk quickly,
// and a larger G then shortens each thread's serial work (N / P entries
// per owned index) instead of emptying the block.
template <int N, int C, int G>
struct Geometry {
  static constexpr int kOwned = N / G;         // per block
  static constexpr int kStride = kOwned / C;   // between a thread's own
  static constexpr int kParts = 128 / kStride < 4    ? 4
                                : 128 / kStride > 32 ? 32
                                : 128 / kStride > N  ? N
                                                     : 128 / kStride;
  static constexpr int kThreads = kParts * kStride;  // per block
  static_assert(kStride >= 1 && kOwned % C == 0, "bad geometry");
  static_assert(N % kParts == 0, "bad geometry");
  static_assert(kThreads >= 32 && kThreads % 32 == 0,
                "lane-group shuffles need full warps");
  __device__ static int b(const Params& p) { return blockIdx.x / G / p.H; }
  __device__ static int h(const Params& p) { return blockIdx.x / G % p.H; }
  // The c-th index owned by this thread.
  __device__ static int owned(int c) {
    return blockIdx.x % G * kOwned + threadIdx.x / kParts + c * kStride;
  }
};

// Stages steps [t0, t0 + kChunk) of one (batch, head): key-indexed
// kp[tt][i] = (r_i, k_i, w_i, r_i u_i k_i) and value-indexed
// vp[tt][j] = (dy_j, v_j), for all N keys (values) or only the block's
// own (OWN_KEYS: a row pass; else a column pass). Steps past T are never
// read. With G > 1 (few blocks, each alone on its SM) the loop is
// unrolled so a chunk's loads are in flight together; with G = 1 (many
// blocks) it is not: the unrolled loads need more registers, which cut
// the blocks resident per SM, and the batched backward ran 2x slower.
template <typename T, int N, int C, int G, bool OWN_KEYS>
__device__ __forceinline__ void stage(const Params& p, int b, int h, int t0,
                                      float4* kp, float2* vp) {
  using Geo = Geometry<N, C, G>;
  constexpr int NK = OWN_KEYS ? Geo::kOwned : N;
  constexpr int NV = OWN_KEYS ? N : Geo::kOwned;
  const int base = blockIdx.x % G * Geo::kOwned;
  const int k0 = OWN_KEYS ? base : 0, v0 = OWN_KEYS ? 0 : base;
  const T* r = static_cast<const T*>(p.r);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dy = static_cast<const T*>(p.dy);
  constexpr int kUnroll = G > 1 ? 32 : 1;
#pragma unroll kUnroll
  for (int it = 0; it < (kChunk * NK + Geo::kThreads - 1) / Geo::kThreads;
       ++it) {
    const int idx = it * Geo::kThreads + threadIdx.x;
    const int tt = idx / NK, n = k0 + idx % NK, t = t0 + tt;
    if (idx < kChunk * NK && t < p.T) {
      const size_t o = offset(p, b, t, h, n, N);
      const float rv = to_float(r[o]), kv = to_float(k[o]);
      kp[tt * N + n] =
          make_float4(rv, kv, expf(p.log_w[o]), rv * p.u[h * N + n] * kv);
    }
  }
#pragma unroll kUnroll
  for (int it = 0; it < (kChunk * NV + Geo::kThreads - 1) / Geo::kThreads;
       ++it) {
    const int idx = it * Geo::kThreads + threadIdx.x;
    const int tt = idx / NV, n = v0 + idx % NV, t = t0 + tt;
    if (idx < kChunk * NV && t < p.T) {
      const size_t o = offset(p, b, t, h, n, N);
      vp[tt * N + n] =
          make_float2(dy ? to_float(dy[o]) : 0.f, to_float(v[o]));
    }
  }
}

// "Column" pass: thread owns C value columns (Geometry::owned) and the
// keys part + P m. Owning several columns reuses every key value
// read from shared memory C times: shared-memory bandwidth, not
// arithmetic, bounds this loop.
// Forward (REV = false): X = S, out = y.  Reverse: X = G, out = dv.
template <typename T, int N, int C, int G, bool REV>
__device__ __forceinline__ void col_pass(const Params& p, float4* kp,
                                         float2* vp) {
  using Geo = Geometry<N, C, G>;
  constexpr int P = Geo::kParts, M = N / P;
  const int part = threadIdx.x % P;
  const int b = Geo::b(p), h = Geo::h(p);
  const size_t bh = (static_cast<size_t>(b) * p.H + h) * N * N;
  float X[C][M];
#pragma unroll
  for (int c = 0; c < C; ++c) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const int i = part + P * m, j = Geo::owned(c);
      if (REV) {
        X[c][m] = p.gs[bh + i * N + j];
      } else {
        X[c][m] = p.s0 ? p.s0[b * p.s0_bstride +
                              (static_cast<size_t>(h) * N + i) * N + j]
                       : 0.f;
      }
    }
  }
  T* out = static_cast<T*>(REV ? p.dv : p.y);
  const int chunks = (p.T + kChunk - 1) / kChunk;
  for (int ch = 0; ch < chunks; ++ch) {
    const int t0 = (REV ? chunks - 1 - ch : ch) * kChunk;
    const int len = min(kChunk, p.T - t0);
    __syncthreads();  // the previous chunk is consumed
    stage<T, N, C, G, false>(p, b, h, t0, kp, vp);
    __syncthreads();
    for (int s = 0; s < len; ++s) {
      const int tt = REV ? len - 1 - s : s;
      float sc[C], acc[C];
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const float2 f = vp[tt * N + Geo::owned(c)];
        sc[c] = REV ? f.x : f.y;  // dy_j (dv) or v_j (y)
        acc[c] = 0.f;
      }
      float bonus = 0.f;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float4 e = kp[tt * N + part + P * m];
        const float a = REV ? e.y : e.x;    // k_i (dv) or r_i (y)
        const float upd = REV ? e.x : e.y;  // r_i (G update) or k_i
        bonus += e.w;
#pragma unroll
        for (int c = 0; c < C; ++c) {
          acc[c] = fmaf(a, X[c][m], acc[c]);
          X[c][m] = fmaf(e.z, X[c][m], upd * sc[c]);
        }
      }
#pragma unroll
      for (int c = 0; c < C; ++c) {
        // out_j = sum_i a_i X_ij + sc * sum_i r_i u_i k_i; sc is the
        // same for the P threads, so one reduction covers both sums.
        const float o = group_sum<P>(fmaf(sc[c], bonus, acc[c]));
        if (part == 0) {
          out[offset(p, b, t0 + tt, h, Geo::owned(c), N)] = from_float<T>(o);
        }
      }
    }
  }
  float* fin = REV ? p.ds0 : p.s_out;
#pragma unroll
  for (int c = 0; c < C; ++c) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      fin[bh + (part + P * m) * N + Geo::owned(c)] = X[c][m];
    }
  }
}

// "Row" pass: thread owns C key rows and the values part + P m.
// Forward (REV = false): X = S, out = dr, running sum P, and du.
// Reverse: X = G, out = dk, running sum Q.
template <typename T, int N, int C, int G, bool REV>
__device__ __forceinline__ void row_pass(const Params& p, float4* kp,
                                         float2* vp) {
  using Geo = Geometry<N, C, G>;
  constexpr int P = Geo::kParts, M = N / P;
  const int part = threadIdx.x % P;
  const int b = Geo::b(p), h = Geo::h(p);
  const size_t bh = (static_cast<size_t>(b) * p.H + h) * N * N;
  float X[C][M], run[C], du[C], u_i[C];
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int i = Geo::owned(c);
    u_i[c] = p.u[h * N + i];
    run[c] = 0.f;  // P (forward) or Q (reverse)
    du[c] = 0.f;
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const int j = part + P * m;
      if (REV) {
        X[c][m] = p.gs[bh + i * N + j];
        run[c] = fmaf(X[c][m], p.s_T[bh + i * N + j], run[c]);
      } else {
        X[c][m] = p.s0 ? p.s0[b * p.s0_bstride +
                              (static_cast<size_t>(h) * N + i) * N + j]
                       : 0.f;
      }
    }
    if (REV) run[c] = group_sum<P>(run[c]);  // sum_j gS_ij S_T,ij
  }
  T* out = static_cast<T*>(REV ? p.dk : p.dr);
  float* run_out = REV ? p.q : p.p;
  const int chunks = (p.T + kChunk - 1) / kChunk;
  for (int ch = 0; ch < chunks; ++ch) {
    const int t0 = (REV ? chunks - 1 - ch : ch) * kChunk;
    const int len = min(kChunk, p.T - t0);
    __syncthreads();
    stage<T, N, C, G, true>(p, b, h, t0, kp, vp);
    __syncthreads();
    for (int s = 0; s < len; ++s) {
      const int tt = REV ? len - 1 - s : s;
      float4 e[C];
      float acc[C];
#pragma unroll
      for (int c = 0; c < C; ++c) {
        e[c] = kp[tt * N + Geo::owned(c)];  // r_i, k_i, w_i
        acc[c] = 0.f;
      }
      float dot = 0.f;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float2 f = vp[tt * N + part + P * m];  // dy_j, v_j
        const float c_j = REV ? f.y : f.x;           // v_j or dy_j
        const float e_j = REV ? f.x : f.y;           // dy_j or v_j
        dot = fmaf(f.x, f.y, dot);
#pragma unroll
        for (int c = 0; c < C; ++c) {
          const float upd = REV ? e[c].x : e[c].y;  // r_i or k_i
          acc[c] = fmaf(c_j, X[c][m], acc[c]);
          X[c][m] = fmaf(e[c].z, X[c][m], upd * e_j);
        }
      }
      dot = group_sum<P>(dot);
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const float upd = REV ? e[c].x : e[c].y;   // r_i or k_i
        const float side = REV ? e[c].y : e[c].x;  // k_i (Q) or r_i (P)
        acc[c] = group_sum<P>(acc[c]);
        if (REV) {
          run[c] = fmaf(-side, acc[c], run[c]);
        } else {
          run[c] = fmaf(side, acc[c], run[c]);
          du[c] = fmaf(e[c].x * e[c].y, dot, du[c]);
        }
        if (part == 0) {
          const size_t o = offset(p, b, t0 + tt, h, Geo::owned(c), N);
          out[o] = from_float<T>(fmaf(u_i[c] * upd, dot, acc[c]));
          run_out[o] = run[c];
        }
      }
    }
  }
  if (!REV && part == 0) {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      p.du_part[(static_cast<size_t>(b) * p.H + h) * N + Geo::owned(c)] =
          du[c];
    }
  }
}

template <typename T, int N, int C, int G>
__global__ void __launch_bounds__(Geometry<N, C, G>::kThreads)
    forward_kernel(Params p) {
  __shared__ float4 kp[kChunk * N];
  __shared__ float2 vp[kChunk * N];
  col_pass<T, N, C, G, false>(p, kp, vp);
}

template <typename T, int N, int C, int G>
__global__ void __launch_bounds__(Geometry<N, C, G>::kThreads)
    backward_kernel(Params p) {
  __shared__ float4 kp[kChunk * N];
  __shared__ float2 vp[kChunk * N];
  if (blockIdx.y == 0) {
    row_pass<T, N, C, G, false>(p, kp, vp);  // dr, P, du
  } else if (blockIdx.y == 1) {
    row_pass<T, N, C, G, true>(p, kp, vp);  // dk, Q
  } else {
    col_pass<T, N, C, G, true>(p, kp, vp);  // dv, dS0
  }
}

template <typename T, int N, int C, int G>
inline cudaError_t launch(const Params& p, bool backward,
                          cudaStream_t stream) {
  const dim3 grid(p.B * p.H * G, backward ? 3 : 1);
  constexpr int threads = Geometry<N, C, G>::kThreads;
  if (backward) {
    backward_kernel<T, N, C, G><<<grid, threads, 0, stream>>>(p);
  } else {
    forward_kernel<T, N, C, G><<<grid, threads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace keras_rwkv_wkv6
