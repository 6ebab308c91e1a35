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
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "augment_math.h"
#include "augment_params.h"
#include "launchers.h"

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

// The horizontal pass as a banded matrix: output columns in blocks of kRowAlign, each block
// reading one contiguous band of source columns; weights[block][band column][lane], 0 where a
// source column is not one of that output column's taps (adding 0 * x leaves a sum unchanged,
// so every output still sums exactly its taps, in order).
struct ColumnBands {
  int crop_len = -1;
  bool flip = false;
  std::vector<int> first, length, offset;  // per block: first source column, band length, weights offset
  std::vector<float> weights;
};

// Per-thread buffers, sized once for the largest patch of the call.
struct Workspace {
  int size, row_stride, taps;
  std::vector<ResampleTable> tables;  // by crop length, filled on first use
  ColumnBands bands;                  // of the last patch's crop width and flip
  std::vector<float> rows;            // horizontal pass: (3, crop rows, row_stride)
  std::vector<float> plane;           // the patch: (3, S, row_stride)
  std::vector<float> scratch;         // blur: horizontal result (3, S, row_stride) and one padded row
  std::vector<float> gauss;
  std::vector<const float*> blur_rows;
  std::vector<float> values;          // the finished rows of one y, (3, row_stride), before the store
  bool by_inverse_std = false;        // every std a power of two: normalise by multiplying with inv_std
  float inv_std[3];

  Workspace(int S, int taps_, int64_t max_crop_len, int64_t max_crop_rows, int kernel_size)
      : size(S), row_stride(round_up(S, kRowAlign)), taps(taps_), tables(static_cast<size_t>(max_crop_len) + 1),
        rows(static_cast<size_t>(3) * max_crop_rows * row_stride),
        plane(static_cast<size_t>(3) * S * row_stride),
        scratch(static_cast<size_t>(3) * S * row_stride + row_stride + kernel_size + kRowAlign),
        gauss(kernel_size), blur_rows(kernel_size), values(static_cast<size_t>(3) * row_stride) {}

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

