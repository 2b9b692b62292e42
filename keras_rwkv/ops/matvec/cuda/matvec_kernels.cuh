// Small-batch matrix-vector products for decoding steps (sm_90+).
//
// y[M, N] = x[M, K] @ W[K, N] for M <= 8 rows, W row-major as Keras stores
// a Dense kernel, in bfloat16 or int8 (Keras's int8 Dense: a float scale
// per output column, and optionally one per row of x). Up to four
// independent products run in one launch, so a layer's r, k, v, g
// projections are one kernel, not four.
//
// Why our own: at T = 1 XLA turns [1, K] @ [K, N] into a column reduction
// (0.65 TB/s on an H200) or, padded to two rows, a GEMM at 2.1 TB/s for
// C x C (benchmarks/RESULTS.md, "Decode step"). The weights are the bytes
// a step reads, so the kernel's only job is to stream them at the card's
// rate: every thread keeps 8 loads of 16 bytes in flight.
//
// Layout: a block owns a tile of 64 (bf16) or 128 (int8) columns and a
// 1/S share of the rows; S blocks form a thread-block cluster and add
// their partial sums through distributed shared memory (one cluster
// barrier), so there is one launch, no atomics and no workspace.
#pragma once

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace keras_rwkv_matvec {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kMaxRows = 8;
constexpr int kMaxMatrices = 4;
constexpr int kThreadsPerRow = 8;  // 8 x 16 bytes: one 128-byte line a row
constexpr int kRowsPerPass = kThreads / kThreadsPerRow;  // 32
constexpr int kUnroll = 8;  // loads in flight per thread

enum WeightKind { kBF16 = 0, kInt8 = 1 };

struct Matrix {
  const __nv_bfloat16* x;  // [M, K]
  const void* w;           // [K, N]
  const void* col_scale;   // [N] (int8: y is divided by it) or null
  const void* row_scale;   // [M] (int8 with quantized x) or null
  __nv_bfloat16* y;        // [M, N]
  int K, N;
  int first_tile;          // index of this matrix's first column tile
  int col_scale_bf16, row_scale_bf16;  // else float32
};

struct Params {
  Matrix m[kMaxMatrices];
  int count;
};

template <int kKind>
struct Tile {
  static constexpr int kCols = kKind == kInt8 ? 16 : 8;  // per thread
  static constexpr int kWidth = kCols * kThreadsPerRow;   // per block
};

__device__ __forceinline__ float load_scale(const void* p, int i,
                                            int is_bf16) {
  if (is_bf16) {
    return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
  return static_cast<const float*>(p)[i];
}

// Adds x * w for the kCols weights of one row held in `w`.
//
// int8 weights are unpacked without I2F conversions, which issue at a
// quarter of the FMA rate and cap an int8 stream below the card's
// bandwidth: a byte b (sign bit flipped, so 0..255) placed under the
// exponent of 2^23 reads as the float 2^23 + b, and subtracting
// 2^23 + 128 gives the signed value exactly.
template <int kKind, int M>
__device__ __forceinline__ void accumulate(float (&acc)[M][Tile<kKind>::kCols],
                                           const uint4& w, const float* xk) {
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (kKind == kBF16) {
      const float lo = __uint_as_float(words[q] << 16);
      const float hi = __uint_as_float(words[q] & 0xffff0000u);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        acc[m][2 * q] = fmaf(xk[m], lo, acc[m][2 * q]);
        acc[m][2 * q + 1] = fmaf(xk[m], hi, acc[m][2 * q + 1]);
      }
    } else {
      const uint32_t biased = words[q] ^ 0x80808080u;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const float v =
            __uint_as_float(__byte_perm(biased, 0x4b000000u, 0x7440 | b)) -
            8388736.0f;  // 2^23 + 128
#pragma unroll
        for (int m = 0; m < M; ++m) {
          acc[m][4 * q + b] = fmaf(xk[m], v, acc[m][4 * q + b]);
        }
      }
    }
  }
}

// Adds one batch of kLoads weight rows (kRowsPerPass apart, from row k)
// to `acc`, every load issued before any is used.
template <int kKind, int M, int kLoads>
__device__ __forceinline__ void stream_batch(
    float (&acc)[M][Tile<kKind>::kCols], const char* w_col, size_t row_bytes,
    const __nv_bfloat16* x, int K, int k) {
  uint4 w[kLoads];
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    w[u] = __ldcs(reinterpret_cast<const uint4*>(
        w_col + static_cast<size_t>(k + u * kRowsPerPass) * row_bytes));
  }
