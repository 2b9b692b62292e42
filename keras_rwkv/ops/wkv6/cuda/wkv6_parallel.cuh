// Chunk-parallel WKV6 forward ("parallel" form): every chunk of every
// (batch, head) at once, where the per-step kernel walks time in order.
//
// With a_t the running sum of log decays inside a chunk (a_{-1} = 0),
//   S_end = diag(e^{a_{L-1}}) S_start + sum_s (k_s e^{a_{L-1} - a_s})^T v_s
//   y_t   = (r_t e^{a_{t-1}}) S_start + sum_{s<t} A_ts v_s + (r_t.u.k_t) v_t
//   A_ts  = sum_i r_ti k_si e^{a_{t-1,i} - a_si}
// Three launches: (1) one block a chunk sums its own state term and decay
// into scratch; (2) one thread a state entry passes the states along the
// chunks in order, leaving each chunk's S_start in place of its term (and
// the final state); (3) one block a chunk writes its outputs.
//
// No exponent is ever above 0 (so nothing overflows; what underflows was
// negligible), and each is summed from the log decays it spans, never a
// difference of two running sums (whose float32 rounding grows with the
// decay before them). The scores between sub-chunks of kSub steps factor
// through the sub-chunk boundaries, q > p:
//   e^{a_{t-1} - a_s} = e^{a_{t-1} - a_f(q)} e^{a_f(q) - a_e(p)} e^{a_e(p) - a_s}
// with f(q) the step before sub-chunk q and e(p) the last of sub-chunk p:
// one exponential per element of r and k plus one per (q, p, i). Inside a
// sub-chunk each pair takes its own exponential. Logs are kept in base 2
// (ex2.approx). float32 on CUDA cores throughout. This file holds the
// pieces both directions use and the forward; the backward, in the same
// form, is in wkv6_parallel_bwd.cuh.
#pragma once

#include "wkv6_kernels.cuh"