  // flipped output column x shows resampled column S - 1 - x
  const ColumnBands& column_bands(int crop_len, bool flip) {
    ColumnBands& b = bands;
    if (b.crop_len == crop_len && b.flip == flip) return b;
    const ResampleTable& t = table(crop_len);
    const int blocks = row_stride / kRowAlign;
    b.crop_len = crop_len;
    b.flip = flip;
    b.first.assign(blocks, 0);
    b.length.assign(blocks, 0);
    b.offset.assign(blocks, 0);
    int total = 0;
    for (int k = 0; k < blocks; ++k) {
      int lo = 1 << 30, hi = -1;
      for (int x = k * kRowAlign; x < std::min(size, (k + 1) * kRowAlign); ++x) {
        const int from = flip ? size - 1 - x : x;
        lo = std::min(lo, t.first[from]);
        hi = std::max(hi, t.first[from] + t.count[from] - 1);
      }
      b.first[k] = lo;
      b.length[k] = hi - lo + 1;
      b.offset[k] = total;
      total += b.length[k] * kRowAlign;
    }
    b.weights.assign(total, 0.0f);
    for (int x = 0; x < size; ++x) {
      const int from = flip ? size - 1 - x : x, k = x / kRowAlign;
      for (int tap = 0; tap < t.count[from]; ++tap) {
        const int j = t.first[from] + tap - b.first[k];
        b.weights[b.offset[k] + j * kRowAlign + x % kRowAlign] = t.weights[static_cast<size_t>(from) * taps + tap];
      }
    }
    return b;
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
// reference, as banded matrix products straight from the uint8 image (vectorised over x), then
// the vertical pass on whole rows. Each output sums its taps in order from 0, as the reference.
template <int L>
EMPSSL_INLINE void resized_crop(const Images& images, int64_t image_index, const float* row, Workspace& ws) {
  typedef typename Lanes<L>::F F;
  constexpr int kVectors = kRowAlign / L;  // vectors per block of output columns
  const int S = ws.size, W = ws.row_stride, taps = ws.taps;
  const CropBox crop = crop_box(row, images.height, images.width);
  const ColumnBands& bands = ws.column_bands(crop.width, row[FLIP] == 1.0f);
  const ResampleTable& yt = ws.table(crop.height);
  const int row_begin = yt.first[0];
  const int num_rows = yt.first[S - 1] + yt.count[S - 1] - row_begin;

  // horizontal pass: rows[c][r][x] = sum over the band of w[x][j] * pixel[r][j][c]
  const uint8_t* image = images.data + image_index * images.stride_n + (crop.top + row_begin) * images.stride_h +
                         crop.left * images.stride_w;
  const int64_t sw = images.stride_w, sc = images.stride_c;
  const size_t channel = static_cast<size_t>(num_rows) * W;
  for (int r = 0; r < num_rows; ++r) {
    const uint8_t* src_row = image + r * images.stride_h;
    for (int k = 0; k < W / kRowAlign; ++k) {
      F acc[3][kVectors];
      for (int c = 0; c < 3; ++c)
        for (int v = 0; v < kVectors; ++v) acc[c][v] = splat<F>(0.0f);
      const float* w = &bands.weights[bands.offset[k]];
      const uint8_t* px = src_row + bands.first[k] * sw;
      for (int j = 0; j < bands.length[k]; ++j, px += sw, w += kRowAlign) {
        F wv[kVectors];
        for (int v = 0; v < kVectors; ++v) wv[v] = load<F>(w + v * L);
        for (int c = 0; c < 3; ++c) {
          const F value = splat<F>(kByteToUnit.value[px[c * sc]]);
          for (int v = 0; v < kVectors; ++v) acc[c][v] += value * wv[v];
        }
      }
      for (int c = 0; c < 3; ++c)
        for (int v = 0; v < kVectors; ++v) store(&ws.rows[c * channel + static_cast<size_t>(r) * W + k * kRowAlign + v * L], acc[c][v]);
    }
  }
  // vertical pass: whole rows at once
  for (int c = 0; c < 3; ++c) {
    const float* rows = &ws.rows[c * channel];
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
      memcpy(padded + radius, in, sizeof(float) * S);
      for (int i = 0; i < radius; ++i) {
        padded[i] = in[reflect_index(i - radius, S)];
        padded[S + radius + i] = in[reflect_index(S + i, S)];
      }
      float* out = horizontal + static_cast<size_t>(c) * n + static_cast<size_t>(y) * W;
      for (int x = 0; x < W; x += L) {
        F acc = splat<F>(0.0f);
        for (int k = 0; k < kernel_size; ++k) acc += load<F>(padded + k + x) * w[k];
        store(out + x, acc);
      }
    }
    const float* in = horizontal + static_cast<size_t>(c) * n;
    const float** taps = ws.blur_rows.data();
    for (int y = 0; y < S; ++y) {
      for (int k = 0; k < kernel_size; ++k) taps[k] = in + static_cast<size_t>(reflect_index(y + k - radius, S)) * W;
      float* out = &ws.plane[static_cast<size_t>(c) * n + static_cast<size_t>(y) * W];
      for (int x = 0; x < W; x += L) {
        F acc = splat<F>(0.0f);
        for (int k = 0; k < kernel_size; ++k) acc += load<F>(taps[k] + x) * w[k];
        store(out + x, acc);
      }
    }
  }
}

template <typename T>
EMPSSL_INLINE T convert_out(float v, DType dtype) {
  if constexpr (std::is_same<T, float>::value) {
    return v;
  } else {  // bf16 or fp16 bits, chosen at run time
    return dtype == DType::BFloat16 ? float_to_bf16_bits(v) : float_to_half_bits(v);
  }
}

// Every std a power of two: (x - mean) * (1 / std) is bit-identical to (x - mean) / std, and cheaper.
inline bool all_powers_of_two(const float (&values)[3]) {
  for (float v : values) {
    int exponent;
    if (!(v > 0.0f) || std::frexp(v, &exponent) != 0.5f || !std::isnormal(1.0f / v)) return false;
  }
  return true;
}

template <bool kByInverse, typename F>
EMPSSL_INLINE F normalize_channel(F v, float mean, float std, float inv_std) {
  if constexpr (kByInverse) {
    return (v - mean) * splat<F>(inv_std);
  } else {
    return normalize(v, mean, std);
  }
}

// Solarize, normalise, convert, store (NCHW or channels_last through the output strides).
template <int L, typename T, bool kByInverse>
EMPSSL_INLINE void store_patch(const float* row, const Config& config, const Output& output, int64_t p, Workspace& ws) {
  typedef typename Lanes<L>::F F;
  const int S = ws.size, W = ws.row_stride, n = S * W;
  const bool solarized = row[SOLARIZE] == 1.0f;
  const float threshold = config.solarize_threshold;
  T* out = static_cast<T*>(output.data) + p * output.stride_p;
  float* values = ws.values.data();
  if constexpr (std::is_same<T, float>::value) {
    if (output.stride_x == 1) {  // NCHW float32: straight from the vectors
      for (int c = 0; c < 3; ++c) {
        const float mean = config.mean[c], std = config.std[c], inv_std = ws.inv_std[c];
        for (int y = 0; y < S; ++y) {
          const float* in = &ws.plane[static_cast<size_t>(c) * n + static_cast<size_t>(y) * W];
          float* dst = out + c * output.stride_c + y * output.stride_y;
          for (int x = 0; x < W; x += L) {
            F v = load<F>(in + x);
            if (solarized) v = solarize(v, threshold);
            v = normalize_channel<kByInverse>(v, mean, std, inv_std);
            if (x + L <= S) {
              store(dst + x, v);
            } else {
              for (int k = 0; k < S - x; ++k) dst[x + k] = v[k];
            }
          }
        }
      }
      return;
    }
  }
  for (int y = 0; y < S; ++y) {
    for (int c = 0; c < 3; ++c) {
      const float* in = &ws.plane[static_cast<size_t>(c) * n + static_cast<size_t>(y) * W];
      const float mean = config.mean[c], std = config.std[c], inv_std = ws.inv_std[c];
      float* value = values + static_cast<size_t>(c) * W;
      for (int x = 0; x < W; x += L) {
        F v = load<F>(in + x);
        if (solarized) v = solarize(v, threshold);
        store(value + x, normalize_channel<kByInverse>(v, mean, std, inv_std));
      }
    }
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
  if (ws.by_inverse_std) {
    store_patch<L, T, true>(row, config, output, p, ws);
  } else {
    store_patch<L, T, false>(row, config, output, p, ws);
  }
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
  const bool by_inverse_std = all_powers_of_two(config.std);  // decided once per call
#pragma omp parallel
  {
    Workspace ws(S, taps, max_crop_len, images.height, config.blur_kernel_size);
    ws.by_inverse_std = by_inverse_std;
    for (int c = 0; c < 3; ++c) ws.inv_std[c] = 1.0f / config.std[c];
#pragma omp for schedule(dynamic, 8)
    for (int64_t p = 0; p < num_patches; ++p) {
      patch_fn(images, source_index[p], params + p * NUM_PARAMS, config, output, p, ws);
    }
  }
}

}  // namespace

// Entry point called by ops.cpp (declared in launchers.h).
void augment_cpu(const Images& images, const int64_t* source_index, const float* params, int64_t num_patches,
                 const Config& config, const Output& output) {
  if (output.dtype == DType::Float32) {
    augment_all<float>(images, source_index, params, num_patches, config, output);
  } else {
    augment_all<uint16_t>(images, source_index, params, num_patches, config, output);
  }
}

}  // namespace augment
}  // namespace empssl
