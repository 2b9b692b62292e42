// The time mix's token shift and decay LoRA as one kernel of a cluster
// (`mix_kernel`; see step_kernels.cuh for the three step kernels).
#pragma once

#include "step_common.cuh"

namespace keras_rwkv_step {

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

// ------------------------------------------------------ mix launch --

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

// Shapes the kernels take; the bindings check these before a launch and
// the model falls back to XLA where they do not hold.
inline bool mix_shapes_ok(int C, int D, int E) {
  return C % (8 * 8) == 0 && C <= kMaxWidth && D % 8 == 0 &&
         D <= kMaxMixRank && E % 8 == 0 && E <= kMaxDecayRank;
}

}  // namespace keras_rwkv_step
