// GroupNorm (Wu & He 2018), optionally followed by swish, on the CPU: XLA FFI handlers for
// float32 channels-last tensors x [N, ..., C] (models/fast_ops.py, built with onednn_conv.cc).
//
// Forward: one pass over each example for the per-channel sums of x and x^2 (the group
// statistics: the same E[x^2] - E[x]^2 as flax), one pass for y = swish(x * a + b).
// Backward: one pass for dz = dy * swish'(z) (kept in dx) and its per-channel sums with dz and
// dz * xhat, one pass turning dz into dx. Examples are split over the OpenMP threads (the pool
// oneDNN's convolutions use). Outputs: y, and the [N, G] mean and 1/std for the backward;
// dx, and per-example [N, C] sums for dscale and dbias (the caller adds them over N).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using F32 = ffi::Buffer<ffi::F32>;

namespace {

struct Shape {
  int64_t n, s, c, g, cg;  // examples, positions per example, channels, groups, channels/group
};

Shape ShapeOf(ffi::Span<const int64_t> dims, int64_t groups) {
  Shape sh{dims[0], 1, dims[dims.size() - 1], groups, dims[dims.size() - 1] / groups};
  for (size_t i = 1; i + 1 < dims.size(); ++i) sh.s *= dims[i];
  return sh;
}

// exp(x), |relative error| < 2e-7 (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r,
// times 2^n), branch-free so that the loops calling it vectorise; NaN stays NaN.
inline float Exp(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float kRound = 12582912.0f;  // 1.5 * 2^23: (v + kRound) - kRound rounds v to nearest
  float n = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

inline float Sigmoid(float z) { return 1.0f / (1.0f + Exp(-z)); }

template <bool kSwish>
void ForwardExample(const float* __restrict x, const float* __restrict gamma,
                    const float* __restrict beta, float* __restrict y, float* __restrict mean,
                    float* __restrict rstd, const Shape& sh, float epsilon, float* __restrict sum,
                    float* __restrict sq, float* __restrict a, float* __restrict b) {
  for (int64_t c = 0; c < sh.c; ++c) sum[c] = sq[c] = 0.0f;
  for (int64_t p = 0; p < sh.s; ++p) {
    const float* xr = x + p * sh.c;
#pragma omp simd
    for (int64_t c = 0; c < sh.c; ++c) {
      sum[c] += xr[c];
      sq[c] += xr[c] * xr[c];
    }
  }
  const double count = double(sh.s * sh.cg);
  for (int64_t g = 0; g < sh.g; ++g) {
    double s1 = 0, s2 = 0;
    for (int64_t c = g * sh.cg; c < (g + 1) * sh.cg; ++c) s1 += sum[c], s2 += sq[c];
    const float m = float(s1 / count);
    const float var = std::max(float(s2 / count) - m * m, 0.0f);  // as flax, in float32
    const float r = 1.0f / std::sqrt(var + epsilon);
    mean[g] = m;
    rstd[g] = r;
    for (int64_t c = g * sh.cg; c < (g + 1) * sh.cg; ++c) {
      a[c] = gamma[c] * r;
      b[c] = beta[c] - m * a[c];
    }
  }
  for (int64_t p = 0; p < sh.s; ++p) {
    const float* xr = x + p * sh.c;
    float* yr = y + p * sh.c;
#pragma omp simd
    for (int64_t c = 0; c < sh.c; ++c) {
      float z = xr[c] * a[c] + b[c];
      yr[c] = kSwish ? z * Sigmoid(z) : z;
    }
  }
}

template <bool kSwish>
void BackwardExample(const float* __restrict x, const float* __restrict gamma,
                     const float* __restrict beta, const float* __restrict mean,
                     const float* __restrict rstd, const float* __restrict dy,
                     float* __restrict dx, float* __restrict dscale, float* __restrict dbias,
                     const Shape& sh, float* __restrict a, float* __restrict b,
                     float* __restrict m, float* __restrict r, float* __restrict k1,
                     float* __restrict k2) {
  for (int64_t c = 0; c < sh.c; ++c) {
    m[c] = mean[c / sh.cg];
    r[c] = rstd[c / sh.cg];
    a[c] = gamma[c] * r[c];
    b[c] = beta[c] - m[c] * a[c];
    k1[c] = k2[c] = 0.0f;  // sums of dz and dz * xhat, first
  }
  for (int64_t p = 0; p < sh.s; ++p) {
    const float* xr = x + p * sh.c;
    const float* dr = dy + p * sh.c;
    float* dzr = dx + p * sh.c;  // dz, until the second pass turns it into dx
#pragma omp simd
    for (int64_t c = 0; c < sh.c; ++c) {
      float dz = dr[c];
      if (kSwish) {
        float z = xr[c] * a[c] + b[c];
        float sg = Sigmoid(z);
        dz *= sg * (1.0f + z * (1.0f - sg));
      }
      dzr[c] = dz;
      k1[c] += dz;
      k2[c] += dz * (xr[c] - m[c]) * r[c];
    }
  }
  // dx = rstd * (gamma dz - mean_g(gamma dz) - xhat * mean_g(gamma dz xhat))
  const float count = float(sh.s * sh.cg);
  for (int64_t g = 0; g < sh.g; ++g) {
    float t1 = 0, t2 = 0;
    for (int64_t c = g * sh.cg; c < (g + 1) * sh.cg; ++c) {
      dbias[c] = k1[c];
      dscale[c] = k2[c];
      t1 += gamma[c] * k1[c];
      t2 += gamma[c] * k2[c];
    }
    for (int64_t c = g * sh.cg; c < (g + 1) * sh.cg; ++c) k1[c] = t1 / count, k2[c] = t2 / count;
  }
  for (int64_t p = 0; p < sh.s; ++p) {
    const float* xr = x + p * sh.c;
    float* out = dx + p * sh.c;
#pragma omp simd
    for (int64_t c = 0; c < sh.c; ++c) {
      float xhat = (xr[c] - m[c]) * r[c];
      out[c] = r[c] * (gamma[c] * out[c] - k1[c] - xhat * k2[c]);
    }
  }
}

// Runs fn(n, scratch) for every example n, split statically over the OpenMP threads; each
// thread has its own scratch of `floats` floats.
template <typename Fn>
void ForEachExample(int64_t examples, int64_t floats, Fn fn) {
#pragma omp parallel
  {
    std::vector<float> scratch(floats);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < examples; ++n) fn(n, scratch.data());
  }
}

ffi::Error Forward(F32 x, F32 scale, F32 bias, ffi::Result<F32> y, ffi::Result<F32> mean,
                   ffi::Result<F32> rstd, int64_t groups, float epsilon, bool swish) {
  const Shape sh = ShapeOf(x.dimensions(), groups);
  const int64_t size = sh.s * sh.c;
  const auto run = swish ? ForwardExample<true> : ForwardExample<false>;
  ForEachExample(sh.n, 4 * sh.c, [&](int64_t n, float* w) {
    run(x.typed_data() + n * size, scale.typed_data(), bias.typed_data(),
        y->typed_data() + n * size, mean->typed_data() + n * sh.g,
        rstd->typed_data() + n * sh.g, sh, epsilon, w, w + sh.c, w + 2 * sh.c, w + 3 * sh.c);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(F32 x, F32 scale, F32 bias, F32 mean, F32 rstd, F32 dy, ffi::Result<F32> dx,
                    ffi::Result<F32> dscale, ffi::Result<F32> dbias, int64_t groups, bool swish) {
  const Shape sh = ShapeOf(x.dimensions(), groups);
  const int64_t size = sh.s * sh.c;
  const auto run = swish ? BackwardExample<true> : BackwardExample<false>;
  ForEachExample(sh.n, 6 * sh.c, [&](int64_t n, float* w) {
    run(x.typed_data() + n * size, scale.typed_data(), bias.typed_data(),
        mean.typed_data() + n * sh.g, rstd.typed_data() + n * sh.g, dy.typed_data() + n * size,
        dx->typed_data() + n * size, dscale->typed_data() + n * sh.c,
        dbias->typed_data() + n * sh.c, sh, w, w + sh.c, w + 2 * sh.c, w + 3 * sh.c,
        w + 4 * sh.c, w + 5 * sh.c);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupNormForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // x
                                  .Arg<F32>()  // scale
                                  .Arg<F32>()  // bias
                                  .Ret<F32>()  // y
                                  .Ret<F32>()  // mean [N, G]
                                  .Ret<F32>()  // 1/std [N, G]
                                  .Attr<int64_t>("groups")
                                  .Attr<float>("epsilon")
                                  .Attr<bool>("swish"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupNormBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()  // x
                                  .Arg<F32>()  // scale
                                  .Arg<F32>()  // bias
                                  .Arg<F32>()  // mean
                                  .Arg<F32>()  // 1/std
                                  .Arg<F32>()  // dy
                                  .Ret<F32>()  // dx
                                  .Ret<F32>()  // dscale per example [N, C]
                                  .Ret<F32>()  // dbias per example [N, C]
                                  .Attr<int64_t>("groups")
                                  .Attr<bool>("swish"));
