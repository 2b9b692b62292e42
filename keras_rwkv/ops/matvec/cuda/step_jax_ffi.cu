// XLA FFI handlers for the fused pieces of a batch-1 decoding step (JAX);
// see step_kernels.cuh. Operand order is the one `fused_step.py` passes.
#include <string>

#include "step_kernels.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
namespace ks = keras_rwkv_step;

namespace {

ffi::Error invalid(const char* op, const std::string& what) {
  return ffi::Error::InvalidArgument(std::string(op) + ": " + what);
}

ffi::Error launched(const char* op, cudaError_t err) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string(op) + " CUDA kernel: " +
                              cudaGetErrorString(err));
}

bool is_bf16(const ffi::AnyBuffer& b, size_t n) {
  return b.element_type() == ffi::DataType::BF16 && b.element_count() == n;
}

bool is_f32(const ffi::AnyBuffer& b, size_t n) {
  return b.element_type() == ffi::DataType::F32 && b.element_count() == n;
}

// The parameter vectors' common dtype: 1 bfloat16, 0 float32, -1 neither
// (or mixed), given (buffer, element count) pairs.
int param_kind(std::initializer_list<std::pair<const ffi::AnyBuffer*, size_t>>
                   vectors) {
  int kind = -2;
  for (const auto& [b, n] : vectors) {
    const int k = is_bf16(*b, n) ? 1 : is_f32(*b, n) ? 0 : -1;
    if (k < 0 || (kind != -2 && k != kind)) return -1;
    kind = k;
  }
  return kind;
}

bool as_mask(const ffi::AnyBuffer& b, ks::Mask* out) {
  if (b.element_count() != 1) return false;
  switch (b.element_type()) {
    case ffi::DataType::F32: out->type = ks::kMaskF32; break;
    case ffi::DataType::BF16: out->type = ks::kMaskBF16; break;
    case ffi::DataType::S32: out->type = ks::kMaskI32; break;
    case ffi::DataType::PRED: out->type = ks::kMaskBool; break;
    default: return false;
  }
  out->p = b.untyped_data();
  return true;
}

template <typename T>
T* ptr(const ffi::AnyBuffer& b) {
  return static_cast<T*>(b.untyped_data());
}

template <typename T>
T* ptr(ffi::Result<ffi::AnyBuffer>& b) {
  return static_cast<T*>(b->untyped_data());
}

const char kParams[] =
    "the parameter vectors must all be bfloat16 or all float32, of C "
    "elements";

// x, gamma, beta[, delta] -> y[, x + delta]
ffi::Error add_norm_impl(cudaStream_t stream, float eps, int32_t with_delta,
                         ffi::AnyBuffer x,
                         ffi::AnyBuffer gamma, ffi::AnyBuffer beta,
                         ffi::RemainingArgs rest,
                         ffi::Result<ffi::AnyBuffer> y,
                         ffi::RemainingRets rest_rets) {
  const char* op = "add_norm";
  const size_t c = x.element_count();
  if (c > ks::kMaxWidth || !is_bf16(x, c) || !is_bf16(*y, c)) {
    return invalid(op, "x and y must be bfloat16 of at most 6144 elements");
  }
  const int kind = param_kind({{&gamma, c}, {&beta, c}});
  if (kind < 0) return invalid(op, kParams);
  const size_t extra = with_delta != 0;
  if (rest.size() != extra || rest_rets.size() != extra) {
    return invalid(op, "a delta needs a second result, and only one");
  }
  const ks::bf16* delta = nullptr;
  ks::bf16* x_out = nullptr;
  if (with_delta) {
    auto d = rest.get<ffi::AnyBuffer>(0);
    auto xo = rest_rets.get<ffi::AnyBuffer>(0);
    if (d.has_error() || xo.has_error() || !is_bf16(*d, c) ||
        !is_bf16(**xo, c)) {
      return invalid(op, "delta and x + delta must be bfloat16 [C]");
    }
    delta = ptr<const ks::bf16>(*d);
    x_out = static_cast<ks::bf16*>((*xo)->untyped_data());
  }
  auto run = [&](auto tag) {
    using P = decltype(tag);
    ks::NormParams<P> p = {static_cast<int>(c), ptr<const ks::bf16>(x),
                           delta, ptr<const P>(gamma), ptr<const P>(beta),
                           eps, x_out, ptr<ks::bf16>(y)};
    return ks::launch_add_norm(p, stream);
  };
  return launched(op, kind ? run(ks::bf16()) : run(0.f));
}