#pragma unroll
  for (int u = 0; u < kLoads; ++u) {
    float xk[M];
#pragma unroll
    for (int m = 0; m < M; ++m) {
      xk[m] = __bfloat162float(
          x[static_cast<size_t>(m) * K + k + u * kRowsPerPass]);
    }
    accumulate<kKind, M>(acc, w[u], xk);
  }
}

// The cluster size is fixed at compile time: a runtime cluster attribute
// (cudaLaunchKernelEx) cost ~20 µs of host time a launch on an H200.
template <int kKind, int M, int kSplit>
__global__ void __cluster_dims__(kSplit, 1, 1) __launch_bounds__(kThreads)
    matvec_kernel(const __grid_constant__ Params p) {
  constexpr int kCols = Tile<kKind>::kCols;
  constexpr int kWidth = Tile<kKind>::kWidth;
  constexpr int kBytes = kKind == kInt8 ? 1 : 2;
  // The tile's M x kWidth sums: rank r owns the r-th share of them and
  // gathers every rank's partial sum of its share.
  constexpr int kOut = M * kWidth;
  constexpr int kShare = (kOut + kSplit - 1) / kSplit;
  __shared__ float warp_sums[kThreads / 32][M][kWidth];
  __shared__ float gathered[kSplit][kShare];

  cg::cluster_group cluster = cg::this_cluster();
  // Other blocks write into this one's shared memory only once it has
  // started: said here, waited for after the loads, so it costs nothing.
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  constexpr int split = kSplit;
  const int rank = static_cast<int>(cluster.block_rank());
  const int tile = blockIdx.x / split;
  int mi = 0;
#pragma unroll
  for (int i = 1; i < kMaxMatrices; ++i) {
    if (i < p.count && tile >= p.m[i].first_tile) mi = i;
  }
  const Matrix& mat = p.m[mi];
  const int K = mat.K, N = mat.N;
  const int col0 = (tile - mat.first_tile) * kWidth;
  const int lane_col = threadIdx.x % kThreadsPerRow;
  const int row_lane = threadIdx.x / kThreadsPerRow;
  const int col = col0 + lane_col * kCols;
  const int rows_per_rank = (K + split - 1) / split;
  const int k_begin = rank * rows_per_rank;
  const int k_end = min(K, k_begin + rows_per_rank);

  float acc[M][kCols];
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) acc[m][c] = 0.f;
  }
  if (col < N) {
    const char* w_col = static_cast<const char*>(mat.w) +
                        static_cast<size_t>(col) * kBytes;
    const size_t row_bytes = static_cast<size_t>(N) * kBytes;
    int k = k_begin + row_lane;
    // Batches of 8 loads a thread, then of 4, then single loads: the
    // F x C share of a rank (896 rows at 1.6B) ends in one batch of 4,
    // not four dependent round trips. Neither a second batch in flight
    // (registers for 16 loads cut the blocks an SM holds from 6 to 2:
    // H100, 2.74 against 2.18 ms a token) nor a guarded last batch (48
    // registers, not 40) pays.
    for (; k + (kUnroll - 1) * kRowsPerPass < k_end;
         k += kUnroll * kRowsPerPass) {
      stream_batch<kKind, M, kUnroll>(acc, w_col, row_bytes, mat.x, K, k);
    }
    for (; k + (kUnroll / 2 - 1) * kRowsPerPass < k_end;
         k += kUnroll / 2 * kRowsPerPass) {
      stream_batch<kKind, M, kUnroll / 2>(acc, w_col, row_bytes, mat.x, K,
                                          k);
    }
    for (; k < k_end; k += kRowsPerPass) {
      stream_batch<kKind, M, 1>(acc, w_col, row_bytes, mat.x, K, k);
    }
  }

  // Rows of one warp: lanes 8 and 16 apart hold the same columns.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      float v = acc[m][c];
      v += __shfl_xor_sync(0xffffffffu, v, 8);
      v += __shfl_xor_sync(0xffffffffu, v, 16);
      if (lane < kThreadsPerRow) warp_sums[warp][m][lane * kCols + c] = v;
    }
  }
  __syncthreads();
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
  // Each partial sum goes straight to its owner's shared memory; after
  // one cluster barrier every block reads only its own, so no block
  // waits for the others to finish reading it before it leaves.
  for (int i = threadIdx.x; i < kOut; i += kThreads) {
    const int m = i / kWidth, c = i % kWidth;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) v += warp_sums[w][m][c];
    const int owner = i / kShare;
    cluster.map_shared_rank(&gathered[0][0], owner)[rank * kShare + i -
                                                    owner * kShare] = v;
  }
  cluster.sync();
  for (int j = threadIdx.x; j < kShare; j += kThreads) {
    const int i = rank * kShare + j;
    if (i >= kOut) break;
    const int m = i / kWidth, c = i % kWidth;
    const int n = col0 + c;
    if (n >= N) continue;
    float v = 0.f;
#pragma unroll
    for (int r = 0; r < kSplit; ++r) v += gathered[r][j];
    if (mat.col_scale != nullptr) {
      float s = load_scale(mat.col_scale, n, mat.col_scale_bf16);
      if (mat.row_scale != nullptr) {
        s *= load_scale(mat.row_scale, m, mat.row_scale_bf16);
      }
      v /= s;
    }
    mat.y[static_cast<size_t>(m) * N + n] = __float2bfloat16(v);
  }
}

