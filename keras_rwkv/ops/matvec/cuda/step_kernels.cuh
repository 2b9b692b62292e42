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

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace keras_rwkv_step {

namespace cg = cooperative_groups;
using bf16 = __nv_bfloat16;

constexpr int kThreads = 512;
constexpr int kMaxWidth = 6144;                     // C
constexpr int kMaxMixRank = 64;                     // D (5 D columns)
constexpr int kMaxDecayRank = 128;                  // E
constexpr int kHead = 64;                           // N
constexpr int kWkvThreads = 256;
constexpr int kNormPer = kMaxWidth / kThreads;

enum MaskType { kMaskF32 = 0, kMaskBF16 = 1, kMaskI32 = 2, kMaskBool = 3 };

struct Mask {
  const void* p;
  int type;
  __device__ __forceinline__ float get() const {
    switch (type) {
      case kMaskBF16:  // floats are used as they are, as XLA's path does
        return __bfloat162float(*static_cast<const bf16*>(p));
      case kMaskI32:
        return *static_cast<const int32_t*>(p) != 0 ? 1.f : 0.f;
      case kMaskBool:
        return *static_cast<const uint8_t*>(p) ? 1.f : 0.f;
      default:
        return *static_cast<const float*>(p);
    }
  }
};

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float round_bf16(float x) {
  return __bfloat162float(__float2bfloat16(x));
}

// Sum over the block; every thread gets it. `scratch` holds 32 floats.
__device__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < static_cast<int>(blockDim.x) / 32; ++w) {
    total += scratch[w];
  }
  return total;
}

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

// ----------------------------------------------------------------- mix --

template <typename P>
struct MixParams {
  int C, D, E;
  const bf16* x;     // [C] layer-normed input
  const bf16* prev;  // [C] the previous token's
  const P* maa_x;    // [C]
  const P* maa;      // [5, C], mixes w, k, v, r, g
  const bf16* w1;    // [C, 5 D]
  const bf16* w2;    // [5, D, C]
  const P* decay;    // [C]
  const bf16* dw1;   // [C, E]
  const bf16* dw2;   // [E, C]
  Mask mask;         // [1]
  bf16* out[4];      // x_k, x_v, x_r, x_g: [C]
  float* log_w;      // [C]
};

// out[m n + c] = sum_r a[m rows + r] W[m rows + r, col0 + c] for m <
// segments, c < n: `segments` stacked [rows, n] blocks of a row-major W
// with `ld` columns, each against its own slice of `a` (shared memory).
// A thread owns 8 columns and every `lanes`-th row of one segment, keeps
// 8 loads of 16 bytes in flight, and the lanes add up in `red` (kThreads
// x 8 floats). Needs n % 8 == 0 and n / 8 * segments <= kThreads.
__device__ void block_matvec(float* out, const bf16* __restrict__ w, int ld,
                             int col0, int n, const float* a, int rows,
                             int segments, float* red) {
  const int groups = n / 8;
  const int lanes = kThreads / (groups * segments);
  const int g = threadIdx.x % groups, slot = threadIdx.x / groups;
  const int m = slot / lanes, lane = slot % lanes;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (m < segments) {
    const bf16* base = w + static_cast<size_t>(m) * rows * ld + col0 + 8 * g;
    const float* am = a + m * rows;
    for (int r0 = lane; r0 < rows; r0 += 8 * lanes) {
      uint4 words[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int r = r0 + u * lanes;
        if (r < rows) {
          words[u] = __ldcs(reinterpret_cast<const uint4*>(
              base + static_cast<size_t>(r) * ld));
        }
      }
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int r = r0 + u * lanes;
        if (r < rows) {
          const uint32_t q[4] = {words[u].x, words[u].y, words[u].z,
                                 words[u].w};
          const float s = am[r];
#pragma unroll
          for (int h = 0; h < 4; ++h) {
            acc[2 * h] = fmaf(s, __uint_as_float(q[h] << 16), acc[2 * h]);
            acc[2 * h + 1] =
                fmaf(s, __uint_as_float(q[h] & 0xffff0000u), acc[2 * h + 1]);
          }
        }
      }
    }
    float* mine = red + static_cast<size_t>(slot) * n + 8 * g;
#pragma unroll
    for (int j = 0; j < 8; ++j) mine[j] = acc[j];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < segments * n; i += kThreads) {
    const int mm = i / n, c = i % n;
    float v = 0.f;
    for (int l = 0; l < lanes; ++l) v += red[(mm * lanes + l) * n + c];
    out[i] = v;
  }
  __syncthreads();
}