ffi::Error mix_impl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer prev,
                    ffi::AnyBuffer maa_x, ffi::AnyBuffer maa,
                    ffi::AnyBuffer w1, ffi::AnyBuffer w2,
                    ffi::AnyBuffer decay, ffi::AnyBuffer dw1,
                    ffi::AnyBuffer dw2, ffi::AnyBuffer mask,
                    ffi::Result<ffi::AnyBuffer> x_k,
                    ffi::Result<ffi::AnyBuffer> x_v,
                    ffi::Result<ffi::AnyBuffer> x_r,
                    ffi::Result<ffi::AnyBuffer> x_g,
                    ffi::Result<ffi::AnyBuffer> log_w) {
  const char* op = "mix";
  const size_t c = x.element_count();
  const auto w2d = w2.dimensions();
  const auto dw1d = dw1.dimensions();
  if (w2d.size() != 3 || w2d[0] != 5 || dw1d.size() != 2) {
    return invalid(op, "w2 must be [5, D, C] and dw1 [C, E]");
  }
  const int C = static_cast<int>(c), D = static_cast<int>(w2d[1]),
            E = static_cast<int>(dw1d[1]);
  if (!ks::mix_shapes_ok(C, D, E)) {
    return invalid(op, "C must be a multiple of 64 (at most 6144), D and E "
                       "multiples of 8 (at most 64 and 128)");
  }
  const size_t d = D, e = E;
  if (!is_bf16(x, c) || !is_bf16(prev, c) || !is_bf16(w1, c * 5 * d) ||
      !is_bf16(w2, 5 * d * c) || !is_bf16(dw1, c * e) ||
      !is_bf16(dw2, e * c)) {
    return invalid(op, "x, prev and the LoRA matrices must be bfloat16");
  }
  const int kind = param_kind({{&maa_x, c}, {&maa, 5 * c}, {&decay, c}});
  if (kind < 0) return invalid(op, kParams);
  ks::Mask m;
  if (!as_mask(mask, &m)) return invalid(op, "mask: one int32/bool/float");
  ffi::Result<ffi::AnyBuffer>* outs[4] = {&x_k, &x_v, &x_r, &x_g};
  for (auto* o : outs) {
    if (!is_bf16(**o, c)) return invalid(op, "outputs are bfloat16 [C]");
  }
  if (!is_f32(*log_w, c)) return invalid(op, "log_w is float32 [C]");
  auto run = [&](auto tag) {
    using P = decltype(tag);
    ks::MixParams<P> p = {};
    p.C = C;
    p.D = D;
    p.E = E;
    p.x = ptr<const ks::bf16>(x);
    p.prev = ptr<const ks::bf16>(prev);
    p.maa_x = ptr<const P>(maa_x);
    p.maa = ptr<const P>(maa);
    p.w1 = ptr<const ks::bf16>(w1);
    p.w2 = ptr<const ks::bf16>(w2);
    p.decay = ptr<const P>(decay);
    p.dw1 = ptr<const ks::bf16>(dw1);
    p.dw2 = ptr<const ks::bf16>(dw2);
    p.mask = m;
    for (int i = 0; i < 4; ++i) p.out[i] = ptr<ks::bf16>(*outs[i]);
    p.log_w = ptr<float>(log_w);
    return ks::launch_mix(p, stream);
  };
  return launched(op, kind ? run(ks::bf16()) : run(0.f));
}

