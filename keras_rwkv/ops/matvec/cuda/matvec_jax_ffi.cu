// XLA FFI handler for the decoding-step matrix-vector products (JAX).
//
// Operands come in one group per product: (x, w) for bfloat16 weights,
// (x, w, col_scale) for int8 weights, (x, w, col_scale, row_scale) for
// int8 weights with a quantized x; the attribute `kind` (0, 1, 2) says
// which. One result [M, N] bfloat16 per product.
#include <string>

#include "matvec_kernels.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace km = keras_rwkv_matvec;

namespace {

ffi::Error invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("matvec: " + what);
}

ffi::Error matvec_impl(cudaStream_t stream, int32_t kind,
                       ffi::RemainingArgs args, ffi::RemainingRets rets) {
  const int group = kind == 0 ? 2 : kind == 1 ? 3 : 4;
  if (kind < 0 || kind > 2) return invalid("kind must be 0, 1 or 2");
  if (args.size() % group != 0 || args.size() / group != rets.size()) {
    return invalid("operands do not match the results");
  }
  km::Params p = {};
  p.count = static_cast<int>(rets.size());
  if (p.count < 1 || p.count > km::kMaxMatrices) {
    return invalid("one to four products per call");
  }
  int rows = -1;
  for (int i = 0; i < p.count; ++i) {
    auto x = args.get<ffi::AnyBuffer>(group * i);
    auto w = args.get<ffi::AnyBuffer>(group * i + 1);
    auto y = rets.get<ffi::AnyBuffer>(i);
    if (x.has_error() || w.has_error() || y.has_error()) {
      return invalid("could not read the operands");
    }
    const auto xd = x->dimensions();
    const auto wd = w->dimensions();
    if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0]) {
      return invalid("x must be [M, K] and w [K, N]");
    }
    if (x->element_type() != ffi::DataType::BF16 ||
        (*y)->element_type() != ffi::DataType::BF16) {
      return invalid("x and y must be bfloat16");
    }
    const ffi::DataType want =
        kind == 0 ? ffi::DataType::BF16 : ffi::DataType::S8;
    if (w->element_type() != want) {
      return invalid(kind == 0 ? "w must be bfloat16" : "w must be int8");
    }
    if (rows >= 0 && rows != xd[0]) return invalid("M differs by product");
    rows = static_cast<int>(xd[0]);
    km::Matrix& m = p.m[i];
    m.x = static_cast<const __nv_bfloat16*>(x->untyped_data());
    m.w = w->untyped_data();
    m.y = static_cast<__nv_bfloat16*>((*y)->untyped_data());
    m.K = static_cast<int>(wd[0]);
    m.N = static_cast<int>(wd[1]);
    for (int s = 0; s + 2 < group; ++s) {
      auto scale = args.get<ffi::AnyBuffer>(group * i + 2 + s);
      if (scale.has_error()) return invalid("could not read a scale");
      const auto t = scale->element_type();
      if (t != ffi::DataType::F32 && t != ffi::DataType::BF16) {
        return invalid("scales must be float32 or bfloat16");
      }
      const int is_bf16 = t == ffi::DataType::BF16;
      if (s == 0) {
        m.col_scale = scale->untyped_data();
        m.col_scale_bf16 = is_bf16;
      } else {
        m.row_scale = scale->untyped_data();
        m.row_scale_bf16 = is_bf16;
      }
    }
  }
  const int rc = km::run(kind == 0 ? km::kBF16 : km::kInt8, rows, p, stream);
  if (rc != km::kOk) {
    return ffi::Error::Internal(std::string("matvec CUDA kernel: ") +
                                km::error_string(rc));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasRwkvMatvec, matvec_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attr<int32_t>("kind")
                                  .RemainingArgs()
                                  .RemainingRets(),
                              // Launches only: XLA may capture it in a
                              // CUDA graph with the rest of a step.
                              {ffi::Traits::kCmdBufferCompatible});