// Error codes of `run`.
enum Status { kOk = 0, kBadShape = 1, kLaunchFailed = 2 };

inline const char* error_string(int status) {
  switch (status) {
    case kBadShape:
      return "bad shapes (M must be 1..8, N a multiple of 16, up to 4 "
             "matrices)";
    case kLaunchFailed:
      return "the kernel launch failed";
    default:
      return "ok";
  }
}

template <int kKind, int M>
cudaError_t launch_rows(const Params& p, int blocks, int split,
                        cudaStream_t stream) {
  if (split == 8) {
    matvec_kernel<kKind, M, 8><<<blocks * 8, kThreads, 0, stream>>>(p);
  } else if (split == 4) {
    matvec_kernel<kKind, M, 4><<<blocks * 4, kThreads, 0, stream>>>(p);
  } else if (split == 2) {
    matvec_kernel<kKind, M, 2><<<blocks * 2, kThreads, 0, stream>>>(p);
  } else {
    matvec_kernel<kKind, M, 1><<<blocks, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <int kKind>
cudaError_t launch_kind(const Params& p, int rows, int blocks, int split,
                        cudaStream_t stream) {
  switch (rows) {
    case 1: return launch_rows<kKind, 1>(p, blocks, split, stream);
    case 2: return launch_rows<kKind, 2>(p, blocks, split, stream);
    case 3: return launch_rows<kKind, 3>(p, blocks, split, stream);
    case 4: return launch_rows<kKind, 4>(p, blocks, split, stream);
    case 5: return launch_rows<kKind, 5>(p, blocks, split, stream);
    case 6: return launch_rows<kKind, 6>(p, blocks, split, stream);
    case 7: return launch_rows<kKind, 7>(p, blocks, split, stream);
    default: return launch_rows<kKind, 8>(p, blocks, split, stream);
  }
}

// Fills in the tiles and launches. `p.m[i].first_tile` is set here.
inline int run(int kind, int rows, Params p, cudaStream_t stream) {
  if (rows < 1 || rows > kMaxRows || p.count < 1 || p.count > kMaxMatrices) {
    return kBadShape;
  }
  const int width =
      kind == kInt8 ? Tile<kInt8>::kWidth : Tile<kBF16>::kWidth;
  int tiles = 0;
  int min_k = 1 << 30;
  for (int i = 0; i < p.count; ++i) {
    if (p.m[i].N % 16 != 0 || p.m[i].K < 1) return kBadShape;
    p.m[i].first_tile = tiles;
    tiles += (p.m[i].N + width - 1) / width;
    min_k = min(min_k, p.m[i].K);
  }
  // Enough blocks to keep every SM streaming (132 on an H100/H200): four
  // ranks a tile, eight where the tiles are few.
  int split = tiles * 4 >= 2 * 132 ? 4 : 8;
  while (split > 1 && min_k < split * kRowsPerPass) split /= 2;
  const cudaError_t err =
      kind == kInt8 ? launch_kind<kInt8>(p, rows, tiles, split, stream)
                    : launch_kind<kBF16>(p, rows, tiles, split, stream);
  return err == cudaSuccess ? kOk : kLaunchFailed;
}

}  // namespace keras_rwkv_matvec
