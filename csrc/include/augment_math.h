// Per-pixel math of the fused augmentation, shared by the CPU (csrc/cpu/augment.cpp) and CUDA
// (csrc/cuda/augment.cu) kernels. Every formula follows empssl/reference/augment.py operation
// by operation (same float32 expressions, same order), so the fast paths differ from the
// reference only by summation order and FMA contraction.
#pragma once

#include <cmath>
#include <cstdint>

#include "augment_params.h"
#include "float_bits.h"
#include "host_device.h"

namespace empssl {
namespace augment {

// ---- scalars of the reference --------------------------------------------------------------

// uint8 -> [0, 1]: the reference multiplies by the float32 value of 1/255 (torchvision's to_dtype)
constexpr float INV_255 = static_cast<float>(1.0 / 255.0);
constexpr float GRAY_R = 0.2989f, GRAY_G = 0.587f, GRAY_B = 0.114f;
constexpr float ONE_SIXTH = static_cast<float>(1.0 / 6.0);

// a / b rounded to nearest. On the GPU without the division slow path, whose subroutine call
// costs register saves (reported by ptxas as spills): reciprocal estimate, one Newton step, and
// one residual correction of the quotient, correct for the normal operands of this chain.
EMPSSL_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r = __fdividef(1.0f, b);
  r = fmaf(fmaf(-b, r, 1.0f), r, r);
  const float q = a * r;
  return fmaf(fmaf(-b, q, a), r, q);
#else
  return a / b;
#endif
}

// The same for float64 (the resampling weights): two Newton steps from the float estimate.
EMPSSL_HD double div_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  double r = static_cast<double>(__fdividef(1.0f, static_cast<float>(b)));
  r = fma(fma(-b, r, 1.0), r, r);
  r = fma(fma(-b, r, 1.0), r, r);
  const double q = a * r;
  return fma(fma(-b, q, a), r, q);
#else
  return a / b;
#endif
}

#if !defined(__CUDACC__)
// GCC/Clang vector types of any width (float lanes): the CPU kernel runs the formulas below on
// these, as GCC does not if-convert their selects when vectorising a loop of scalar calls.
template <typename F>
inline F trunc_small(F x) {
  typedef int32_t Lanes __attribute__((vector_size(sizeof(F))));
  return __builtin_convertvector(__builtin_convertvector(x, Lanes), F);
}
template <typename F>
inline F div_rn(F a, F b) {
  return a / b;
}
#endif

// x broadcast to every lane of F (float, or a CPU vector of float lanes)
template <typename F>
EMPSSL_HD F splat(float x) {
  return F{} + x;
}
template <>
EMPSSL_HD float splat<float>(float x) {
  return x;  // not 0 + x: the compiler may not drop that add (-0)
}

// clamp to [0, 1] (of every lane): selects rather than fminf/fmaxf, they vectorise on the CPU
// (no NaN can occur here)
template <typename F>
EMPSSL_HD F clamp01(F x) {
  const F zero = splat<F>(0.0f), one = splat<F>(1.0f);
  x = x < zero ? zero : x;
  return x > one ? one : x;
}

// truncation toward zero for |x| < 2^31; exact, and vectorisable without SSE4.1
EMPSSL_HD float trunc_small(float x) { return static_cast<float>(static_cast<int>(x)); }

// F below is float (CUDA, scalar CPU) or a vector of float lanes (CPU): the same expressions.
template <typename F>
EMPSSL_HD F gray(F r, F g, F b) {
  return r * GRAY_R + g * GRAY_G + b * GRAY_B;
}

// ---- colour jitter (torchvision's _blend on float images) ---------------------------------

template <typename F>
EMPSSL_HD F brightness(F x, float f) {
  return clamp01(x * f);
}

// contrast and saturation: clamp(f * x + (1 - f) * other), other = the patch's mean gray / the pixel's gray
template <typename F>
EMPSSL_HD F blend(F x, F other, float f) {
  return clamp01(x * f + other * (1.0f - f));
}

