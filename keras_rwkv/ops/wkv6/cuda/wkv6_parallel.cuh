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
// (ex2.approx). float32 on CUDA cores throughout; the backward stays the
// per-step one (it needs only the inputs and the final state).
#pragma once

#include "wkv6_kernels.cuh"

namespace keras_rwkv_wkv6 {
namespace par {

constexpr int kThreads = 256;
constexpr int kSub = 8;  // steps in a sub-chunk
constexpr float kLog2e = 1.4426950408889634f;

template <int N>
struct Dims {
  static constexpr int L = N > 64 ? 32 : 64;  // steps in a chunk
  static constexpr int LP = L + 4;  // row of a key-major array: 16-byte
                                    // aligned, and 8 rows hit 8 bank groups
  static constexpr int Q = L / kSub;      // sub-chunks
  static constexpr int NB = Q * (Q - 1) / 2;  // sub-chunk pairs q > p
  static constexpr int P = kThreads / N;  // threads scanning one channel
  static constexpr int SEG = L / P;       // steps each scans
  static_assert(SEG * P == L && L % kSub == 0 && kSub == 8,
                "bad parallel geometry");
  // Shared floats of launch 1 (k, v [L][N], log decays [L + 1][N], scan
  // totals) and launch 3 (r, k, log decays [N][LP]; v [L][N]; scores
  // [L][LP]; per sub-chunk: log decay totals, 2^{a_f(q)} [Q][N]; per
  // sub-chunk pair, 2^{a_f(q) - a_e(p)} [NB][N]).
  static constexpr int kStates = 3 * L * N + N + P * N;
  static constexpr int kOutputs =
      3 * N * LP + L * N + L * LP + 2 * Q * N + NB * N;
  static constexpr int kBlock = N * N + N;  // scratch per chunk: S, decay
};

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

inline int chunks(const Params& p, int N) {
  const int L = N > 64 ? 32 : 64;
  return (p.T + L - 1) / L;
}

// In place, a[t][n] = sum_{m >= t} a[m][n] for t < L (a laid out [L][N]):
// P threads share a channel, each summing SEG steps from the end, then
// adding the totals of the parts after it.
template <int N>
__device__ __forceinline__ void suffix_sum(float* a, float* tot) {
  using D = Dims<N>;
  const int n = threadIdx.x % N, part = threadIdx.x / N;
  const int t0 = part * D::SEG;
  float run = 0.f;
#pragma unroll
  for (int t = t0 + D::SEG - 1; t >= t0; --t) {
    run += a[t * N + n];
    a[t * N + n] = run;
  }
  tot[part * N + n] = run;
  __syncthreads();
  float after = 0.f;
  for (int q = part + 1; q < D::P; ++q) after += tot[q * N + n];
  if (part + 1 < D::P) {
#pragma unroll
    for (int t = t0; t < t0 + D::SEG; ++t) a[t * N + n] += after;
  }
  __syncthreads();
}

// Launch 1: scratch[bh][c] = (sum_s (k_s 2^{a_end - a_s})^T v_s, 2^{a_end}),
// the exponents summed from the end of the chunk.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    chunk_states_kernel(Params p, float* scratch, int nc) {
  using D = Dims<N>;
  constexpr int L = D::L;
  extern __shared__ float4 smem4[];
  float* kk = reinterpret_cast<float*>(smem4);  // [L][N]
  float* vv = kk + L * N;                       // [L][N]
  float* aa = vv + L * N;                       // [L + 1][N]
  float* tot = aa + (L + 1) * N;                // [P][N]
  const int bh = blockIdx.x, c = blockIdx.y;
  const int b = bh / p.H, h = bh % p.H;
  const int t0 = c * L, len = min(L, p.T - t0);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  for (int idx = threadIdx.x; idx < L * N; idx += kThreads) {
    const int t = idx / N, n = idx % N;
    float kv = 0.f, vv_ = 0.f, lw = 0.f;  // past T: no term, no decay
    if (t < len) {
      const size_t o = offset(p, b, t0 + t, h, n, N);
      kv = to_float(k[o]);
      vv_ = to_float(v[o]);
      lw = p.log_w[o] * kLog2e;
    }
    kk[idx] = kv;
    vv[idx] = vv_;
    aa[idx] = lw;
  }
  if (threadIdx.x < N) aa[L * N + threadIdx.x] = 0.f;
  __syncthreads();
  suffix_sum<N>(aa, tot);
  // k_s 2^{sum_{m>s} log w_m}.
  for (int idx = threadIdx.x; idx < L * N; idx += kThreads) {
    kk[idx] *= ex2(aa[idx + N]);
  }
  __syncthreads();
  // Each thread an R x R tile of the N x N term (R = N / 16).
  constexpr int R = N / 16;
  const int i0 = threadIdx.x / 16 * R, j0 = threadIdx.x % 16 * R;
  float acc[R][R] = {};
  for (int s = 0; s < L; ++s) {
    float kr[R], vr[R];
#pragma unroll
    for (int x = 0; x < R; ++x) {
      kr[x] = kk[s * N + i0 + x];
      vr[x] = vv[s * N + j0 + x];
    }
#pragma unroll
    for (int x = 0; x < R; ++x) {
#pragma unroll
      for (int y = 0; y < R; ++y) acc[x][y] = fmaf(kr[x], vr[y], acc[x][y]);
    }
  }
  float* out = scratch + (static_cast<size_t>(bh) * nc + c) * D::kBlock;
#pragma unroll
  for (int x = 0; x < R; ++x) {
#pragma unroll
    for (int y = 0; y < R; ++y) out[(i0 + x) * N + j0 + y] = acc[x][y];
  }
  if (threadIdx.x < N) {
    out[N * N + threadIdx.x] = ex2(aa[threadIdx.x]);
  }
}

// Launch 2: one thread a state entry (bh, i, j) walks the chunks, leaving
// each chunk's starting state in place of its term; then the final state.
template <int N>
__global__ void __launch_bounds__(256)
    pass_states_kernel(Params p, float* scratch, int nc) {
  using D = Dims<N>;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (gid >= static_cast<int64_t>(p.B) * p.H * N * N) return;
  const int bh = static_cast<int>(gid / (N * N)), e = gid % (N * N);
  const int b = bh / p.H, h = bh % p.H, i = e / N;
  float s = p.s0 ? p.s0[b * p.s0_bstride + static_cast<size_t>(h) * N * N + e]
                 : 0.f;
  float* blk = scratch + static_cast<size_t>(bh) * nc * D::kBlock;
  constexpr int kAhead = 8;  // loads in flight before the dependent chain
  for (int c0 = 0; c0 < nc; c0 += kAhead) {
    float term[kAhead], decay[kAhead];
#pragma unroll
    for (int x = 0; x < kAhead; ++x) {
      if (c0 + x < nc) {
        term[x] = blk[(c0 + x) * D::kBlock + e];
        decay[x] = blk[(c0 + x) * D::kBlock + N * N + i];
      }
    }
#pragma unroll
    for (int x = 0; x < kAhead; ++x) {
      if (c0 + x < nc) {
        blk[(c0 + x) * D::kBlock + e] = s;
        s = fmaf(decay[x], s, term[x]);
      }
    }
  }
  p.s_out[static_cast<size_t>(bh) * N * N + e] = s;
}

// Launch 3: a chunk's outputs from its starting state.
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    chunk_outputs_kernel(Params p, const float* scratch, int nc) {
  using D = Dims<N>;
  constexpr int L = D::L, LP = D::LP, Q = D::Q;
  extern __shared__ float4 smem4[];
  float* rT = reinterpret_cast<float*>(smem4);  // [N][LP] r, then r~
  float* kT = rT + N * LP;                      // [N][LP] k, then k~
  float* wT = kT + N * LP;                      // [N][LP] log2 decays
  float* vS = wT + N * LP;                      // [L][N]
  float* AT = vS + L * N;                       // [L][LP] scores A_ts at [s][t]
  float* tot = AT + L * LP;                     // [Q][N] sub-chunk log decay
  float* E = tot + Q * N;                       // [Q][N] 2^{a_f(q)}
  float* G = E + Q * N;                         // [NB][N] 2^{a_f(q) - a_e(p)}
  const int bh = blockIdx.x, c = blockIdx.y;
  const int b = bh / p.H, h = bh % p.H;
  const int t0 = c * L, len = min(L, p.T - t0);
  const T* r = static_cast<const T*>(p.r);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  // Load: four steps of one channel a thread, stored key-major.
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
  for (int idx = threadIdx.x; idx < L * N; idx += kThreads) {
    const int t = idx / N;
    vS[idx] = t < len ? to_float(v[offset(p, b, t0 + t, h, idx % N, N)]) : 0.f;
  }
  __syncthreads();

  // Scores inside each sub-chunk: A_ts (s < t), r.u.k (s = t), 0 (s > t);
  // and each sub-chunk's total log decay.
  const float* u = p.u + h * N;
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
  for (int idx = threadIdx.x; idx < Q * N; idx += kThreads) {
    const int n = idx % N, q = idx / N;
    float x = 0.f;
#pragma unroll
    for (int m = 0; m < kSub; ++m) x += wT[n * LP + q * kSub + m];
    tot[idx] = x;
  }
  __syncthreads();

  // In place, a sub-chunk of one channel a thread:
  // r~_t = r_t 2^{a_{t-1} - a_f(q)}, k~_s = k_s 2^{a_e(q) - a_s}; and the
  // factors between sub-chunks, 2^{a_f(q)} and 2^{a_f(q) - a_e(p)}.
  for (int idx = threadIdx.x; idx < Q * N; idx += kThreads) {
    const int n = idx % N, q = idx / N;
    float* rq = rT + n * LP + q * kSub;
    float* kq = kT + n * LP + q * kSub;
    const float* wq = wT + n * LP + q * kSub;
    float rv[kSub], kv[kSub], wv[kSub];
#pragma unroll
    for (int x = 0; x < kSub; x += 4) {
      const float4 r4 = *reinterpret_cast<const float4*>(rq + x);
      const float4 k4 = *reinterpret_cast<const float4*>(kq + x);
      const float4 w4 = *reinterpret_cast<const float4*>(wq + x);
      rv[x] = r4.x, rv[x + 1] = r4.y, rv[x + 2] = r4.z, rv[x + 3] = r4.w;
      kv[x] = k4.x, kv[x + 1] = k4.y, kv[x + 2] = k4.z, kv[x + 3] = k4.w;
      wv[x] = w4.x, wv[x + 1] = w4.y, wv[x + 2] = w4.z, wv[x + 3] = w4.w;
    }
    float before = 0.f, after = 0.f;
#pragma unroll
    for (int x = 0; x < kSub; ++x) {
      rv[x] *= ex2(before);
      before += wv[x];
      kv[kSub - 1 - x] *= ex2(after);
      after += wv[kSub - 1 - x];
    }
#pragma unroll
    for (int x = 0; x < kSub; x += 4) {
      *reinterpret_cast<float4*>(rq + x) =
          make_float4(rv[x], rv[x + 1], rv[x + 2], rv[x + 3]);
      *reinterpret_cast<float4*>(kq + x) =
          make_float4(kv[x], kv[x + 1], kv[x + 2], kv[x + 3]);
    }
    float f = 0.f;
    for (int m = 0; m < q; ++m) f += tot[m * N + n];
    E[idx] = ex2(f);
  }
  for (int idx = threadIdx.x; idx < D::NB * N; idx += kThreads) {
    const int n = idx % N, blk = idx / N;
    int q = 1;
    while ((q + 1) * q / 2 <= blk) ++q;
    float x = 0.f;  // the sub-chunks strictly between p and q
    for (int m = blk - q * (q - 1) / 2 + 1; m < q; ++m) x += tot[m * N + n];
    G[idx] = ex2(x);
  }
  __syncthreads();

  // Scores between sub-chunks q > p, in tiles of 4 t x 2 s.
  {
    constexpr int kTiles = D::NB * (kSub / 4) * (kSub / 2);
    for (int tile = threadIdx.x; tile < kTiles; tile += kThreads) {
      const int blk = tile / (kSub * kSub / 8);
      int q = 1;
      while ((q + 1) * q / 2 <= blk) ++q;
      const int pp = blk - q * (q - 1) / 2;
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
  __syncthreads();

  // Outputs, a tile of 4 t x TC values a thread:
  // y_t = sum_{s<=t} A_ts v_s + (r~_t 2^{a_f(q)}) S_start.
  constexpr int TC = L * N / kThreads / 4;
  const int tr = threadIdx.x / (N / TC) * 4, j0 = threadIdx.x % (N / TC) * TC;
  const int q = tr / kSub;
  float acc[4][TC] = {};
  for (int s = 0; s < tr + 4; ++s) {
    const float4 a4 = *reinterpret_cast<const float4*>(AT + s * LP + tr);
    const float as[4] = {a4.x, a4.y, a4.z, a4.w};
#pragma unroll
    for (int y = 0; y < TC; ++y) {
      const float vj = vS[s * N + j0 + y];
#pragma unroll
      for (int x = 0; x < 4; ++x) acc[x][y] = fmaf(as[x], vj, acc[x][y]);
    }
  }
  const float* s_start =
      scratch + (static_cast<size_t>(bh) * nc + c) * D::kBlock;
  for (int i = 0; i < N; ++i) {
    const float4 r4 = *reinterpret_cast<const float4*>(rT + i * LP + tr);
    const float ef = E[q * N + i];
    const float rs[4] = {r4.x * ef, r4.y * ef, r4.z * ef, r4.w * ef};
#pragma unroll
    for (int y = 0; y < TC; ++y) {
      const float sij = __ldg(s_start + i * N + j0 + y);
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
        y_out[offset(p, b, t0 + tr + x, h, j0 + y, N)] =
            from_float<T>(acc[x][y]);
      }
    }
  }
}

// Bytes of scratch the parallel forward needs: a state and a decay per
// chunk of every (batch, head).
inline size_t scratch_bytes(const Params& p, int N) {
  return static_cast<size_t>(p.B) * p.H * chunks(p, N) * (N * N + N) *
         sizeof(float);
}

template <typename K>
inline cudaError_t allow_shared(K kernel, int bytes) {
  // Above 48 KB a kernel must opt in; cheap, so done at each launch.
  return cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename T, int N>
inline cudaError_t launch(const Params& p, cudaStream_t stream) {
  using D = Dims<N>;
  const int nc = chunks(p, N);
  float* scratch = static_cast<float*>(p.scratch);
  const dim3 grid(p.B * p.H, nc);
  const int smem1 = D::kStates * sizeof(float);
  const int smem3 = D::kOutputs * sizeof(float);
  cudaError_t err = allow_shared(chunk_states_kernel<T, N>, smem1);
  if (err == cudaSuccess) {
    err = allow_shared(chunk_outputs_kernel<T, N>, smem3);
  }
  if (err != cudaSuccess) return err;
  chunk_states_kernel<T, N><<<grid, kThreads, smem1, stream>>>(p, scratch, nc);
  const int64_t entries = static_cast<int64_t>(p.B) * p.H * N * N;
  pass_states_kernel<N>
      <<<static_cast<unsigned>((entries + 255) / 256), 256, 0, stream>>>(
          p, scratch, nc);
  chunk_outputs_kernel<T, N>
      <<<grid, kThreads, smem3, stream>>>(p, scratch, nc);
  return cudaGetLastError();
}

}  // namespace par
}  // namespace keras_rwkv_wkv6
