// Fused pieces of a batch-1 decoding step (sm_90+), around the
// matrix-vector products of matvec_kernels.cuh.
//
// At batch 1 a layer's weights stream in ~45 µs, but XLA also runs ~20
// small kernels a layer (layer norms as three, the token-shift LoRA as a
// product then a reduction, the WKV step, group norm, gates), ~37 µs a
// layer that moves almost no bytes (benchmarks/RESULTS.md, "Decode step").
// Here they are three kernels:
//
// - `add_norm_kernel`: x += delta (optional), then LayerNorm(x): one block.
// - `mix_kernel`: the data-dependent token shift of the time mix (the five
//   mixes and their LoRA) and the decay LoRA, `log_w = -exp(w) * mask`.
//   The two LoRAs are each a reduction over C followed by an expansion
//   back to C, so one cluster of kBlocks blocks runs them: block b
//   owns channels [b S, (b + 1) S), S = C / kBlocks, adds its
//   share of each reduction into shared memory and reads the others'
//   through distributed shared memory.
// - `wkv_gate_kernel`: the WKV step, the per-head group norm and the SiLU
//   gate, one block a head.
//
// The per-channel parameter vectors come as the model keeps them, all
// bfloat16 or all float32 (the template parameter P), and the padding
// mask as int32, bool or a float: a dtype convert before a custom call is
// a kernel of its own.
//
// These kernels move few bytes, so what costs is latency: every thread
// issues all its global loads before it uses any (a load whose value is
// used at once, or one after a store that may alias it, is a round trip
// of its own: the first version of these kernels took 9-55 µs for that),
// and sums are reduced through shared memory, not atomics.
// Everything is computed in float32 from the inputs and rounded once, at
// the outputs (the contract of the plain-JAX references in
// fused_step.py); only add_norm rounds x + delta first, as the residual
// stream is bfloat16.
#pragma once

#include "step_common.cuh"
#include "step_mix.cuh"

