// Plain C entry points (raw device pointers and a stream), loaded with
// ctypes by the torch binding; building them needs no torch headers.
#include "wkv6_dispatch.cuh"

namespace kw = keras_rwkv_wkv6;

extern "C" {

int keras_rwkv_wkv6_forward(int dtype, int B, int T, int H, int N,
                            const void* r, const void* k, const void* v,
                            const float* log_w, const float* u,
                            const float* s0, int s0_batched, void* y,
                            float* s_out, int cols, int groups, int form,
                            void* scratch, void* stream) {
  kw::Params p = {};
  p.B = B;
  p.T = T;
  p.H = H;
  p.r = r;
  p.k = k;
  p.v = v;
  p.log_w = log_w;
  p.u = u;
  p.s0 = s0;
  p.s0_bstride = s0_batched ? static_cast<int64_t>(H) * N * N : 0;
  p.y = y;
  p.s_out = s_out;
  p.cols = cols;
  p.groups = groups;
  p.form = form;
  p.scratch = scratch;
  return kw::run(dtype, N, p, false, static_cast<cudaStream_t>(stream));
}

int keras_rwkv_wkv6_backward(int dtype, int B, int T, int H, int N,
                             const void* r, const void* k, const void* v,
                             const float* log_w, const float* u,
                             const float* s0, int s0_batched, const void* dy,
                             const float* gs, const float* s_T, void* dr,
                             void* dk, void* dv, float* p_sum, float* q_sum,
                             float* du_part, float* ds0, int cols,
                             int groups, int form, void* scratch,
                             void* stream) {
  kw::Params p = {};
  p.B = B;
  p.T = T;
  p.H = H;
  p.r = r;
  p.k = k;
  p.v = v;
  p.log_w = log_w;
  p.u = u;
  p.s0 = s0;
  p.s0_bstride = s0_batched ? static_cast<int64_t>(H) * N * N : 0;
  p.dy = dy;
  p.gs = gs;
  p.s_T = s_T;
  p.dr = dr;
  p.dk = dk;
  p.dv = dv;
  p.p = p_sum;
  p.q = q_sum;
  p.du_part = du_part;
  p.ds0 = ds0;
  p.cols = cols;
  p.groups = groups;
  p.form = form;
  p.scratch = scratch;
  return kw::run(dtype, N, p, true, static_cast<cudaStream_t>(stream));
}

// Bytes of device scratch keras_rwkv_wkv6_forward (backward = 0) or
// _backward (1) needs for this shape and form (0: pass a null scratch).
size_t keras_rwkv_wkv6_scratch_bytes(int B, int T, int H, int N, int form,
                                     int backward) {
  kw::Params p = {};
  p.B = B;
  p.T = T;
  p.H = H;
  p.form = form;
  return kw::scratch_bytes(p, N, backward != 0);
}

const char* keras_rwkv_wkv6_error_string(int code) {
  return kw::error_string(code);
}

}  // extern "C"
