// Just enough of CUDA to run a kernel on the host: every CUDA thread of a
// block is a std::thread, __syncthreads a std::barrier, and dynamic
// shared memory a buffer per block (filled with NaN, so a read of a slot
// no thread wrote shows in the output). Used by
// tests/test_wkv6_parallel_host.py; nothing here ships.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

struct float4 {
  float x, y, z, w;
};
struct float2 {
  float x, y;
};
inline float4 make_float4(float a, float b, float c, float d) {
  return {a, b, c, d};
}
inline float2 make_float2(float a, float b) { return {a, b}; }
struct HostDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local HostDim3 threadIdx, blockIdx;
inline std::barrier<>* host_barrier = nullptr;
inline thread_local float4* host_shared = nullptr;
inline void __syncthreads() { host_barrier->arrive_and_wait(); }
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __ldg(p) (*(p))
using std::min;
typedef int cudaError_t;

// Runs kern() as a grid of gx x gy x gz blocks of `threads`, one block at
// a time, with `floats` of shared memory each.
template <typename F>
void host_grid(int gx, int gy, int gz, int threads, size_t floats, F kern) {
  for (int bz = 0; bz < gz; ++bz) {
  for (int by = 0; by < gy; ++by) {
    for (int bx = 0; bx < gx; ++bx) {
      std::vector<float4> shared(floats / 4 + 1,
                                 float4{NAN, NAN, NAN, NAN});
      std::barrier<> bar(threads);
      host_barrier = &bar;
      std::vector<std::thread> pool;
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          threadIdx.x = t;
          blockIdx.x = bx;
          blockIdx.y = by;
          blockIdx.z = bz;
          host_shared = shared.data();
          kern();
        });
      }
      for (auto& th : pool) th.join();
    }
  }
  }
}

// The kernels' arguments as the kernels see them; of the rest of
// wkv6_kernels.cuh, the float conversions.
#include "wkv6_params.cuh"

namespace keras_rwkv_wkv6 {
inline float to_float(float x) { return x; }
template <typename T>
T from_float(float x);
template <>
inline float from_float<float>(float x) {
  return x;
}
}  // namespace keras_rwkv_wkv6