ffi::Error wkv_gate_impl(cudaStream_t stream, float eps, ffi::AnyBuffer r,
                         ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer g,
                         ffi::AnyBuffer log_w, ffi::AnyBuffer u,
                         ffi::AnyBuffer s_in, ffi::AnyBuffer gamma,
                         ffi::AnyBuffer beta, ffi::AnyBuffer mask,
                         ffi::Result<ffi::AnyBuffer> y,
                         ffi::Result<ffi::AnyBuffer> s_out) {
  const char* op = "wkv_gate";
  const size_t c = r.element_count();
  if (c % ks::kHead != 0) return invalid(op, "C must be a multiple of 64");
  const size_t state = c * ks::kHead;
  if (!is_bf16(r, c) || !is_bf16(k, c) || !is_bf16(v, c) || !is_bf16(g, c) ||
      !is_bf16(*y, c)) {
    return invalid(op, "r, k, v, g and y must be bfloat16 [C]");
  }
  if (!is_f32(log_w, c) || !is_f32(s_in, state) || !is_f32(*s_out, state)) {
    return invalid(op, "log_w [C] and the states [H, 64, 64] are float32");
  }
  const int kind = param_kind({{&u, c}, {&gamma, c}, {&beta, c}});
  if (kind < 0) return invalid(op, kParams);
  ks::Mask m;
  if (!as_mask(mask, &m)) return invalid(op, "mask: one int32/bool/float");
  auto run = [&](auto tag) {
    using P = decltype(tag);
    ks::WkvParams<P> p = {};
    p.H = static_cast<int>(c / ks::kHead);
    p.r = ptr<const ks::bf16>(r);
    p.k = ptr<const ks::bf16>(k);
    p.v = ptr<const ks::bf16>(v);
    p.g = ptr<const ks::bf16>(g);
    p.log_w = ptr<const float>(log_w);
    p.u = ptr<const P>(u);
    p.s_in = ptr<const float>(s_in);
    p.s_out = ptr<float>(s_out);
    p.gamma = ptr<const P>(gamma);
    p.beta = ptr<const P>(beta);
    p.mask = m;
    p.eps = eps;
    p.y = ptr<ks::bf16>(y);
    return ks::launch_wkv_gate(p, stream);
  };
  return launched(op, kind ? run(ks::bf16()) : run(0.f));
}

}  // namespace

// Launches only: XLA may capture them in a CUDA graph with the rest of a
// step.
XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasRwkvAddNorm, add_norm_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attr<float>("eps")
                                  .Attr<int32_t>("with_delta")
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // gamma
                                  .Arg<ffi::AnyBuffer>()  // beta
                                  .RemainingArgs()        // delta?
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .RemainingRets(),       // x + delta
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasRwkvMix, mix_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // prev
                                  .Arg<ffi::AnyBuffer>()  // maa_x
                                  .Arg<ffi::AnyBuffer>()  // maa
                                  .Arg<ffi::AnyBuffer>()  // w1
                                  .Arg<ffi::AnyBuffer>()  // w2
                                  .Arg<ffi::AnyBuffer>()  // decay
                                  .Arg<ffi::AnyBuffer>()  // dw1
                                  .Arg<ffi::AnyBuffer>()  // dw2
                                  .Arg<ffi::AnyBuffer>()  // mask
                                  .Ret<ffi::AnyBuffer>()  // x_k
                                  .Ret<ffi::AnyBuffer>()  // x_v
                                  .Ret<ffi::AnyBuffer>()  // x_r
                                  .Ret<ffi::AnyBuffer>()  // x_g
                                  .Ret<ffi::AnyBuffer>(),  // log_w
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(KerasRwkvWkvGate, wkv_gate_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Attr<float>("eps")
                                  .Arg<ffi::AnyBuffer>()  // r
                                  .Arg<ffi::AnyBuffer>()  // k
                                  .Arg<ffi::AnyBuffer>()  // v
                                  .Arg<ffi::AnyBuffer>()  // g
                                  .Arg<ffi::AnyBuffer>()  // log_w
                                  .Arg<ffi::AnyBuffer>()  // u
                                  .Arg<ffi::AnyBuffer>()  // s_in
                                  .Arg<ffi::AnyBuffer>()  // gamma
                                  .Arg<ffi::AnyBuffer>()  // beta
                                  .Arg<ffi::AnyBuffer>()  // mask
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::AnyBuffer>(),  // s_out
                              {ffi::Traits::kCmdBufferCompatible});
