// Which kernels run a WKV6 call, and with what launch shape: the per-step
// kernels (wkv6_kernels.cuh) or the chunk-parallel ones
// (wkv6_parallel.cuh, wkv6_parallel_bwd.cuh). The two bindings call `run`.
#pragma once

#include "wkv6_kernels.cuh"
#include "wkv6_parallel_bwd.cuh"

namespace keras_rwkv_wkv6 {

// The launch shape: C owned indices per thread, G blocks per (batch,
// head). Measured on an H100 (132 SMs, bf16, T = 4096, N = 64; B x H =
// 1x32, 2x32, 1x64, 8x32; benchmarks/RESULTS.md): the best G is the
// largest (up to 8) that keeps the grid within ~8 blocks per SM (more
// only queues blocks behind each other's whole-sequence loops). With
// G = 1 two columns per thread are best (each shared key read serves
// two); with G > 1 the backward pass is fastest with one, the forward
// with two up to G = 4. KERAS_RWKV_WKV6_COLS (1, 2 or 4) and
// KERAS_RWKV_WKV6_GROUPS (1, 2, 4 or 8) override the choice, for
// benchmarking (Params::cols, groups); a G too large for N / C falls
// back to the largest valid.
struct Shape {
  int cols, groups;
};

constexpr int kMaxBlocksPerSm = 8;

inline int sm_count() {
  static int cached[64] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) {
    return 132;
  }
  if (cached[device] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) !=
            cudaSuccess ||
        n <= 0) {
      n = 132;
    }
    cached[device] = n;
  }
  return cached[device];
}

inline Shape launch_shape(const Params& p, bool backward) {
  const int64_t pairs = static_cast<int64_t>(p.B) * p.H * (backward ? 3 : 1);
  const int64_t limit = static_cast<int64_t>(kMaxBlocksPerSm) * sm_count();
  Shape s = {1, 1};
  while (s.groups < 8 && pairs * s.groups * 2 <= limit) s.groups *= 2;
  if (s.groups == 1 || (!backward && s.groups < 8)) s.cols = 2;
  if (p.cols) s.cols = p.cols;
  if (p.groups) s.groups = p.groups;
  return s;
}

template <typename T, int N, int C>
inline cudaError_t launch_groups(const Params& p, bool backward, int groups,
                                 cudaStream_t stream) {
  // Only shapes with at least a warp a block exist (N / (C G) >= 8).
  if constexpr (N / C >= 64) {
    if (groups >= 8) return launch<T, N, C, 8>(p, backward, stream);
  }
  if constexpr (N / C >= 32) {
    if (groups >= 4) return launch<T, N, C, 4>(p, backward, stream);
  }
  if constexpr (N / C >= 16) {
    if (groups >= 2) return launch<T, N, C, 2>(p, backward, stream);
  }
  return launch<T, N, C, 1>(p, backward, stream);
}

template <typename T, int N>
inline cudaError_t launch_shaped(const Params& p, bool backward,
                                 cudaStream_t stream) {
  const Shape s = launch_shape(p, backward);
  if constexpr (N >= 32) {
    if (s.cols == 4) return launch_groups<T, N, 4>(p, backward, s.groups, stream);
  }
  if constexpr (N >= 16) {
    if (s.cols == 2) return launch_groups<T, N, 2>(p, backward, s.groups, stream);
  }
  return launch_groups<T, N, 1>(p, backward, s.groups, stream);
}

// The kernels' form, forward and backward: Params::form, from
// KERAS_RWKV_WKV6_FORM (read in Python at each call). kFormAuto leaves the
// choice here.
enum Form : int { kFormAuto = 0, kFormStep = 1, kFormParallel = 2 };

// Whether a call (forward or backward) runs chunk-parallel. Its geometry
// needs N >= 16 (smaller heads always step). Auto picks the per-step
// kernels until the parallel form is measured faster
// (benchmarks/RESULTS.md).
inline bool parallel_form(const Params& p, int N) {
  return N >= 16 && p.form == kFormParallel;
}

// Bytes of device scratch a call needs (0 for the per-step form): the
// caller allocates them and passes them in Params::scratch.
inline size_t scratch_bytes(const Params& p, int N, bool backward) {
  if (!parallel_form(p, N)) return 0;
  return backward ? par::backward_scratch_bytes(p, N)
                  : par::forward_scratch_bytes(p, N);
}

// Whether this GPU gives a block the shared memory the parallel form's
// largest kernel takes (up to 130 KB, the backward at N = 128; 97 KB
// forward at N = 64: sm_80 and newer).
template <int N>
inline bool parallel_fits(bool backward) {
  const int bytes =
      sizeof(float) *
      (backward ? par::BwdDims<N, par::kBwdLen<N>>::kGrads
                : par::Dims<N, par::kFwdLen<N>>::kOutputs);
  int device = 0, limit = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&limit,
                                cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                device) == cudaSuccess &&
         limit >= bytes;
}

template <typename T, int N>
inline int launch_form(const Params& p, bool parallel, bool backward,
                       cudaStream_t stream) {
  if constexpr (N >= 16) {
    if (parallel && !parallel_fits<N>(backward)) return -4;
    if (parallel && backward) return par::launch_backward<T, N>(p, stream);
    if (parallel) return par::launch<T, N>(p, stream);
  }
  return launch_shaped<T, N>(p, backward, stream);
}

// Returns 0, a cudaError_t (> 0), or -1 (head size) / -2 (dtype) / -3
// (no scratch for the parallel form) / -4 (too little shared memory).
inline int run(int dtype, int N, const Params& p, bool backward,
               cudaStream_t stream) {
  if (p.B == 0 || p.T == 0 || p.H == 0) return 0;
  const bool parallel = parallel_form(p, N);
  if (parallel && p.scratch == nullptr) return -3;
#define KERAS_RWKV_WKV6_CASE(NN)                                       \
  case NN:                                                             \
    if (dtype == kF32) return launch_form<float, NN>(p, parallel, backward, stream); \
    if (dtype == kBF16)                                                \
      return launch_form<__nv_bfloat16, NN>(p, parallel, backward, stream); \
    return -2;
  switch (N) {
    KERAS_RWKV_WKV6_CASE(8)
    KERAS_RWKV_WKV6_CASE(16)
    KERAS_RWKV_WKV6_CASE(32)
    KERAS_RWKV_WKV6_CASE(64)
    KERAS_RWKV_WKV6_CASE(128)
    default:
      return -1;
  }
#undef KERAS_RWKV_WKV6_CASE
}

inline const char* error_string(int code) {
  if (code == -1) return "unsupported head size (use 8, 16, 32, 64 or 128)";
  if (code == -2) return "unsupported dtype (use float32 or bfloat16)";
  if (code == -3) return "the parallel form was given no scratch memory";
  if (code == -4) {
    return "this GPU has too little shared memory a block for the parallel "
           "form (sm_80 or newer); set KERAS_RWKV_WKV6_FORM=step";
  }
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

}  // namespace keras_rwkv_wkv6
