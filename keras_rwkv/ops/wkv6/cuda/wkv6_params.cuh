// The arguments every WKV6 kernel takes, and where element (b, t, h, n)
// of a [B, T, H, N] array lies. No CUDA header is needed here, so the
// host emulation of the kernels (tests/host_emulation/) includes it too.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace keras_rwkv_wkv6 {

enum DType : int { kF32 = 0, kBF16 = 1 };

struct Params {
  int B, T, H;
  const void* r;
  const void* k;
  const void* v;
  const float* log_w;
  const float* u;
  const float* s0;     // [B or 1, H, N, N] or null (zeros)
  int64_t s0_bstride;  // elements between batches of s0; 0 broadcasts
  // Forward outputs.
  void* y;
  float* s_out;
  // Backward inputs and outputs.
  const void* dy;
  const float* gs;   // dL/dS_final [B, H, N, N]
  const float* s_T;  // S_final from the forward pass
  void* dr;
  void* dk;
  void* dv;
  float* p;        // running sum of r.dr' (forward), [B, T, H, N]
  float* q;        // sum_j gS.S_T - running sum of k.dk' (reverse)
  float* du_part;  // [B, H, N]
  float* ds0;      // [B, H, N, N]
  // Forced launch shape, 0 leaving the kernel's own (for benchmarks and
  // tests; KERAS_RWKV_WKV6_COLS / _GROUPS, read in Python at each call):
  // cols 1, 2 or 4; groups 1, 2, 4 or 8.
  int cols, groups;
  // The kernels' form (Form in wkv6_dispatch.cuh; KERAS_RWKV_WKV6_FORM)
  // and, for the parallel form, its scratch (scratch_bytes there).
  int form;
  void* scratch;
};

__device__ __forceinline__ size_t offset(const Params& p, int b, int t,
                                         int h, int n, int N) {
  return ((static_cast<size_t>(b) * p.T + t) * p.H + h) * N + n;
}

}  // namespace keras_rwkv_wkv6
