// Chunk-parallel WKV6 backward: the per-step backward's outputs (dr, dk,
// dv, the running sums P and Q of dlog_w, du per batch row, dS_0; see
// wkv6_kernels.cuh) with every chunk at once. Five launches:
//   1-2. the hand-over in both directions (wkv6_parallel.cuh): each
//        chunk's starting state S_start and the gradient G_end of the
//        state it ends with (G_{t-1} = diag(w_t) G_t + r_t^T dy_t, so a
//        chunk adds sum_t (r_t 2^{a_{t-1}})^T dy_t), and dS_0;
//   3. one block a chunk: with B_ts = dy_t.v_s and the forward's scores
//      A_ts,
//        dv_s = sum_{t>=s} A_ts dy_t + (k_s 2^{a_end - a_s}) G_end
//        dr'_t = 2^{a_{t-1}} (S_start dy_t) + sum_{s<t} B_ts k_s 2^{a_{t-1} - a_s}
//        dk'_s = 2^{a_end - a_s} (G_end v_s) + sum_{t>s} B_ts r_t 2^{a_{t-1} - a_s}
//      (dr = dr' + u k_t B_tt, dk = dk' + u r_s B_ss), the factors split
//      at sub-chunk boundaries as in the forward; and the chunk's own
//      running sums of r.dr' (from its start) and k.dk' (from its end);
//   4. one thread a (batch, head, key): the sums' carries over chunks,
//      and du;
//   5. the carries added to P and Q.
#pragma once

#include "wkv6_parallel.cuh"

