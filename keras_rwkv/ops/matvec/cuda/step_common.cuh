// What the step kernels share: sizes, the padding mask as any dtype,
// float conversions and a block-wide sum (see step_kernels.cuh).
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

}  // namespace keras_rwkv_step