namespace keras_rwkv_wkv6 {
namespace par {

constexpr int kThreads = 256;
constexpr int kSub = 8;  // steps in a sub-chunk
constexpr float kLog2e = 1.4426950408889634f;

// Steps in a chunk: the forward's (64; 32 for N = 128) and the
// backward's, which keeps twice the arrays in shared memory.
template <int N>
constexpr int kFwdLen = N > 64 ? 32 : 64;
template <int N>
constexpr int kBwdLen = N > 64 ? 16 : 32;

template <int N, int L_>
struct Dims {
  static constexpr int L = L_;
  static constexpr int LP = L + 4;  // row of a key-major array: 16-byte
                                    // aligned, and 8 rows hit 8 bank groups
  static constexpr int Q = L / kSub;          // sub-chunks
  static constexpr int NB = Q * (Q - 1) / 2;  // sub-chunk pairs q > p
  static constexpr int P = kThreads / N;      // threads scanning a channel
  static constexpr int SEG = L / P;           // steps each scans
  static_assert(SEG >= 1 && SEG * P == L && L % kSub == 0 && kSub == 8,
                "bad parallel geometry");
  // Shared floats of the chunk terms (two [L][N] inputs, log decays with
  // a zero row either side [L + 2][N], scan totals) and of the forward's
  // outputs (r, k, log decays [N][LP]; v [L][N]; scores [L][LP]; per
  // sub-chunk: log decay totals and 2^{a_f(q)} [Q][N]; per sub-chunk
  // pair 2^{a_f(q) - a_e(p)} [NB][N]).
  static constexpr int kTerms = 2 * L * N + (L + 2) * N + P * N;
  static constexpr int kOutputs =
      3 * N * LP + L * N + L * LP + 2 * Q * N + NB * N;
  static constexpr int kBlock = N * N + N;  // scratch a chunk: S, decay
};

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

inline int chunks(const Params& p, int L) { return (p.T + L - 1) / L; }

// In place, the running sum over time of a[t][n] (laid out [L][N]),
// inclusive, from the start (REVERSE false) or the end: P threads share a
// channel, each summing SEG steps, then adding the totals of the parts
// before (after) it.
template <int N, int L, bool REVERSE>
__device__ __forceinline__ void scan_time(float* a, float* tot) {
  using D = Dims<N, L>;
  const int n = threadIdx.x % N, part = threadIdx.x / N;
  const int t0 = part * D::SEG;
  float run = 0.f;
#pragma unroll
  for (int x = 0; x < D::SEG; ++x) {
    const int t = REVERSE ? t0 + D::SEG - 1 - x : t0 + x;
    run += a[t * N + n];
    a[t * N + n] = run;
  }
  tot[part * N + n] = run;
  __syncthreads();
  float carry = 0.f;
  for (int q = REVERSE ? part + 1 : 0; q < (REVERSE ? D::P : part); ++q) {
    carry += tot[q * N + n];
  }
#pragma unroll
  for (int x = 0; x < D::SEG; ++x) a[(t0 + x) * N + n] += carry;
  __syncthreads();
}

// Launch 1 (and the backward's first): a chunk's own term of the state
// hand-over. GRAD false: (sum_s (k_s 2^{a_end - a_s})^T v_s, 2^{a_end})
// into `states`; GRAD true: sum_t (r_t 2^{a_{t-1}})^T dy_t into `grads`,
// the term of the gradient's hand-over. Exponents are summed from the
// chunk's end (its start).
template <typename T, int N, int L, bool GRAD>
__device__ __forceinline__ void chunk_term(const Params& p, float* out) {
  using D = Dims<N, L>;
  extern __shared__ float4 smem4[];
  float* xx = reinterpret_cast<float*>(smem4);  // [L][N] k or r
  float* yy = xx + L * N;                       // [L][N] v or dy
  float* aa = yy + L * N + N;                   // [L][N], zero rows -1, L
  float* tot = aa + (L + 1) * N;                // [P][N]
  const int bh = blockIdx.x, c = blockIdx.y;
  const int b = bh / p.H, h = bh % p.H;
  const int t0 = c * L, len = min(L, p.T - t0);
  const T* x = static_cast<const T*>(GRAD ? p.r : p.k);
  const T* y = static_cast<const T*>(GRAD ? p.dy : p.v);
  for (int idx = threadIdx.x; idx < L * N; idx += kThreads) {
    const int t = idx / N, n = idx % N;
    float xv = 0.f, yv = 0.f, lw = 0.f;  // past T: no term, no decay
    if (t < len) {
      const size_t o = offset(p, b, t0 + t, h, n, N);
      xv = to_float(x[o]);
      yv = to_float(y[o]);
      lw = p.log_w[o] * kLog2e;
    }
    xx[idx] = xv;
    yy[idx] = yv;
    aa[idx] = lw;
  }
  if (threadIdx.x < N) {
    const int n = threadIdx.x;  // signed: aa[n - N] is the row before
    aa[n - N] = aa[L * N + n] = 0.f;
  }
  __syncthreads();
  scan_time<N, L, !GRAD>(aa, tot);
  // k_s 2^{sum_{m>s} log w_m}, or r_t 2^{sum_{m<t} log w_m}.
  for (int idx = threadIdx.x; idx < L * N; idx += kThreads) {
    xx[idx] *= ex2(aa[GRAD ? idx - N : idx + N]);
  }
  __syncthreads();
  // Each thread an R x R tile of the N x N term (R = N / 16), its rows
  // and columns 16 apart, so a warp's lanes read and write neighbours.
  constexpr int R = N / 16;
  const int i0 = threadIdx.x / 16, j0 = threadIdx.x % 16;
  float acc[R][R] = {};
  for (int s = 0; s < L; ++s) {
    float xr[R], yr[R];
#pragma unroll
    for (int e = 0; e < R; ++e) {
      xr[e] = xx[s * N + i0 + 16 * e];
      yr[e] = yy[s * N + j0 + 16 * e];
    }
#pragma unroll
    for (int e = 0; e < R; ++e) {
#pragma unroll
      for (int f = 0; f < R; ++f) acc[e][f] = fmaf(xr[e], yr[f], acc[e][f]);
    }
  }
#pragma unroll
  for (int e = 0; e < R; ++e) {
#pragma unroll
    for (int f = 0; f < R; ++f) {
      out[(i0 + 16 * e) * N + j0 + 16 * f] = acc[e][f];
    }
  }
  if (!GRAD && threadIdx.x < N) {
    out[N * N + threadIdx.x] = ex2(aa[threadIdx.x]);
  }
}

// blockIdx.z 0: the state's term into states[bh][c] (N * N + N floats);
// 1: the gradient's into grads[bh][c] (N * N).
template <typename T, int N, int L>
__global__ void __launch_bounds__(kThreads)
    chunk_terms_kernel(Params p, float* states, float* grads, int nc) {
  const size_t chunk = static_cast<size_t>(blockIdx.x) * nc + blockIdx.y;
  if (blockIdx.z == 0) {
    chunk_term<T, N, L, false>(p, states + chunk * (N * N + N));
  } else {
    chunk_term<T, N, L, true>(p, grads + chunk * N * N);
  }
}

// Launch 2: one thread a state entry (bh, i, j) walks the chunks, leaving
// in place of each chunk's term (blockIdx.y 0) the state the chunk starts
// from, then writing the final state (if p.s_out); or (1) walking back,
// the gradient of the state the chunk ends with, then writing dL/dS_0.
template <int N>
__global__ void __launch_bounds__(256)
    pass_states_kernel(Params p, float* states, float* grads, int nc) {
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (gid >= static_cast<int64_t>(p.B) * p.H * N * N) return;
  const bool back = blockIdx.y == 1;
  const int bh = static_cast<int>(gid / (N * N)), e = gid % (N * N);
  const int b = bh / p.H, h = bh % p.H, i = e / N;
  const size_t hh = static_cast<size_t>(h) * N * N;
  float s;
  if (back) {
    s = p.gs[static_cast<size_t>(bh) * N * N + e];
  } else {
    s = p.s0 ? p.s0[b * p.s0_bstride + hh + e] : 0.f;
  }
  const float* decays = states + static_cast<size_t>(bh) * nc * (N * N + N);
  float* terms = back ? grads + static_cast<size_t>(bh) * nc * N * N
                      : states + static_cast<size_t>(bh) * nc * (N * N + N);
  const int stride = back ? N * N : N * N + N;
  constexpr int kAhead = 8;  // loads in flight before the dependent chain
  for (int c0 = 0; c0 < nc; c0 += kAhead) {
    float term[kAhead], decay[kAhead];
#pragma unroll
    for (int x = 0; x < kAhead; ++x) {
      const int c = back ? nc - 1 - (c0 + x) : c0 + x;
      if (c0 + x < nc) {
        term[x] = terms[c * stride + e];
        decay[x] = decays[c * (N * N + N) + N * N + i];
      }
    }
#pragma unroll
    for (int x = 0; x < kAhead; ++x) {
      const int c = back ? nc - 1 - (c0 + x) : c0 + x;
      if (c0 + x < nc) {
        terms[c * stride + e] = s;
        s = fmaf(decay[x], s, term[x]);
      }
    }
  }
  float* out = back ? p.ds0 : p.s_out;
  if (out) out[static_cast<size_t>(bh) * N * N + e] = s;
}

// --- pieces of one chunk in shared memory (launch 3 and the backward's) ---

// r, k and log2 w of steps [t0, t0 + len) key-major ([N][LP]), zero past
// len: four steps of one channel a thread.
template <typename T, int N, int L>
__device__ __forceinline__ void load_key_major(const Params& p, int b,
                                               int h, int t0, int len,
                                               float* rT, float* kT,
                                               float* wT) {
  constexpr int LP = Dims<N, L>::LP;
  const T* r = static_cast<const T*>(p.r);
  const T* k = static_cast<const T*>(p.k);
  for (int idx = threadIdx.x; idx < L / 4 * N; idx += kThreads) {
    const int n = idx % N, t = idx / N * 4;
    float rv[4], kv[4], wv[4];
#pragma unroll
    for (int x = 0; x < 4; ++x) {
      rv[x] = kv[x] = wv[x] = 0.f;
      if (t + x < len) {
        const size_t o = offset(p, b, t0 + t + x, h, n, N);
        rv[x] = to_float(r[o]);
        kv[x] = to_float(k[o]);
        wv[x] = p.log_w[o] * kLog2e;
      }
    }
    const int o = n * LP + t;
    *reinterpret_cast<float4*>(rT + o) = make_float4(rv[0], rv[1], rv[2], rv[3]);
    *reinterpret_cast<float4*>(kT + o) = make_float4(kv[0], kv[1], kv[2], kv[3]);
    *reinterpret_cast<float4*>(wT + o) = make_float4(wv[0], wv[1], wv[2], wv[3]);
  }
}

// x of steps [t0, t0 + len) time-major ([L][N]), zero past len.
template <typename T, int N, int L>
__device__ __forceinline__ void load_time_major(const Params& p, const void* x,
                                                int b, int h, int t0,
                                                int len, float* out) {
  const T* src = static_cast<const T*>(x);
  for (int idx = threadIdx.x; idx < L * N; idx += kThreads) {
    const int t = idx / N;
    out[idx] =
        t < len ? to_float(src[offset(p, b, t0 + t, h, idx % N, N)]) : 0.f;
  }
}

// Scores inside each sub-chunk, AT[s][t]: A_ts (s < t), r.u.k (s = t), 0
// (s > t); and each sub-chunk's total log decay, tot[q][n].
template <int N, int L>
__device__ __forceinline__ void diagonal_scores(const float* rT,
                                                const float* kT,
                                                const float* wT,
                                                const float* u, float* AT,
                                                float* tot) {
  constexpr int LP = Dims<N, L>::LP;
  for (int idx = threadIdx.x; idx < L * kSub; idx += kThreads) {
    const int t = idx / kSub, s = t / kSub * kSub + idx % kSub;
    float acc = 0.f;
    if (s < t) {
      for (int i = 0; i < N; ++i) {
        float x = 0.f;  // sum of log2 w over (s, t)
        for (int m = s + 1; m < t; ++m) x += wT[i * LP + m];
        acc = fmaf(rT[i * LP + t] * kT[i * LP + s], ex2(x), acc);
      }
    } else if (s == t) {
      for (int i = 0; i < N; ++i) {
        acc = fmaf(rT[i * LP + t] * u[i], kT[i * LP + t], acc);
      }
    }
    AT[s * LP + t] = acc;
  }
  for (int idx = threadIdx.x; idx < L / kSub * N; idx += kThreads) {
    const int n = idx % N, q = idx / N;
    float x = 0.f;
#pragma unroll
    for (int m = 0; m < kSub; ++m) x += wT[n * LP + q * kSub + m];
    tot[idx] = x;
  }
}

// The sub-chunk factors, in place, a sub-chunk of one channel a thread:
// r~_t = r_t rho_t, rho_t = 2^{a_{t-1} - a_f(q)}; k~_s = k_s kappa_s,
// kappa_s = 2^{a_e(p) - a_s}; E[q] = 2^{a_f(q)}, and G[q > p] =
// 2^{a_f(q) - a_e(p)}. With FACTORS (the backward) also rho (over wT),
// kappa (into kapT) and H[p] = 2^{a_end - a_e(p)}.
template <int N, int L, bool FACTORS>
__device__ __forceinline__ void sub_chunk_factors(float* rT, float* kT,
                                                  float* wT, float* kapT,
                                                  const float* tot, float* E,
                                                  float* H, float* G) {
  using D = Dims<N, L>;
  constexpr int LP = D::LP;
  for (int idx = threadIdx.x; idx < D::Q * N; idx += kThreads) {
    const int n = idx % N, q = idx / N, o = n * LP + q * kSub;
    float rv[kSub], kv[kSub], wv[kSub], rho[kSub], kap[kSub];
#pragma unroll
    for (int x = 0; x < kSub; x += 4) {
      const float4 r4 = *reinterpret_cast<const float4*>(rT + o + x);
      const float4 k4 = *reinterpret_cast<const float4*>(kT + o + x);
      const float4 w4 = *reinterpret_cast<const float4*>(wT + o + x);
      rv[x] = r4.x, rv[x + 1] = r4.y, rv[x + 2] = r4.z, rv[x + 3] = r4.w;
      kv[x] = k4.x, kv[x + 1] = k4.y, kv[x + 2] = k4.z, kv[x + 3] = k4.w;
      wv[x] = w4.x, wv[x + 1] = w4.y, wv[x + 2] = w4.z, wv[x + 3] = w4.w;
    }
    float before = 0.f, after = 0.f;
#pragma unroll
    for (int x = 0; x < kSub; ++x) {
      rho[x] = ex2(before);
      before += wv[x];
      kap[kSub - 1 - x] = ex2(after);
      after += wv[kSub - 1 - x];
    }
#pragma unroll
    for (int x = 0; x < kSub; x += 4) {
      *reinterpret_cast<float4*>(rT + o + x) =
          make_float4(rv[x] * rho[x], rv[x + 1] * rho[x + 1],
                      rv[x + 2] * rho[x + 2], rv[x + 3] * rho[x + 3]);
      *reinterpret_cast<float4*>(kT + o + x) =
          make_float4(kv[x] * kap[x], kv[x + 1] * kap[x + 1],
                      kv[x + 2] * kap[x + 2], kv[x + 3] * kap[x + 3]);
      if (FACTORS) {
        *reinterpret_cast<float4*>(wT + o + x) =
            make_float4(rho[x], rho[x + 1], rho[x + 2], rho[x + 3]);
        *reinterpret_cast<float4*>(kapT + o + x) =
            make_float4(kap[x], kap[x + 1], kap[x + 2], kap[x + 3]);
      }
    }
    float f = 0.f;
    for (int m = 0; m < q; ++m) f += tot[m * N + n];
    E[idx] = ex2(f);
    if (FACTORS) {
      float g = 0.f;
      for (int m = q + 1; m < D::Q; ++m) g += tot[m * N + n];
      H[idx] = ex2(g);
    }
  }
  for (int idx = threadIdx.x; idx < D::NB * N; idx += kThreads) {
    const int n = idx % N, blk = idx / N;
    int q = 1;
    while ((q + 1) * q / 2 <= blk) ++q;
    float x = 0.f;  // the sub-chunks strictly between p and q
    for (int m = blk - q * (q - 1) / 2 + 1; m < q; ++m) x += tot[m * N + n];
    G[idx] = ex2(x);
  }
}

// Sub-chunk pair `blk` (q > p, numbered (1,0), (2,0), (2,1), (3,0), ...).
__device__ __forceinline__ void sub_chunk_pair(int blk, int* q, int* p) {
  int qq = 1;
  while ((qq + 1) * qq / 2 <= blk) ++qq;
  *q = qq;
  *p = blk - qq * (qq - 1) / 2;
}

// Scores between sub-chunks q > p, AT[s][t] = sum_i r~_ti G_qp,i k~_si,
// in tiles of 4 t x 2 s.
template <int N, int L>
__device__ __forceinline__ void cross_scores(const float* rT,
                                             const float* kT,
                                             const float* G, float* AT) {
  using D = Dims<N, L>;
  constexpr int LP = D::LP;
  constexpr int kTiles = D::NB * (kSub / 4) * (kSub / 2);
  for (int tile = threadIdx.x; tile < kTiles; tile += kThreads) {
    const int blk = tile / (kSub * kSub / 8);
    int q, pp;
    sub_chunk_pair(blk, &q, &pp);
    const int in = tile % (kSub * kSub / 8);
    const int tq = q * kSub + in / (kSub / 2) * 4;
    const int sp = pp * kSub + in % (kSub / 2) * 2;
    float acc[4][2] = {};
    for (int i = 0; i < N; ++i) {
      const float4 r4 = *reinterpret_cast<const float4*>(rT + i * LP + tq);
      const float2 k2 = *reinterpret_cast<const float2*>(kT + i * LP + sp);
      const float g = G[blk * N + i];
      const float ks[2] = {k2.x * g, k2.y * g};
      const float rs[4] = {r4.x, r4.y, r4.z, r4.w};
#pragma unroll
      for (int x = 0; x < 4; ++x) {
#pragma unroll
        for (int y = 0; y < 2; ++y) acc[x][y] = fmaf(rs[x], ks[y], acc[x][y]);
      }
    }
#pragma unroll
    for (int y = 0; y < 2; ++y) {
      *reinterpret_cast<float4*>(AT + (sp + y) * LP + tq) =
          make_float4(acc[0][y], acc[1][y], acc[2][y], acc[3][y]);
    }
  }
}

// Launch 3: a chunk's outputs from its starting state (states[bh][c]).
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    chunk_outputs_kernel(Params p, const float* states, int nc) {
  constexpr int L = kFwdLen<N>;
  using D = Dims<N, L>;
  constexpr int LP = D::LP, Q = D::Q;
  extern __shared__ float4 smem4[];
  float* rT = reinterpret_cast<float*>(smem4);  // [N][LP] r, then r~
  float* kT = rT + N * LP;                      // [N][LP] k, then k~
  float* wT = kT + N * LP;                      // [N][LP] log2 decays
  float* vS = wT + N * LP;                      // [L][N]
  float* AT = vS + L * N;                       // [L][LP] A_ts at [s][t]
  float* tot = AT + L * LP;                     // [Q][N]
  float* E = tot + Q * N;                       // [Q][N]
  float* G = E + Q * N;                         // [NB][N]
  const int bh = blockIdx.x, c = blockIdx.y;
  const int b = bh / p.H, h = bh % p.H;
  const int t0 = c * L, len = min(L, p.T - t0);
  load_key_major<T, N, L>(p, b, h, t0, len, rT, kT, wT);
  load_time_major<T, N, L>(p, p.v, b, h, t0, len, vS);
  __syncthreads();
  diagonal_scores<N, L>(rT, kT, wT, p.u + h * N, AT, tot);
  __syncthreads();
  sub_chunk_factors<N, L, false>(rT, kT, wT, nullptr, tot, E, nullptr, G);
  __syncthreads();
  cross_scores<N, L>(rT, kT, G, AT);
  __syncthreads();

  // A tile of 4 t x TC values a thread, the values CS apart (a warp's
  // lanes read and write neighbours):
  // y_t = sum_{s<=t} A_ts v_s + (r~_t 2^{a_f(q)}) S_start.
  constexpr int TC = L * N / kThreads / 4, CS = N / TC;
  const int tr = threadIdx.x / CS * 4, j0 = threadIdx.x % CS;
  const int q = tr / kSub;
  float acc[4][TC] = {};
  for (int s = 0; s < tr + 4; ++s) {
    const float4 a4 = *reinterpret_cast<const float4*>(AT + s * LP + tr);
    const float as[4] = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
    for (int y = 0; y < TC; ++y) {
      const float vj = vS[s * N + j0 + y * CS];
#pragma unroll
      for (int x = 0; x < 4; ++x) acc[x][y] = fmaf(as[x], vj, acc[x][y]);
    }
  }
  const float* s_start =
      states + (static_cast<size_t>(bh) * nc + c) * D::kBlock;
  for (int i = 0; i < N; ++i) {
    const float4 r4 = *reinterpret_cast<const float4*>(rT + i * LP + tr);
    const float ef = E[q * N + i];
    const float rs[4] = {r4.x * ef, r4.y * ef, r4.z * ef, r4.w * ef};
#pragma unroll
    for (int y = 0; y < TC; ++y) {
      const float sij = __ldg(s_start + i * N + j0 + y * CS);
#pragma unroll
      for (int x = 0; x < 4; ++x) acc[x][y] = fmaf(rs[x], sij, acc[x][y]);
    }
  }
  T* y_out = static_cast<T*>(p.y);
#pragma unroll
  for (int x = 0; x < 4; ++x) {
    if (tr + x < len) {
#pragma unroll
      for (int y = 0; y < TC; ++y) {
        y_out[offset(p, b, t0 + tr + x, h, j0 + y * CS, N)] =
            from_float<T>(acc[x][y]);
      }
    }
  }
}

// Bytes of scratch the parallel forward needs: a state and a decay per
// chunk of every (batch, head).
inline size_t forward_scratch_bytes(const Params& p, int N) {
  return static_cast<size_t>(p.B) * p.H * chunks(p, N > 64 ? 32 : 64) *
         (N * N + N) * sizeof(float);
}
template <typename K>
inline cudaError_t allow_shared(K kernel, int bytes) {
  // Above 48 KB a kernel must opt in; cheap, so done at each launch.
  return cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// Launches 1 and 2 over chunks of L steps: the chunks' starting states in
// `states` (and, with GRAD, the gradients of their ending states in
// `grads`, and dL/dS_0).
template <typename T, int N, int L, bool GRAD>
inline cudaError_t hand_over(const Params& p, float* states, float* grads,
                             cudaStream_t stream) {
  const int nc = chunks(p, L);
  const int smem = Dims<N, L>::kTerms * sizeof(float);
  const cudaError_t err = allow_shared(chunk_terms_kernel<T, N, L>, smem);
  if (err != cudaSuccess) return err;
  chunk_terms_kernel<T, N, L>
      <<<dim3(p.B * p.H, nc, GRAD ? 2 : 1), kThreads, smem, stream>>>(
          p, states, grads, nc);
  const int64_t entries = static_cast<int64_t>(p.B) * p.H * N * N;
  pass_states_kernel<N>
      <<<dim3(static_cast<unsigned>((entries + 255) / 256), GRAD ? 2 : 1),
         256, 0, stream>>>(p, states, grads, nc);
  return cudaGetLastError();
}

template <typename T, int N>
inline cudaError_t launch(const Params& p, cudaStream_t stream) {
  constexpr int L = kFwdLen<N>;
  float* states = static_cast<float*>(p.scratch);
  cudaError_t err = hand_over<T, N, L, false>(p, states, nullptr, stream);
  const int smem = Dims<N, L>::kOutputs * sizeof(float);
  if (err == cudaSuccess) {
    err = allow_shared(chunk_outputs_kernel<T, N>, smem);
  }
  if (err != cudaSuccess) return err;
  chunk_outputs_kernel<T, N>
      <<<dim3(p.B * p.H, chunks(p, L)), kThreads, smem, stream>>>(
          p, states, chunks(p, L));
  return cudaGetLastError();
}

}  // namespace par
}  // namespace keras_rwkv_wkv6