namespace keras_rwkv_wkv6 {
namespace par {

template <int N, int L>
struct BwdDims : Dims<N, L> {
  using D = Dims<N, L>;
  // Launch 3's shared floats: r~, k~, rho, kappa [N][LP]; v, dy [L][N];
  // A at [s][t] and B at [t][s], [L][LP]; per sub-chunk: log decay
  // totals, 2^{a_f(q)}, 2^{a_end - a_e(q)} [Q][N]; per pair [NB][N]; and
  // S_start, then G_end, transposed [N][N + 1].
  static constexpr int kGrads = 4 * N * D::LP + 2 * L * N + 2 * L * D::LP +
                                3 * D::Q * N + D::NB * N + N * (N + 1);
  // Output tiles of launch 3: 2 steps x TC keys (or values) a thread, the
  // keys N / TC apart, so a warp's lanes read and write neighbours.
  static constexpr int TC = L * N / kThreads / 2;
  static_assert(TC >= 1 && 2 * TC * kThreads == L * N, "bad tiles");
  static_assert(D::P * N <= L * D::LP, "scan totals reuse the scores");
};

// Scratch of the parallel backward, per chunk of every (batch, head):
// S_start and the decay, G_end, and three sums per key.
template <int N>
struct BwdScratch {
  float* states;  // [BH][nc][N * N + N]
  float* grads;   // [BH][nc][N * N]
  float* sums;    // [BH][nc][3][N]: r.dr', k.dk' totals; du
  __host__ __device__ BwdScratch(const Params& p, int nc) {
    const size_t chunks = static_cast<size_t>(p.B) * p.H * nc;
    states = static_cast<float*>(p.scratch);
    grads = states + chunks * (N * N + N);
    sums = grads + chunks * N * N;
  }
};

inline size_t backward_scratch_bytes(const Params& p, int N) {
  const int L = N > 64 ? 16 : 32;
  return static_cast<size_t>(p.B) * p.H * chunks(p, L) *
         (2 * N * N + 4 * N) * sizeof(float);
}

// B_ts = dy_t.v_s for s <= t, at BS[t][s], in 2 x 2 tiles over the lower
// triangle.
template <int N, int L>
__device__ __forceinline__ void value_scores(const float* dyS,
                                             const float* vS, float* BS) {
  constexpr int LP = Dims<N, L>::LP, M = L / 2;
  for (int tile = threadIdx.x; tile < M * (M + 1) / 2; tile += kThreads) {
    int ti = 0;
    while ((ti + 1) * (ti + 2) / 2 <= tile) ++ti;
    const int t = 2 * ti, s = 2 * (tile - ti * (ti + 1) / 2);
    float acc[2][2] = {};
    for (int j = 0; j < N; j += 4) {
      float4 d[2], v[2];
#pragma unroll
      for (int x = 0; x < 2; ++x) {
        d[x] = *reinterpret_cast<const float4*>(dyS + (t + x) * N + j);
        v[x] = *reinterpret_cast<const float4*>(vS + (s + x) * N + j);
      }
#pragma unroll
      for (int x = 0; x < 2; ++x) {
#pragma unroll
        for (int y = 0; y < 2; ++y) {
          acc[x][y] += d[x].x * v[y].x + d[x].y * v[y].y + d[x].z * v[y].z +
                       d[x].w * v[y].w;
        }
      }
    }
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      *reinterpret_cast<float2*>(BS + (t + x) * LP + s) =
          make_float2(acc[x][0], acc[x][1]);
    }
  }
}

template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    chunk_grads_kernel(Params p, int nc) {
  constexpr int L = kBwdLen<N>;
  using D = BwdDims<N, L>;
  constexpr int LP = D::LP, Q = D::Q, TC = D::TC;
  extern __shared__ float4 smem4[];
  float* rT = reinterpret_cast<float*>(smem4);  // [N][LP] r, then r~
  float* kT = rT + N * LP;                      // [N][LP] k, then k~
  float* wT = kT + N * LP;                      // [N][LP] log2 w, then rho
  float* kapT = wT + N * LP;                    // [N][LP] kappa
  float* vS = kapT + N * LP;                    // [L][N] v, then r.dr'
  float* dyS = vS + L * N;                      // [L][N] dy, then k.dk'
  float* AT = dyS + L * N;                      // [L][LP] A_ts at [s][t]
  float* BS = AT + L * LP;                      // [L][LP] B_ts at [t][s]
  float* tot = BS + L * LP;                     // [Q][N]
  float* E = tot + Q * N;                       // [Q][N] 2^{a_f(q)}
  float* H = E + Q * N;                         // [Q][N] 2^{a_end - a_e(q)}
  float* G = H + Q * N;                         // [NB][N]
  float* XT = G + D::NB * N;                    // [N][N + 1]
  const int bh = blockIdx.x, c = blockIdx.y;
  const int b = bh / p.H, h = bh % p.H;
  const int t0 = c * L, len = min(L, p.T - t0);
  const BwdScratch<N> scratch(p, nc);
  const size_t chunk = static_cast<size_t>(bh) * nc + c;
  const float* s_start = scratch.states + chunk * (N * N + N);
  const float* g_end = scratch.grads + chunk * N * N;
  const float* u = p.u + h * N;
  load_key_major<T, N, L>(p, b, h, t0, len, rT, kT, wT);
  load_time_major<T, N, L>(p, p.v, b, h, t0, len, vS);
  load_time_major<T, N, L>(p, p.dy, b, h, t0, len, dyS);
  __syncthreads();
  diagonal_scores<N, L>(rT, kT, wT, u, AT, tot);
  value_scores<N, L>(dyS, vS, BS);
  __syncthreads();

  // This thread's tile: steps tr, tr + 1 (one sub-chunk, q) and keys (or
  // values) c0 + y CS, y < TC. First the terms inside the sub-chunk, each
  // pair with its own exponential, from the raw r and k.
  constexpr int CS = N / TC;  // between a thread's keys
  const int tr = threadIdx.x / CS * 2, c0 = threadIdx.x % CS;
  const int q = tr / kSub, q0 = q * kSub;
  float dgr[2][TC], dgk[2][TC], bon_r[2][TC], bon_k[2][TC];
  float rdr[2][TC], kdk[2][TC];
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    const int t = tr + x;
#pragma unroll
    for (int y = 0; y < TC; ++y) {
      const int i = c0 + y * CS;
      const float* w = wT + i * LP;
      float gr = 0.f, e = 0.f;
      for (int s = t - 1; s >= q0; --s) {
        gr = fmaf(BS[t * LP + s] * kT[i * LP + s], ex2(e), gr);
        e += w[s];
      }
      float gk = 0.f;
      e = 0.f;
      for (int tt = t + 1; tt < q0 + kSub; ++tt) {
        gk = fmaf(BS[tt * LP + t] * rT[i * LP + tt], ex2(e), gk);
        e += w[tt];
      }
      const float btt = BS[t * LP + t];
      dgr[x][y] = gr;
      dgk[x][y] = gk;
      bon_r[x][y] = u[i] * kT[i * LP + t] * btt;
      bon_k[x][y] = u[i] * rT[i * LP + t] * btt;
      rdr[x][y] = rT[i * LP + t] * gr;
      kdk[x][y] = kT[i * LP + t] * gk;
    }
  }
  if (threadIdx.x < N) {  // du: this chunk's sum_t r_t k_t B_tt
    const int i = threadIdx.x;
    float du = 0.f;
    for (int t = 0; t < L; ++t) {
      du = fmaf(rT[i * LP + t] * kT[i * LP + t], BS[t * LP + t], du);
    }
    scratch.sums[chunk * 3 * N + 2 * N + i] = du;
  }
  __syncthreads();
  sub_chunk_factors<N, L, true>(rT, kT, wT, kapT, tot, E, H, G);
  __syncthreads();
  cross_scores<N, L>(rT, kT, G, AT);
  __syncthreads();

