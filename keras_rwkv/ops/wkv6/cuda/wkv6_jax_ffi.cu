// XLA FFI handlers for JAX (registered from Python with
// jax.ffi.register_ffi_target). Shapes come from the buffers.
#include <optional>
#include <string>

#include "wkv6_dispatch.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace kw = keras_rwkv_wkv6;

namespace {

int dtype_code(ffi::DataType t) {
  if (t == ffi::DataType::F32) return kw::kF32;
  if (t == ffi::DataType::BF16) return kw::kBF16;
  return -1;
}

ffi::Error check_inputs(const ffi::AnyBuffer& r, const ffi::AnyBuffer& k,
                        const ffi::AnyBuffer& v, int* dtype) {
  if (r.dimensions().size() != 4) {
    return ffi::Error::InvalidArgument("wkv6: r must be [B, T, H, N]");
  }
  *dtype = dtype_code(r.element_type());
  if (*dtype < 0 || k.element_type() != r.element_type() ||
      v.element_type() != r.element_type()) {
    return ffi::Error::InvalidArgument(
        "wkv6: r, k, v must all be float32 or all bfloat16");
  }
  return ffi::Error::Success();
}

ffi::Error status(int rc) {
  if (rc == 0) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("wkv6 CUDA kernel: ") +
                              kw::error_string(rc));
}

// The parallel form's scratch (chunk states), from XLA's allocator, which
// orders the block on this call's stream.
ffi::Error allocate_scratch(ffi::ScratchAllocator& scratch, int N,
                            bool backward, kw::Params* p) {
  const size_t bytes = kw::scratch_bytes(*p, N, backward);
  if (bytes == 0) return ffi::Error::Success();
  std::optional<void*> block = scratch.Allocate(bytes, 16);
  if (!block.has_value()) {
    return ffi::Error::Internal(
        "wkv6: no device memory for the parallel form's scratch (" +
        std::to_string(bytes) + " bytes); set KERAS_RWKV_WKV6_FORM=step");
  }
  p->scratch = *block;
  return ffi::Error::Success();
}

ffi::Error forward_impl(cudaStream_t stream,
                        ffi::ScratchAllocator scratch, ffi::AnyBuffer r,
                        ffi::AnyBuffer k, ffi::AnyBuffer v,
                        ffi::Buffer<ffi::F32> log_w, ffi::Buffer<ffi::F32> u,
                        ffi::Buffer<ffi::F32> s0,
                        ffi::Result<ffi::AnyBuffer> y,
                        ffi::Result<ffi::Buffer<ffi::F32>> s_out,
                        int32_t cols, int32_t groups, int32_t form) {
  int dtype = 0;
  ffi::Error err = check_inputs(r, k, v, &dtype);
  if (err.failure()) return err;
  const auto d = r.dimensions();
  const int B = d[0], T = d[1], H = d[2], N = d[3];
  kw::Params p = {};
  p.B = B;
  p.T = T;
  p.H = H;
  p.r = r.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.log_w = log_w.typed_data();
  p.u = u.typed_data();
  p.s0 = s0.typed_data();
  p.s0_bstride =
      s0.dimensions()[0] == 1 ? 0 : static_cast<int64_t>(H) * N * N;
  p.y = y->untyped_data();
  p.s_out = s_out->typed_data();
  p.cols = cols;
  p.groups = groups;
  p.form = form;
  err = allocate_scratch(scratch, N, false, &p);
  if (err.failure()) return err;
  return status(kw::run(dtype, N, p, false, stream));
}

