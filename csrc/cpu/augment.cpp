// Fused multi-patch augmentation on the CPU: one patch per OpenMP iteration, the patch held
// in planar float32 buffers of the thread (3 x S rows of W = S rounded up to 16 floats), every
// step written on GCC vector types of L float lanes. The per-patch code is compiled three times
// (L = 16 for AVX-512, 8 for AVX2, 4 for baseline x86-64) and picked at run time, so the binary
// stays safe on any x86-64 CPU. Torch-free: ops.cpp passes raw pointers and strides. The
// per-pixel math is csrc/include/augment_math.h, shared with the CUDA kernel.
//
// Every float operation is the one of the scalar formulas, in the same order and without FMA
// contraction, so the three builds give the same bits (and the bits of the earlier scalar code).
#pragma GCC diagnostic ignored "-Wpsabi"  // vector arguments only between inlined functions

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "augment_math.h"
#include "augment_params.h"

#pragma GCC optimize("fp-contract=off")  // a*b+c stays two roundings in the AVX2 / AVX-512 builds

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && (__GNUC__ >= 12)
#define EMPSSL_AUGMENT_MULTIVERSION 1
#endif

namespace empssl {
namespace augment {
namespace {

constexpr int kRowAlign = 16;  // row stride of every plane: a multiple of the widest vector

int round_up(int x, int m) { return (x + m - 1) / m * m; }

// uint8 -> float as the reference: u * float32(1/255)
struct ByteToUnit {
  float value[256];
  ByteToUnit() {
    for (int i = 0; i < 256; ++i) value[i] = static_cast<float>(i) * INV_255;
  }
};
const ByteToUnit kByteToUnit;

// Resampling tables of one crop length (flip-free): first source pixel, tap count and weights
// of each output pixel. They depend on the crop length only, so each is computed once per call.
struct ResampleTable {
  std::vector<int> first, count;
  std::vector<float> weights;  // (S, taps)
};

// Per-thread buffers, sized once for the largest patch of the call.
struct Workspace {
  int size, row_stride, taps, crop_row_stride;
  std::vector<ResampleTable> tables;  // by crop length, filled on first use
  std::vector<int> x_first, x_count;  // this patch's columns (flip applied)
  std::vector<float> x_weights;
  std::vector<float> crop;        // the crop as float, transposed: (3, crop columns, crop_row_stride)
  std::vector<float> columns;     // horizontal pass, transposed: (3, S, crop_row_stride)
  std::vector<float> rows;        // horizontal pass: (3, crop rows, row_stride)
  std::vector<float> plane;       // the patch: (3, S, row_stride)
  std::vector<float> scratch;     // blur: horizontal result (3, S, row_stride) and one padded row
  std::vector<float> gauss;
  std::vector<float> values;      // the finished rows of one y, (3, row_stride), before the store

  Workspace(int S, int taps_, int64_t max_crop_len, int64_t max_crop_rows, int64_t max_crop_cols, int kernel_size)
      : size(S), row_stride(round_up(S, kRowAlign)), taps(taps_),
        crop_row_stride(round_up(static_cast<int>(max_crop_rows), kRowAlign)),
        tables(static_cast<size_t>(max_crop_len) + 1), x_first(S), x_count(S), x_weights(static_cast<size_t>(S) * taps_),
        crop(static_cast<size_t>(3) * max_crop_cols * crop_row_stride),
        columns(static_cast<size_t>(3) * S * crop_row_stride),
        rows(static_cast<size_t>(3) * max_crop_rows * row_stride),
        plane(static_cast<size_t>(3) * S * row_stride),
        scratch(static_cast<size_t>(3) * S * row_stride + row_stride + kernel_size + kRowAlign),
        gauss(kernel_size), values(static_cast<size_t>(3) * row_stride) {}