// tanh of the cluster's partial sums `part[0:n]`, into `out`.
template <int kBlocks>
__device__ void cluster_tanh_sum(cg::cluster_group& cluster, float* part,
                                 float* out, int n) {
  cluster.sync();
  for (int i = threadIdx.x; i < n; i += kThreads) {
    float v[kBlocks];
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) {
      v[b] = cluster.map_shared_rank(part, b)[i];
    }
    float total = 0.f;
#pragma unroll
    for (int b = 0; b < kBlocks; ++b) total += v[b];
    out[i] = tanhf(total);
  }
  __syncthreads();
}

// kBlocks is 16 where C allows and the card fits a cluster of 16 (a
// non-portable size): each SM then streams half the weight bytes of 8,
// and the kernel takes 13.7 µs instead of 15.4 on an H200 (1.6B).
template <typename P, int kBlocks>
__global__ void __cluster_dims__(kBlocks, 1, 1) __launch_bounds__(kThreads)
    mix_kernel(const __grid_constant__ MixParams<P> p) {
  constexpr int kMaxSlice = kMaxWidth / kBlocks;
  constexpr int kPerThread = (kMaxSlice + kThreads - 1) / kThreads;
  __shared__ float xs[kMaxSlice], sxs[kMaxSlice], lora_in[kMaxSlice];
  __shared__ float mix[5 * kMaxSlice];
  __shared__ float red[kThreads * 8];
  __shared__ float part1[5 * kMaxMixRank], h1[5 * kMaxMixRank];
  __shared__ float part2[kMaxDecayRank], h2[kMaxDecayRank];

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int S = p.C / kBlocks, c0 = rank * S;
  const int D5 = 5 * p.D;

  // Every per-channel input of this thread's channels, loaded at once.
  float x[kPerThread], pr[kPerThread], mx[kPerThread], dc[kPerThread];
  float ma[kPerThread][5];
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int i = threadIdx.x + e * kThreads;
    if (i < S) {
      x[e] = to_f(p.x[c0 + i]);
      pr[e] = to_f(p.prev[c0 + i]);
      mx[e] = to_f(p.maa_x[c0 + i]);
      dc[e] = to_f(p.decay[c0 + i]);
#pragma unroll
      for (int m = 0; m < 5; ++m) ma[e][m] = to_f(p.maa[m * p.C + c0 + i]);
    }
  }
  // This block's rows or columns of the later phases' weights into L2
  // now (each row of w2 and dw2 a 2 S-byte run, of w1 and dw1 one run):
  // `prefetch` is a hint that holds no register.
  {
    // w1's and dw1's rows of this block are one run each.
    const char* w1_rows =
        reinterpret_cast<const char*>(p.w1 + static_cast<size_t>(c0) * D5);
    const char* dw1_rows =
        reinterpret_cast<const char*>(p.dw1 + static_cast<size_t>(c0) * p.E);
    const int w1_lines = S * D5 * 2 / 128, dw1_lines = S * p.E * 2 / 128;
    for (int i = threadIdx.x; i < w1_lines + dw1_lines; i += kThreads) {
      const char* line = i < w1_lines ? w1_rows + i * 128
                                      : dw1_rows + (i - w1_lines) * 128;
      asm volatile("prefetch.global.L2 [%0];" ::"l"(line));
    }
    const int runs = D5 + p.E, lines = (2 * S + 127) / 128;
    for (int i = threadIdx.x; i < runs * lines; i += kThreads) {
      const int row = i / lines, line = i % lines;
      const bf16* run = row < D5 ? p.w2 + static_cast<size_t>(row) * p.C
                                 : p.dw2 + static_cast<size_t>(row - D5) * p.C;
      asm volatile("prefetch.global.L2 [%0];" ::"l"(
          reinterpret_cast<const char*>(run + c0) + line * 128));
    }
  }
  const float mask = p.mask.get();
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int i = threadIdx.x + e * kThreads;
    if (i < S) {
      xs[i] = x[e];
      sxs[i] = pr[e] - x[e];
      lora_in[i] = x[e] + sxs[i] * mx[e];
    }
  }
  __syncthreads();

  // 1. tanh(xxx @ w1): this block's rows, every column; then the sum.
  block_matvec(part1, p.w1 + static_cast<size_t>(c0) * D5, D5, 0, D5,
               lora_in, S, 1, red);
  cluster_tanh_sum<kBlocks>(cluster, part1, h1, D5);

  // 2. The five mixes of this block's channels: h1[m] @ w2[m].
  block_matvec(mix, p.w2, p.C, c0, S, h1, p.D, 5, red);
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int i = threadIdx.x + e * kThreads;
    if (i < S) {
#pragma unroll
      for (int m = 0; m < 5; ++m) {
        const float v = xs[i] + sxs[i] * (ma[e][m] + mix[m * S + i]);
        if (m == 0) {
          lora_in[i] = v;  // x_w, the decay LoRA's input
        } else {
          p.out[m - 1][c0 + i] = __float2bfloat16(v);
        }
      }
    }
  }
  __syncthreads();

  // 3. tanh(x_w @ dw1), then this block's channels of the decay.
  block_matvec(part2, p.dw1 + static_cast<size_t>(c0) * p.E, p.E, 0, p.E,
               lora_in, S, 1, red);
  cluster_tanh_sum<kBlocks>(cluster, part2, h2, p.E);
  block_matvec(mix, p.dw2, p.C, c0, S, h2, p.E, 1, red);