// Hue shift: torchvision's _rgb2hsv, h = (h + shift) mod 1, _hsv2rgb, in the reference's float32
// steps, straight-line code with selects.
template <typename F>
EMPSSL_HD void hue_shift(F& r_io, F& g_io, F& b_io, float shift) {
  const F r = r_io, g = g_io, b = b_io;
  const F zero = splat<F>(0.0f), one = splat<F>(1.0f);
  F maxc = r > g ? r : g;
  maxc = maxc > b ? maxc : b;
  F minc = r < g ? r : g;
  minc = minc < b ? minc : b;
  const F chroma = maxc - minc;
  // the reference divides by 1 where maxc == minc (hue and saturation are 0 there); chroma is 0
  // exactly there, so adding 1 gives the same divisors: 1 for chroma, and for the saturation
  // 0 / (maxc + 1) = 0 = 0 / 1
  const F gray_one = maxc == minc ? one : zero;
  const F s = div_rn(chroma, maxc + gray_one);
  const F divisor = chroma + gray_one;
  const F rc = div_rn(maxc - r, divisor);
  const F gc = div_rn(maxc - g, divisor);
  const F bc = div_rn(maxc - b, divisor);
  const F h_r = bc - gc, h_g = (rc + 2.0f) - bc, h_b = (gc + 4.0f) - rc;
  // the maximum's channel decides, r before g before b
  F h = maxc == g ? h_g : h_b;
  h = maxc == r ? h_r : h;
  // fmod(h / 6 + 1, 1): the argument lies in [5/6, 11/6], where x - trunc(x) is fmod exactly
  h = h * ONE_SIXTH + 1.0f;
  h = h - trunc_small(h);
  // torch.remainder(h + shift, 1): fmod, then + 1 where negative (|h + shift| < 2)
  h = h + shift;
  h = h - trunc_small(h);
  h = h < zero ? h + 1.0f : h;
  const F v = maxc;
  const F h6 = h * 6.0f;
  F sector = trunc_small(h6);  // floor: h6 >= 0
  const F frac = h6 - sector;
  const F six = splat<F>(6.0f);
  sector = sector >= six ? sector - 6.0f : sector;  // h == 1 after rounding
  const F p = clamp01(v * (1.0f - s));
  const F q = clamp01(v * (1.0f - s * frac));
  const F t = clamp01(v * (s * frac + (1.0f - s)));
  const F s0 = splat<F>(0.0f), s1 = splat<F>(1.0f), s2 = splat<F>(2.0f), s3 = splat<F>(3.0f), s4 = splat<F>(4.0f),
          s5 = splat<F>(5.0f);
  // sector:      0  1  2  3  4  5
  // r:           v  q  p  p  t  v
  // g:           t  v  v  q  p  p
  // b:           p  p  t  v  v  q
  // the two sectors of v are never selected one right after the other: GCC merges such a pair
  // into one select on an OR of masks, which it scalarises for 16 lanes
  F out = sector == s4 ? t : p;
  out = sector == s0 ? v : out;
  out = sector == s1 ? q : out;
  r_io = sector == s5 ? v : out;
  out = sector == s3 ? q : p;
  out = sector == s1 ? v : out;
  out = sector == s0 ? t : out;
  g_io = sector == s2 ? v : out;
  out = sector == s5 ? q : p;
  out = sector == s3 ? v : out;
  out = sector == s2 ? t : out;
  b_io = sector == s4 ? v : out;
}

// ---- the remaining pixel ops -----------------------------------------------------------------

template <typename F>
EMPSSL_HD F solarize(F x, float threshold) {
  return x >= splat<F>(threshold) ? splat<F>(1.0f) - x : x;
}

template <typename F>
EMPSSL_HD F normalize(F x, float mean, float std) {
  return div_rn(x - mean, splat<F>(std));
}