  const ResampleTable& table(int crop_len) {
    ResampleTable& t = tables[crop_len];
    if (t.first.empty()) {
      t.first.resize(size);
      t.count.resize(size);
      t.weights.assign(static_cast<size_t>(size) * taps, 0.0f);
      for (int i = 0; i < size; ++i) {
        t.first[i] = resample_weights(i, crop_len, size, taps, &t.weights[static_cast<size_t>(i) * taps], &t.count[i]);
      }
    }
    return t;
  }
};

// ---- vectors of L float lanes ------------------------------------------------------------------

template <int L>
struct Lanes {
  typedef float F __attribute__((vector_size(4 * L)));
  typedef int32_t I __attribute__((vector_size(4 * L)));
  typedef double D __attribute__((vector_size(8 * L)));
};

#define EMPSSL_INLINE inline __attribute__((always_inline))

template <typename V>
EMPSSL_INLINE V load(const float* p) {
  V v;
  memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
EMPSSL_INLINE void store(float* p, V v) {
  memcpy(p, &v, sizeof(V));
}

// lane k holds k
template <int L>
EMPSSL_INLINE typename Lanes<L>::I lane_index() {
  typename Lanes<L>::I v;
  for (int k = 0; k < L; ++k) v[k] = k;
  return v;
}

// ---- the steps of one patch --------------------------------------------------------------------

// Resized crop + flip into ws.plane (planar RGB, [0, 1]). Horizontal pass first, as the
// reference: on the transposed crop (vectorised over crop rows), then transposed back for the
// vertical pass (vectorised over x). Each output sums its taps in order from 0, as the reference.
template <int L>
EMPSSL_INLINE void resized_crop(const Images& images, int64_t image_index, const float* row, Workspace& ws) {
  typedef typename Lanes<L>::F F;
  const int S = ws.size, W = ws.row_stride, R = ws.crop_row_stride, taps = ws.taps;
  const CropBox crop = crop_box(row, images.height, images.width);
  const bool flip = row[FLIP] == 1.0f;

  const ResampleTable& xt = ws.table(crop.width);
  for (int x = 0; x < S; ++x) {  // flipped output column x shows resampled column S - 1 - x
    const int from = flip ? S - 1 - x : x;
    ws.x_first[x] = xt.first[from];
    ws.x_count[x] = xt.count[from];
    memcpy(&ws.x_weights[static_cast<size_t>(x) * taps], &xt.weights[static_cast<size_t>(from) * taps], sizeof(float) * taps);
  }
  const ResampleTable& yt = ws.table(crop.height);
  const int row_begin = yt.first[0];
  const int num_rows = yt.first[S - 1] + yt.count[S - 1] - row_begin;
  const int col_begin = xt.first[0];
  const int num_cols = xt.first[S - 1] + xt.count[S - 1] - col_begin;

  // the crop region read by the passes, as float, transposed: crop[c][col][row]
  const uint8_t* image = images.data + image_index * images.stride_n +
                         (crop.top + row_begin) * images.stride_h + (crop.left + col_begin) * images.stride_w;
  float* crop_t = ws.crop.data();
  const size_t crop_channel = static_cast<size_t>(num_cols) * R;
  for (int r = 0; r < num_rows; ++r) {
    const uint8_t* src = image + r * images.stride_h;
    for (int j = 0; j < num_cols; ++j, src += images.stride_w) {
      for (int c = 0; c < 3; ++c) crop_t[c * crop_channel + static_cast<size_t>(j) * R + r] = kByteToUnit.value[src[c * images.stride_c]];
    }
  }
  // horizontal pass: columns[c][x][row] = sum_t w_t crop[c][first_x + t][row]
  const int row_vectors = (num_rows + L - 1) / L;
  for (int c = 0; c < 3; ++c) {
    for (int x = 0; x < S; ++x) {
      const float* w = &ws.x_weights[static_cast<size_t>(x) * taps];
      const float* in = crop_t + c * crop_channel + static_cast<size_t>(ws.x_first[x] - col_begin) * R;
      float* out = &ws.columns[(static_cast<size_t>(c) * S + x) * R];
      for (int v = 0; v < row_vectors; ++v) {
        F acc = splat<F>(0.0f);
        for (int t = 0; t < ws.x_count[x]; ++t) acc += load<F>(in + static_cast<size_t>(t) * R + v * L) * w[t];
        store(out + v * L, acc);
      }
    }
  }
  // back to rows[c][row][x]
  for (int c = 0; c < 3; ++c) {
    for (int r = 0; r < num_rows; ++r) {
      float* out = &ws.rows[(static_cast<size_t>(c) * num_rows + r) * W];
      const float* in = &ws.columns[static_cast<size_t>(c) * S * R + r];
      for (int x = 0; x < S; ++x) out[x] = in[static_cast<size_t>(x) * R];
    }
  }
  // vertical pass: whole rows at once
  for (int c = 0; c < 3; ++c) {
    const float* rows = &ws.rows[static_cast<size_t>(c) * num_rows * W];
    for (int y = 0; y < S; ++y) {
      const float* w = &yt.weights[static_cast<size_t>(y) * taps];
      const float* in = rows + static_cast<size_t>(yt.first[y] - row_begin) * W;
      float* out = &ws.plane[(static_cast<size_t>(c) * S + y) * W];
      for (int x = 0; x < W; x += L) {
        F acc = splat<F>(0.0f);
        for (int t = 0; t < yt.count[y]; ++t) acc += load<F>(in + static_cast<size_t>(t) * W + x) * w[t];
        store(out + x, acc);
      }
    }
  }
}

// Mean gray of the patch: float gray values accumulated in float64, as before vectorising.
template <int L>
EMPSSL_INLINE float mean_gray(const float* r, const float* g, const float* b, int S, int W) {
  typedef typename Lanes<L>::F F;
  typedef typename Lanes<L>::I I;
  typedef typename Lanes<L>::D D;
  D total = {};
  const I lane = lane_index<L>();
  for (int y = 0; y < S; ++y) {
    const size_t o = static_cast<size_t>(y) * W;
    for (int x = 0; x < W; x += L) {
      F l = gray(load<F>(r + o + x), load<F>(g + o + x), load<F>(b + o + x));
      if (x + L > S) l = lane < S - x ? l : splat<F>(0.0f);  // padding columns
      total += __builtin_convertvector(l, D);
    }
  }
  double sum = 0.0;
  for (int k = 0; k < L; ++k) sum += total[k];
  return static_cast<float>(sum / (static_cast<double>(S) * S));
}

template <int L>
EMPSSL_INLINE void color_jitter(const float* row, const Config& config, Workspace& ws) {
  typedef typename Lanes<L>::F F;
  const int S = ws.size, W = ws.row_stride, n = S * W;
  float* r = ws.plane.data();
  float* g = r + n;
  float* b = g + n;
  for (int position = 0; position < NUM_JITTER_OPS; ++position) {
    const int op = static_cast<int>(row[ORDER_0 + position]);
    if (op < 0 || op >= NUM_JITTER_OPS || !((config.jitter_op_mask >> op) & 1)) continue;
    if (op == OP_BRIGHTNESS) {
      const float f = row[BRIGHTNESS];
      for (int i = 0; i < 3 * n; i += L) store(r + i, brightness(load<F>(r + i), f));
    } else if (op == OP_CONTRAST) {
      const float f = row[CONTRAST];
      const F mean = splat<F>(mean_gray<L>(r, g, b, S, W));
      for (int i = 0; i < 3 * n; i += L) store(r + i, blend(load<F>(r + i), mean, f));
    } else if (op == OP_SATURATION) {
      const float f = row[SATURATION];
      for (int i = 0; i < n; i += L) {
        const F vr = load<F>(r + i), vg = load<F>(g + i), vb = load<F>(b + i);
        const F l = gray(vr, vg, vb);
        store(r + i, blend(vr, l, f));
        store(g + i, blend(vg, l, f));
        store(b + i, blend(vb, l, f));
      }
    } else {
      const float shift = row[HUE];
      for (int i = 0; i < n; i += L) {
        F vr = load<F>(r + i), vg = load<F>(g + i), vb = load<F>(b + i);
        hue_shift(vr, vg, vb, shift);
        store(r + i, vr);
        store(g + i, vg);
        store(b + i, vb);
      }
    }
  }
}

template <int L>
EMPSSL_INLINE void to_grayscale(Workspace& ws) {
  typedef typename Lanes<L>::F F;
  const int n = ws.size * ws.row_stride;
  float* r = ws.plane.data();
  float* g = r + n;
  float* b = g + n;
  for (int i = 0; i < n; i += L) {
    const F l = gray(load<F>(r + i), load<F>(g + i), load<F>(b + i));
    store(r + i, l);
    store(g + i, l);
    store(b + i, l);
  }
}

// Separable Gaussian blur, reflect padding; each output sums its taps in order from 0.
template <int L>
EMPSSL_INLINE void gaussian_blur(float sigma, int kernel_size, Workspace& ws) {
  typedef typename Lanes<L>::F F;
  const int S = ws.size, W = ws.row_stride, radius = kernel_size / 2, n = S * W;
  float* w = ws.gauss.data();
  gaussian_weights(sigma, kernel_size, w);
  float* horizontal = ws.scratch.data();
  float* padded = horizontal + static_cast<size_t>(3) * n;
  for (int c = 0; c < 3; ++c) {
    for (int y = 0; y < S; ++y) {
      const float* in = &ws.plane[static_cast<size_t>(c) * n + static_cast<size_t>(y) * W];
      for (int i = 0; i < S + 2 * radius; ++i) padded[i] = in[reflect_index(i - radius, S)];
      float* out = horizontal + static_cast<size_t>(c) * n + static_cast<size_t>(y) * W;
      for (int x = 0; x < W; x += L) {
        F acc = splat<F>(0.0f);
        for (int k = 0; k < kernel_size; ++k) acc += load<F>(padded + k + x) * w[k];
        store(out + x, acc);
      }
    }
    for (int y = 0; y < S; ++y) {
      float* out = &ws.plane[static_cast<size_t>(c) * n + static_cast<size_t>(y) * W];
      const float* in = horizontal + static_cast<size_t>(c) * n;
      for (int x = 0; x < W; x += L) {
        F acc = splat<F>(0.0f);
        for (int k = 0; k < kernel_size; ++k) {
          acc += load<F>(in + static_cast<size_t>(reflect_index(y + k - radius, S)) * W + x) * w[k];
        }
        store(out + x, acc);
      }
    }
  }
}

template <typename T>
EMPSSL_INLINE T convert_out(float v, OutDtype dtype) {
  if constexpr (std::is_same<T, float>::value) {
    return v;
  } else {  // bf16 or fp16 bits, chosen at run time
    return dtype == OutDtype::BFloat16 ? float_to_bf16_bits(v) : float_to_half_bits(v);
  }
}

// Solarize, normalise, convert, store (NCHW or channels_last through the output strides).
template <int L, typename T>
EMPSSL_INLINE void store_patch(const float* row, const Config& config, const Output& output, int64_t p, Workspace& ws) {
  typedef typename Lanes<L>::F F;
  const int S = ws.size, W = ws.row_stride, n = S * W;
  const bool solarized = row[SOLARIZE] == 1.0f;
  const float threshold = config.solarize_threshold;
  T* out = static_cast<T*>(output.data) + p * output.stride_p;
  float* values = ws.values.data();
  const bool dense_rows = std::is_same<T, float>::value && output.stride_x == 1;
  for (int y = 0; y < S; ++y) {
    for (int c = 0; c < 3; ++c) {
      const float* in = &ws.plane[static_cast<size_t>(c) * n + static_cast<size_t>(y) * W];
      const float mean = config.mean[c], std = config.std[c];
      float* value = values + static_cast<size_t>(c) * W;
      for (int x = 0; x < W; x += L) {
        F v = load<F>(in + x);
        if (solarized) v = solarize(v, threshold);
        store(value + x, normalize(v, mean, std));
      }
      if (dense_rows) memcpy(out + c * output.stride_c + y * output.stride_y, value, sizeof(float) * S);
    }
    if (dense_rows) continue;
    T* dst = out + y * output.stride_y;
    for (int x = 0; x < S; ++x) {
      for (int c = 0; c < 3; ++c) dst[x * output.stride_x + c * output.stride_c] = convert_out<T>(values[c * W + x], output.dtype);
    }
  }
}

template <int L, typename T>
EMPSSL_INLINE void augment_patch(const Images& images, int64_t image_index, const float* row, const Config& config,
                                 const Output& output, int64_t p, Workspace& ws) {
  resized_crop<L>(images, image_index, row, ws);
  if (row[JITTER] == 1.0f) color_jitter<L>(row, config, ws);
  if (row[GRAYSCALE] == 1.0f) to_grayscale<L>(ws);
  if (row[BLUR_SIGMA] > 0.0f) gaussian_blur<L>(row[BLUR_SIGMA], config.blur_kernel_size, ws);
  store_patch<L, T>(row, config, output, p, ws);
}

// ---- one build per instruction set ---------------------------------------------------------------

template <typename T>
using PatchFn = void (*)(const Images&, int64_t, const float*, const Config&, const Output&, int64_t, Workspace&);

template <typename T>
__attribute__((flatten)) void augment_patch_baseline(const Images& images, int64_t image_index, const float* row,
                                                     const Config& config, const Output& output, int64_t p, Workspace& ws) {
  augment_patch<4, T>(images, image_index, row, config, output, p, ws);
}

#if defined(EMPSSL_AUGMENT_MULTIVERSION)
template <typename T>
__attribute__((target("arch=x86-64-v3"), flatten)) void augment_patch_avx2(const Images& images, int64_t image_index,
                                                                          const float* row, const Config& config,
                                                                          const Output& output, int64_t p, Workspace& ws) {
  augment_patch<8, T>(images, image_index, row, config, output, p, ws);
}

template <typename T>
__attribute__((target("arch=x86-64-v4"), flatten)) void augment_patch_avx512(const Images& images, int64_t image_index,
                                                                            const float* row, const Config& config,
                                                                            const Output& output, int64_t p, Workspace& ws) {
  augment_patch<16, T>(images, image_index, row, config, output, p, ws);
}
#endif

// EMPSSL_AUGMENT_ISA=baseline|avx2 caps the build used (tests compare the builds).
template <typename T>
PatchFn<T> select_patch_fn() {
#if defined(EMPSSL_AUGMENT_MULTIVERSION)
  const char* cap = std::getenv("EMPSSL_AUGMENT_ISA");
  const bool allow_avx512 = cap == nullptr || (strcmp(cap, "baseline") != 0 && strcmp(cap, "avx2") != 0);
  const bool allow_avx2 = cap == nullptr || strcmp(cap, "baseline") != 0;
  __builtin_cpu_init();
  if (allow_avx512 && __builtin_cpu_supports("x86-64-v4")) return augment_patch_avx512<T>;
  if (allow_avx2 && __builtin_cpu_supports("x86-64-v3")) return augment_patch_avx2<T>;
#endif
  return augment_patch_baseline<T>;
}

template <typename T>
void augment_all(const Images& images, const int64_t* source_index, const float* params, int64_t num_patches,
                 const Config& config, const Output& output) {
  const int S = config.output_size;
  const int64_t max_crop_len = std::max(images.height, images.width);
  const int taps = max_resample_taps(std::max(max_crop_len, static_cast<int64_t>(S)), S);
  const PatchFn<T> patch_fn = select_patch_fn<T>();
#pragma omp parallel
  {
    Workspace ws(S, taps, max_crop_len, images.height, images.width, config.blur_kernel_size);
#pragma omp for schedule(dynamic, 8)
    for (int64_t p = 0; p < num_patches; ++p) {
      patch_fn(images, source_index[p], params + p * NUM_PARAMS, config, output, p, ws);
    }
  }
}

}  // namespace

// Entry point called by ops.cpp (declared there).
void augment_cpu(const Images& images, const int64_t* source_index, const float* params, int64_t num_patches,
                 const Config& config, const Output& output) {
  if (output.dtype == OutDtype::Float32) {
    augment_all<float>(images, source_index, params, num_patches, config, output);
  } else {
    augment_all<uint16_t>(images, source_index, params, num_patches, config, output);
  }
}

}  // namespace augment
}  // namespace empssl