ffi::Error backward_impl(
    cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer r,
    ffi::AnyBuffer k, ffi::AnyBuffer v,
    ffi::Buffer<ffi::F32> log_w, ffi::Buffer<ffi::F32> u,
    ffi::Buffer<ffi::F32> s0, ffi::AnyBuffer dy, ffi::Buffer<ffi::F32> gs,
    ffi::Buffer<ffi::F32> s_T, ffi::Result<ffi::AnyBuffer> dr,
    ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
    ffi::Result<ffi::Buffer<ffi::F32>> p_sum,
    ffi::Result<ffi::Buffer<ffi::F32>> q_sum,
    ffi::Result<ffi::Buffer<ffi::F32>> du_part,
    ffi::Result<ffi::Buffer<ffi::F32>> ds0, int32_t cols, int32_t groups,
    int32_t form) {
  int dtype = 0;
  ffi::Error err = check_inputs(r, k, v, &dtype);
  if (err.failure()) return err;
  if (dy.element_type() != r.element_type()) {
    return ffi::Error::InvalidArgument("wkv6: dy must have r's dtype");
  }
  const auto d = r.dimensions();
  const int B = d[0], T = d[1], H = d[2], N = d[3];
  kw::Params p = {};
  p.B = B;
  p.T = T;
  p.H = H;
  p.r = r.untyped_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.log_w = log_w.typed_data();
  p.u = u.typed_data();
  p.s0 = s0.typed_data();
  p.s0_bstride =
      s0.dimensions()[0] == 1 ? 0 : static_cast<int64_t>(H) * N * N;
  p.dy = dy.untyped_data();
  p.gs = gs.typed_data();
  p.s_T = s_T.typed_data();
  p.dr = dr->untyped_data();
  p.dk = dk->untyped_data();
  p.dv = dv->untyped_data();
  p.p = p_sum->typed_data();
  p.q = q_sum->typed_data();
  p.du_part = du_part->typed_data();
  p.ds0 = ds0->typed_data();
  p.cols = cols;
  p.groups = groups;
  p.form = form;
  err = allocate_scratch(scratch, N, true, &p);
  if (err.failure()) return err;
  return status(kw::run(dtype, N, p, true, stream));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    KerasRwkvWkv6Forward, forward_impl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::ScratchAllocator>()   // the parallel form's chunk states
        .Arg<ffi::AnyBuffer>()          // r
        .Arg<ffi::AnyBuffer>()          // k
        .Arg<ffi::AnyBuffer>()          // v
        .Arg<ffi::Buffer<ffi::F32>>()   // log_w
        .Arg<ffi::Buffer<ffi::F32>>()   // u
        .Arg<ffi::Buffer<ffi::F32>>()   // s0
        .Ret<ffi::AnyBuffer>()          // y
        .Ret<ffi::Buffer<ffi::F32>>()   // final state
        .Attr<int32_t>("cols")          // Params::cols, groups, form
        .Attr<int32_t>("groups")
        .Attr<int32_t>("form"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    KerasRwkvWkv6Backward, backward_impl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::ScratchAllocator>()   // the parallel form's chunk states
        .Arg<ffi::AnyBuffer>()          // r
        .Arg<ffi::AnyBuffer>()          // k
        .Arg<ffi::AnyBuffer>()          // v
        .Arg<ffi::Buffer<ffi::F32>>()   // log_w
        .Arg<ffi::Buffer<ffi::F32>>()   // u
        .Arg<ffi::Buffer<ffi::F32>>()   // s0
        .Arg<ffi::AnyBuffer>()          // dy
        .Arg<ffi::Buffer<ffi::F32>>()   // dL/dS_final
        .Arg<ffi::Buffer<ffi::F32>>()   // S_final
        .Ret<ffi::AnyBuffer>()          // dr
        .Ret<ffi::AnyBuffer>()          // dk
        .Ret<ffi::AnyBuffer>()          // dv
        .Ret<ffi::Buffer<ffi::F32>>()   // P
        .Ret<ffi::Buffer<ffi::F32>>()   // Q
        .Ret<ffi::Buffer<ffi::F32>>()   // du per batch
        .Ret<ffi::Buffer<ffi::F32>>()   // dS0 per batch
        .Attr<int32_t>("cols")          // Params::cols, groups, form
        .Attr<int32_t>("groups")
        .Attr<int32_t>("form"));