namespace keras_rwkv_step {

// ---------------------------------------------------------------- norm --

template <typename P>
struct NormParams {
  int C;
  const bf16* x;      // [C] residual stream
  const bf16* delta;  // [C] added to x first, or null
  const P* gamma;     // [C]
  const P* beta;      // [C]
  float eps;
  bf16* x_out;        // [C] x + delta (null when delta is null)
  bf16* y;            // [C] LayerNorm(x + delta)
};

// One block. The residual sum is rounded to bfloat16 before the norm, as
// the model's own add would.
template <typename P>
__global__ void __launch_bounds__(kThreads)
    add_norm_kernel(const __grid_constant__ NormParams<P> p) {
  __shared__ float scratch[32];
  float v[kNormPer], d[kNormPer], gm[kNormPer], bt[kNormPer];
#pragma unroll
  for (int u = 0; u < kNormPer; ++u) {
    const int i = threadIdx.x + u * kThreads;
    if (i < p.C) {
      v[u] = to_f(p.x[i]);
      d[u] = p.delta != nullptr ? to_f(p.delta[i]) : 0.f;
      gm[u] = to_f(p.gamma[i]);
      bt[u] = to_f(p.beta[i]);
    }
  }
  float sum = 0.f;
#pragma unroll
  for (int u = 0; u < kNormPer; ++u) {
    if (threadIdx.x + u * kThreads < p.C) {
      if (p.delta != nullptr) v[u] = round_bf16(v[u] + d[u]);
      sum += v[u];
    }
  }
  const float mean = block_sum(sum, scratch) / p.C;
  float sq = 0.f;
#pragma unroll
  for (int u = 0; u < kNormPer; ++u) {
    if (threadIdx.x + u * kThreads < p.C) sq += (v[u] - mean) * (v[u] - mean);
  }
  const float inv = rsqrtf(block_sum(sq, scratch) / p.C + p.eps);
#pragma unroll
  for (int u = 0; u < kNormPer; ++u) {
    const int i = threadIdx.x + u * kThreads;
    if (i < p.C) {
      p.y[i] = __float2bfloat16((v[u] - mean) * inv * gm[u] + bt[u]);
      if (p.delta != nullptr) p.x_out[i] = __float2bfloat16(v[u]);
    }
  }
}

// ----------------------------------------------------------- wkv + gate --

template <typename P>
struct WkvParams {
  int H;
  const bf16 *r, *k, *v, *g;  // [H N]; g before its SiLU
  const float* log_w;         // [H N]
  const P* u;                 // [H, N]
  const float* s_in;          // [H, N, N] (key, value)
  float* s_out;               // [H, N, N]
  const P* gamma;             // [H N]
  const P* beta;              // [H N]
  Mask mask;                  // [1]
  float eps;
  bf16* y;                    // [H N]: group_norm(wkv) * silu(g)
};

// One block a head: thread (q, j) runs key rows [16 q, 16 q + 16) of
// value column j, so a warp reads state rows 128 bytes at a time. A
// thread writes only the state entries it read, so the state may be
// updated in place (s_out == s_in).
template <typename P>
__global__ void __launch_bounds__(kWkvThreads)
    wkv_gate_kernel(const __grid_constant__ WkvParams<P> p) {
  constexpr int N = kHead, kParts = kWkvThreads / N, kRows = N / kParts;
  __shared__ float r[N], kk[N], w[N], uk[N];
  __shared__ float part[kParts][N];
  __shared__ float scratch[32];
  const int head = blockIdx.x, base = head * N;
  const int j = threadIdx.x % N, q = threadIdx.x / N;
  const float* s_in = p.s_in + static_cast<size_t>(head) * N * N;
  float s[kRows];
#pragma unroll
  for (int t = 0; t < kRows; ++t) s[t] = s_in[(q * kRows + t) * N + j];
  const float v = to_f(p.v[base + j]);
  const float g = to_f(p.g[base + j]);
  const float gm = to_f(p.gamma[base + j]), bt = to_f(p.beta[base + j]);
  if (threadIdx.x < N) {
    const int i = threadIdx.x;
    const float ri = to_f(p.r[base + i]), ki = to_f(p.k[base + i]);
    const float wi = p.log_w[base + i], ui = to_f(p.u[base + i]);
    const float mask = p.mask.get();
    r[i] = ri;
    kk[i] = ki * mask;
    w[i] = expf(wi);
    uk[i] = ui * ki * mask;
  }
  __syncthreads();
  float* s_out = p.s_out + static_cast<size_t>(head) * N * N;
  float acc = 0.f;
#pragma unroll
  for (int t = 0; t < kRows; ++t) {
    const int i = q * kRows + t;
    acc = fmaf(r[i], fmaf(uk[i], v, s[t]), acc);
    s_out[i * N + j] = fmaf(w[i], s[t], kk[i] * v);
  }
  part[q][j] = acc;
  __syncthreads();
  // Group norm over the head's N outputs; threads of every part compute
  // it alike.
  float y = 0.f;
#pragma unroll
  for (int t = 0; t < kParts; ++t) y += part[t][j];
  const float mean = block_sum(q == 0 ? y : 0.f, scratch) / N;
  const float d = y - mean;
  const float var = block_sum(q == 0 ? d * d : 0.f, scratch) / N;
  if (q == 0) {
    const float normed = d * rsqrtf(var + p.eps) * gm + bt;
    p.y[base + j] = __float2bfloat16(normed * g / (1.f + expf(-g)));
  }
}

// ------------------------------------------------------------- launch --

template <typename P>
cudaError_t launch_add_norm(const NormParams<P>& p, cudaStream_t s) {
  add_norm_kernel<P><<<1, kThreads, 0, s>>>(p);
  return cudaGetLastError();
}

template <typename P>
cudaError_t launch_wkv_gate(const WkvParams<P>& p, cudaStream_t s) {
  wkv_gate_kernel<P><<<p.H, kWkvThreads, 0, s>>>(p);
  return cudaGetLastError();
}

}  // namespace keras_rwkv_step
