// 2-D convolutions on the CPU through oneDNN, as XLA FFI handlers (models/onednn_conv.py).
//
// The kernels PyTorch uses on the CPU, inside a jax program: forward, backward-data (dx) and
// backward-weights (dw). Layouts are jax's: x [N,H,W,C] (NHWC), w [KH,KW,C,O] (HWIO),
// y [N,OH,OW,O]; float32. Attributes: strides [sh, sw], padding [top, bottom, left, right].
// Activations are used in place (oneDNN reads and writes NHWC); only the small weight tensor is
// reordered into the primitive's blocked layout on each call. Primitives are built once per
// geometry and cached.
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& Stream() {
  static dnnl::stream stream(Engine());
  return stream;
}

using Key = std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

// One convolution's geometry. oneDNN's logical dims are always (N, C, H, W) / (O, I, KH, KW);
// the format tag says how they sit in memory.
struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr;

  Key key(int kind) const { return {kind, n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr}; }
  memory::desc src() const { return {{n, c, h, w}, memory::data_type::f32, tag::nhwc}; }
  memory::desc dst() const { return {{n, o, oh, ow}, memory::data_type::f32, tag::nhwc}; }
  memory::desc weights(tag t) const { return {{o, c, kh, kw}, memory::data_type::f32, t}; }
  memory::dims strides() const { return {sh, sw}; }
  memory::dims pad_l() const { return {pt, pl}; }
  memory::dims pad_r() const { return {pb, pr}; }

  dnnl::convolution_forward::primitive_desc forward() const {
    return {Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
            src(), weights(tag::any), dst(), strides(), pad_l(), pad_r()};
  }
};

Geometry MakeGeometry(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w,
                      ffi::Span<const int64_t> y, ffi::Span<const int64_t> strides,
                      ffi::Span<const int64_t> padding) {
  return {x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2],
          strides[0], strides[1], padding[0], padding[1], padding[2], padding[3]};
}

// A primitive, the reorder between the user's HWIO weights and the primitive's layout, and the
// primitive-layout weight buffer.
struct Cached {
  dnnl::primitive primitive;
  dnnl::reorder weights_reorder;
  memory weights;
};

enum Kind { kForward, kBackwardData, kBackwardWeights };

std::mutex cache_mutex;  // also serialises execution: one stream, one cached weight buffer
std::map<Key, std::unique_ptr<Cached>> cache;

std::unique_ptr<Cached> Build(Kind kind, const Geometry& g) {
  memory hwio(g.weights(tag::hwio), Engine(), nullptr);
  auto forward = g.forward();
  if (kind == kForward) {
    memory weights(forward.weights_desc(), Engine());
    return std::make_unique<Cached>(
        Cached{dnnl::convolution_forward(forward), dnnl::reorder(hwio, weights), weights});
  }
  if (kind == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), dnnl::algorithm::convolution_direct, g.src(), g.weights(tag::any), g.dst(),
        g.strides(), g.pad_l(), g.pad_r(), forward);
    memory weights(pd.weights_desc(), Engine());
    return std::make_unique<Cached>(
        Cached{dnnl::convolution_backward_data(pd), dnnl::reorder(hwio, weights), weights});
  }
  dnnl::convolution_backward_weights::primitive_desc pd(
      Engine(), dnnl::algorithm::convolution_direct, g.src(), g.weights(tag::any), g.dst(),
      g.strides(), g.pad_l(), g.pad_r(), forward);
  memory weights(pd.diff_weights_desc(), Engine());
  return std::make_unique<Cached>(
      Cached{dnnl::convolution_backward_weights(pd), dnnl::reorder(weights, hwio), weights});
}

// Runs `kind` on (a, b) -> out; a, b, out are (x, w, y), (dy, w, dx) or (x, dy, dw).
ffi::Error Run(Kind kind, float* a, float* b, float* out, const Geometry& g) {
  try {
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto& entry = cache[g.key(kind)];
    if (!entry) entry = Build(kind, g);
    dnnl::stream& s = Stream();
    memory hwio(g.weights(tag::hwio), Engine(), kind == kBackwardWeights ? out : b);
    if (kind == kForward) {
      entry->weights_reorder.execute(s, hwio, entry->weights);
      entry->primitive.execute(s, {{DNNL_ARG_SRC, memory(g.src(), Engine(), a)},
                                   {DNNL_ARG_WEIGHTS, entry->weights},
                                   {DNNL_ARG_DST, memory(g.dst(), Engine(), out)}});
    } else if (kind == kBackwardData) {
      entry->weights_reorder.execute(s, hwio, entry->weights);
      entry->primitive.execute(s, {{DNNL_ARG_DIFF_DST, memory(g.dst(), Engine(), a)},
                                   {DNNL_ARG_WEIGHTS, entry->weights},
                                   {DNNL_ARG_DIFF_SRC, memory(g.src(), Engine(), out)}});
    } else {
      entry->primitive.execute(s, {{DNNL_ARG_SRC, memory(g.src(), Engine(), a)},
                                   {DNNL_ARG_DIFF_DST, memory(g.dst(), Engine(), b)},
                                   {DNNL_ARG_DIFF_WEIGHTS, entry->weights}});
      entry->weights_reorder.execute(s, entry->weights, hwio);
    }
    s.wait();
  } catch (const std::exception& e) {  // dnnl::error, std::bad_alloc
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using Ints = ffi::Span<const int64_t>;

ffi::Error Forward(F32 x, F32 w, ffi::Result<F32> y, Ints strides, Ints padding) {
  auto g = MakeGeometry(x.dimensions(), w.dimensions(), y->dimensions(), strides, padding);
  return Run(kForward, x.typed_data(), w.typed_data(), y->typed_data(), g);
}

ffi::Error BackwardData(F32 dy, F32 w, ffi::Result<F32> dx, Ints strides, Ints padding) {
  auto g = MakeGeometry(dx->dimensions(), w.dimensions(), dy.dimensions(), strides, padding);
  return Run(kBackwardData, dy.typed_data(), w.typed_data(), dx->typed_data(), g);
}

ffi::Error BackwardWeights(F32 x, F32 dy, ffi::Result<F32> dw, Ints strides, Ints padding) {
  auto g = MakeGeometry(x.dimensions(), dw->dimensions(), dy.dimensions(), strides, padding);
  return Run(kBackwardWeights, x.typed_data(), dy.typed_data(), dw->typed_data(), g);
}

}  // namespace

#define CONV_BINDING                                                               \
  ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>().Attr<Ints>("strides").Attr<Ints>( \
      "padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvForward, Forward, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardData, BackwardData, CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OnednnConvBackwardWeights, BackwardWeights, CONV_BINDING);

// The implementation oneDNN picks for a stride-1 3x3 "SAME" convolution (e.g. "brgconv:avx2").
extern "C" const char* OnednnConvImplementation(int64_t n, int64_t h, int64_t w, int64_t c,
                                                int64_t o) {
  static std::string name;
  name = Geometry{n, h, w, c, 3, 3, o, h, w, 1, 1, 1, 1, 1, 1}.forward().impl_info_str();
  return name.c_str();
}