#pragma unroll
  for (int e = 0; e < kPerThread; ++e) {
    const int i = threadIdx.x + e * kThreads;
    if (i < S) p.log_w[c0 + i] = -expf(dc[e] + mix[i]) * mask;
  }
  // No block may leave while another still reads its shared memory.
  cluster.sync();
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

// Whether this device fits a cluster of 16 mix blocks (it needs 16 SMs
// of one GPC, and a kernel must ask for clusters over 8), asked once a
// device.
template <typename P>
bool mix_fits_16() {
  static int8_t known[64] = {};  // a device: 0 not asked, 1 yes, -1 no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= 64) return false;
  if (known[device] == 0) {
    int clusters = 0;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(16);
    config.blockDim = dim3(kThreads);
    const bool fits =
        cudaFuncSetAttribute(mix_kernel<P, 16>,
                             cudaFuncAttributeNonPortableClusterSizeAllowed,
                             1) == cudaSuccess &&
        cudaOccupancyMaxActiveClusters(&clusters, mix_kernel<P, 16>,
                                       &config) == cudaSuccess &&
        clusters > 0;
    cudaGetLastError();  // a refusal above is an answer, not an error
    known[device] = fits ? 1 : -1;
  }
  return known[device] > 0;
}

template <typename P>
cudaError_t launch_mix(const MixParams<P>& p, cudaStream_t s) {
  if (p.C % (8 * 16) == 0 && mix_fits_16<P>()) {
    mix_kernel<P, 16><<<16, kThreads, 0, s>>>(p);
  } else {
    mix_kernel<P, 8><<<8, kThreads, 0, s>>>(p);
  }
  return cudaGetLastError();
}

template <typename P>
cudaError_t launch_wkv_gate(const WkvParams<P>& p, cudaStream_t s) {
  wkv_gate_kernel<P><<<p.H, kWkvThreads, 0, s>>>(p);
  return cudaGetLastError();
}

// Shapes the kernels take; the bindings check these before a launch and
// the model falls back to XLA where they do not hold.
inline bool mix_shapes_ok(int C, int D, int E) {
  return C % (8 * 8) == 0 && C <= kMaxWidth && D % 8 == 0 &&
         D <= kMaxMixRank && E % 8 == 0 && E <= kMaxDecayRank;
}

}  // namespace keras_rwkv_step