// ---- resampling weights of the resized crop ------------------------------------------------
// torch.nn.functional.interpolate(bilinear, align_corners=False, antialias=True) on the crop:
// scale = crop_len / out_size, support = max(scale, 1), output pixel i centred at
// scale * (i + 0.5) in crop coordinates, source pixel j weighted by the triangle
// max(0, 1 - |(j + 0.5 - center) / support|), normalised over the crop. Float64, as the reference.

// Largest number of source pixels one output pixel can read from a crop of at most max_crop_len.
EMPSSL_HD int max_resample_taps(int64_t max_crop_len, int out_size) {
  const double scale = static_cast<double>(max_crop_len) / out_size;
  const double support = scale > 1.0 ? scale : 1.0;
  return static_cast<int>(ceil(2.0 * support)) + 1;
}

// Fills weights[0..count) for output pixel `out_index`; returns the first crop-relative source
// index and sets count (at most max_taps; the window holds exactly the non-zero taps).
EMPSSL_HD int resample_weights(int out_index, int crop_len, int out_size, int max_taps, float* weights, int* count) {
  const double scale = div_rn(static_cast<double>(crop_len), static_cast<double>(out_size));
  const double support = scale > 1.0 ? scale : 1.0;
  const double center = scale * (out_index + 0.5);
  int first = static_cast<int>(floor(center - support - 0.5)) + 1;
  int last = static_cast<int>(ceil(center + support - 0.5)) - 1;
  first = first < 0 ? 0 : first;
  last = last > crop_len - 1 ? crop_len - 1 : last;
  if (last - first + 1 > max_taps) last = first + max_taps - 1;  // memory safety only: never for valid crops
  double total = 0.0;
  for (int j = first; j <= last; ++j) {
    const double w = 1.0 - fabs(div_rn(j + 0.5 - center, support));
    total += w > 0.0 ? w : 0.0;
  }
  int n = 0;
  for (int j = first; j <= last; ++j, ++n) {
    const double w = 1.0 - fabs(div_rn(j + 0.5 - center, support));
    weights[n] = static_cast<float>(div_rn(w > 0.0 ? w : 0.0, total));
  }
  *count = n;
  return first;
}

// The crop box of a parameter row, clamped into the H x W image. For memory safety only:
// sampled crops always lie inside their image.
struct CropBox {
  int top, left, height, width;
};

EMPSSL_HD CropBox crop_box(const float* row, int64_t height, int64_t width) {
  int64_t top = static_cast<int64_t>(row[CROP_TOP]), left = static_cast<int64_t>(row[CROP_LEFT]);
  int64_t h = static_cast<int64_t>(row[CROP_HEIGHT]), w = static_cast<int64_t>(row[CROP_WIDTH]);
  top = top < 0 ? 0 : (top > height - 1 ? height - 1 : top);
  left = left < 0 ? 0 : (left > width - 1 ? width - 1 : left);
  h = h > height - top ? height - top : (h < 1 ? 1 : h);
  w = w > width - left ? width - left : (w < 1 ? 1 : w);
  return {static_cast<int>(top), static_cast<int>(left), static_cast<int>(h), static_cast<int>(w)};
}

// ---- Gaussian blur ---------------------------------------------------------------------------

// Normalised 1-D Gaussian of kernel_size taps, exp(-0.5 (t / sigma)^2), t = -(K-1)/2 .. (K-1)/2.
EMPSSL_HD void gaussian_weights(float sigma, int kernel_size, float* weights) {
  const int radius = kernel_size / 2;
  float total = 0.0f;
  for (int k = 0; k < kernel_size; ++k) {
    const float t = div_rn(static_cast<float>(k - radius), sigma);
    weights[k] = expf(-0.5f * (t * t));
    total += weights[k];
  }
  for (int k = 0; k < kernel_size; ++k) weights[k] = div_rn(weights[k], total);
}

// Reflect padding (torch's "reflect": the edge pixel is not repeated); valid for -size < i < 2 size - 1.
EMPSSL_HD int reflect_index(int i, int size) {
  i = i < 0 ? -i : i;
  return i >= size ? 2 * size - 2 - i : i;
}

}  // namespace augment
}  // namespace empssl