  float dv[2][TC] = {}, zr[2][TC] = {}, zk[2][TC] = {};
  // dv_s = sum_{t>=s} A_ts dy_t + sum_i k~_si H_q,i G_end,i.
  for (int t = tr; t < L; ++t) {
    const float a[2] = {AT[tr * LP + t], AT[(tr + 1) * LP + t]};
#pragma unroll
    for (int y = 0; y < TC; ++y) {
      const float d = dyS[t * N + c0 + y * CS];
      dv[0][y] = fmaf(a[0], d, dv[0][y]);
      dv[1][y] = fmaf(a[1], d, dv[1][y]);
    }
  }
  for (int i = 0; i < N; ++i) {
    const float2 k2 = *reinterpret_cast<const float2*>(kT + i * LP + tr);
    const float hq = H[q * N + i];
    const float ks[2] = {k2.x * hq, k2.y * hq};
#pragma unroll
    for (int y = 0; y < TC; ++y) {
      const float g = __ldg(g_end + i * N + c0 + y * CS);
      dv[0][y] = fmaf(ks[0], g, dv[0][y]);
      dv[1][y] = fmaf(ks[1], g, dv[1][y]);
    }
  }
  // zr_t = E_q (S_start dy_t) + sum_{p<q} G_qp sum_{s in p} B_ts k~_s;
  // zk_s = H_q (G_end v_s) + sum_{q'>q} G_q'q sum_{t in q'} B_ts r~_t.
  // S_start and G_end are read transposed, from shared memory (read from
  // global memory by rows, a warp's lanes would each load another line).
  auto transposed_product = [&](const float* x, const float* by,
                                float(&z)[2][TC]) {
    __syncthreads();  // (the last product has read XT)
    for (int idx = threadIdx.x; idx < N * N; idx += kThreads) {
      XT[idx % N * (N + 1) + idx / N] = x[idx];
    }
    __syncthreads();
    for (int j = 0; j < N; ++j) {
      const float d[2] = {by[tr * N + j], by[(tr + 1) * N + j]};
#pragma unroll
      for (int y = 0; y < TC; ++y) {
        const float xt = XT[j * (N + 1) + c0 + y * CS];
        z[0][y] = fmaf(xt, d[0], z[0][y]);
        z[1][y] = fmaf(xt, d[1], z[1][y]);
      }
    }
  };
  transposed_product(s_start, dyS, zr);
  transposed_product(g_end, vS, zk);
#pragma unroll
  for (int y = 0; y < TC; ++y) {
    const int i = c0 + y * CS;
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      zr[x][y] *= E[q * N + i];
      zk[x][y] *= H[q * N + i];
    }
  }
  // Sub-chunks p < q feed dr: zr += G_qp sum_{s in p} B_ts k~_s; sub-chunks
  // q' > q feed dk: zk += G_q'q sum_{t in q'} B_ts r~_t. Both calls pass
  // a constant `before` and are inlined, so z stays in registers.
  auto cross = [&](bool kBefore, float(&z)[2][TC]) {
    for (int pp = kBefore ? 0 : q + 1; pp < (kBefore ? q : Q); ++pp) {
      float acc[2][TC] = {};
      for (int m = pp * kSub; m < pp * kSub + kSub; ++m) {
        float bx[2];  // B_{t,m} (t = tr, tr + 1) or B_{m,s} (s = tr, tr + 1)
        if (kBefore) {
          bx[0] = BS[tr * LP + m];
          bx[1] = BS[(tr + 1) * LP + m];
        } else {
          const float2 b2 = *reinterpret_cast<const float2*>(BS + m * LP + tr);
          bx[0] = b2.x;
          bx[1] = b2.y;
        }
#pragma unroll
        for (int y = 0; y < TC; ++y) {
          const float f = (kBefore ? kT : rT)[(c0 + y * CS) * LP + m];
          acc[0][y] = fmaf(bx[0], f, acc[0][y]);
          acc[1][y] = fmaf(bx[1], f, acc[1][y]);
        }
      }
      const int blk = kBefore ? q * (q - 1) / 2 + pp : pp * (pp - 1) / 2 + q;
#pragma unroll
      for (int y = 0; y < TC; ++y) {
        const float g = G[blk * N + c0 + y * CS];
        z[0][y] = fmaf(g, acc[0][y], z[0][y]);
        z[1][y] = fmaf(g, acc[1][y], z[1][y]);
      }
    }
  };
  cross(true, zr);
  cross(false, zk);
  T* dr_out = static_cast<T*>(p.dr);
  T* dk_out = static_cast<T*>(p.dk);
  T* dv_out = static_cast<T*>(p.dv);
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    const int t = tr + x;
#pragma unroll
    for (int y = 0; y < TC; ++y) {
      const int i = c0 + y * CS;
      const float dr = fmaf(wT[i * LP + t], zr[x][y], dgr[x][y]);  // dr'
      const float dk = fmaf(kapT[i * LP + t], zk[x][y], dgk[x][y]);  // dk'
      rdr[x][y] = fmaf(rT[i * LP + t], zr[x][y], rdr[x][y]);
      kdk[x][y] = fmaf(kT[i * LP + t], zk[x][y], kdk[x][y]);
      if (t < len) {
        const size_t o = offset(p, b, t0 + t, h, i, N);
        dr_out[o] = from_float<T>(dr + bon_r[x][y]);
        dk_out[o] = from_float<T>(dk + bon_k[x][y]);
        dv_out[o] = from_float<T>(dv[x][y]);
      }
    }
  }
  __syncthreads();  // v and dy are read; their space takes r.dr', k.dk'
#pragma unroll
  for (int x = 0; x < 2; ++x) {
#pragma unroll
    for (int y = 0; y < TC; ++y) {
      vS[(tr + x) * N + c0 + y * CS] = rdr[x][y];
      dyS[(tr + x) * N + c0 + y * CS] = kdk[x][y];
    }
  }
  __syncthreads();
  scan_time<N, L, false>(vS, AT);  // P, from the chunk's start
  scan_time<N, L, true>(dyS, AT);  // k.dk' summed from the chunk's end
  for (int idx = threadIdx.x; idx < L * N; idx += kThreads) {
    const int t = idx / N;
    if (t < len) {
      const size_t o = offset(p, b, t0 + t, h, idx % N, N);
      p.p[o] = vS[idx];
      p.q[o] = dyS[idx];
    }
  }
  if (threadIdx.x < N) {
    scratch.sums[chunk * 3 * N + threadIdx.x] = vS[(L - 1) * N + threadIdx.x];
    scratch.sums[chunk * 3 * N + N + threadIdx.x] = dyS[threadIdx.x];
  }
}

// Launch 4: one thread a (batch, head, key): the carries of the running
// sums (sums[c][0] := sum over earlier chunks of r.dr'; sums[c][1] :=
// sum_j gS S_T - sum over later chunks of k.dk'), and du per batch row.
template <int N>
__global__ void __launch_bounds__(256)
    carries_kernel(Params p, float* sums, int nc) {
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (gid >= static_cast<int64_t>(p.B) * p.H * N) return;
  const int bh = static_cast<int>(gid / N), i = gid % N;
  const size_t row = (static_cast<size_t>(bh) * N + i) * N;
  float end = 0.f;  // sum_j gS_ij S_T,ij
  for (int j = 0; j < N; ++j) end = fmaf(p.gs[row + j], p.s_T[row + j], end);
  float* own = sums + static_cast<size_t>(bh) * nc * 3 * N + i;
  float run = 0.f, du = 0.f;
  for (int c = 0; c < nc; ++c) {
    const float total = own[c * 3 * N];
    own[c * 3 * N] = run;
    run += total;
    du += own[c * 3 * N + 2 * N];
  }
  run = 0.f;
  for (int c = nc - 1; c >= 0; --c) {
    const float total = own[c * 3 * N + N];
    own[c * 3 * N + N] = end - run;
    run += total;
  }
  p.du_part[static_cast<size_t>(bh) * N + i] = du;
}

// Launch 5: P_t += carry; Q_t = carry - (k.dk' summed from the chunk's
// end to t).
template <int N, int L>
__global__ void __launch_bounds__(kThreads)
    add_carries_kernel(Params p, const float* sums, int nc) {
  const int bh = blockIdx.x, c = blockIdx.y;
  const int b = bh / p.H, h = bh % p.H;
  const int t0 = c * L, len = min(L, p.T - t0);
  const float* own = sums + (static_cast<size_t>(bh) * nc + c) * 3 * N;
  for (int idx = threadIdx.x; idx < len * N; idx += kThreads) {
    const int i = idx % N;
    const size_t o = offset(p, b, t0 + idx / N, h, i, N);
    p.p[o] += own[i];
    p.q[o] = own[N + i] - p.q[o];
  }
}

template <typename T, int N>
inline cudaError_t launch_backward(const Params& p, cudaStream_t stream) {
  constexpr int L = kBwdLen<N>;
  const int nc = chunks(p, L);
  const BwdScratch<N> scratch(p, nc);
  Params q = p;
  q.s_out = nullptr;  // the forward already wrote the final state
  cudaError_t err =
      hand_over<T, N, L, true>(q, scratch.states, scratch.grads, stream);
  const int smem = BwdDims<N, L>::kGrads * sizeof(float);
  if (err == cudaSuccess) err = allow_shared(chunk_grads_kernel<T, N>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.B * p.H, nc);
  chunk_grads_kernel<T, N><<<grid, kThreads, smem, stream>>>(q, nc);
  const int64_t keys = static_cast<int64_t>(p.B) * p.H * N;
  carries_kernel<N><<<static_cast<unsigned>((keys + 255) / 256), 256, 0,
                      stream>>>(q, scratch.sums, nc);
  add_carries_kernel<N, L><<<grid, kThreads, 0, stream>>>(q, scratch.sums, nc);
  return cudaGetLastError();
}

}  // namespace par
}  // namespace keras_rwkv_wkv6
