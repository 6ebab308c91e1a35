// Fused multi-patch augmentation on the CPU: one patch per OpenMP iteration, the patch held
// in planar float32 buffers of the thread (3 x S x S), every step a loop over a plane that the
// compiler vectorises. Torch-free: ops.cpp passes raw pointers and strides. The per-pixel math
// is csrc/include/augment_math.h, shared with the CUDA kernel.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "augment_math.h"
#include "augment_params.h"

namespace empssl {
namespace augment {
namespace {

// uint8 -> float as the reference: u * float32(1/255)
struct ByteToUnit {
  float value[256];
  ByteToUnit() {
    for (int i = 0; i < 256; ++i) value[i] = static_cast<float>(i) * INV_255;
  }
};
const ByteToUnit kByteToUnit;

// Per-thread buffers, sized once for the largest patch of the call.
struct Workspace {
  int size, taps;
  std::vector<float> x_weights, y_weights;  // (S, taps): resampling weights per output column / row
  std::vector<int> x_first, x_count, y_first, y_count;
  std::vector<float> rows;   // horizontal pass: (3, crop rows, S)
  std::vector<float> plane;  // the patch: (3, S, S)
  std::vector<float> scratch;  // blur: horizontal result (3, S, S) and one padded row
  std::vector<float> gauss;

  Workspace(int S, int taps_, int64_t max_crop_rows, int kernel_size)
      : size(S), taps(taps_), x_weights(static_cast<size_t>(S) * taps_), y_weights(static_cast<size_t>(S) * taps_),
        x_first(S), x_count(S), y_first(S), y_count(S), rows(static_cast<size_t>(3) * max_crop_rows * S),
        plane(static_cast<size_t>(3) * S * S), scratch(static_cast<size_t>(3) * S * S + S + kernel_size),
        gauss(kernel_size) {}
};

template <typename T>
struct Store;
template <>
struct Store<float> {
  static float convert(float v) { return v; }
};
template <>
struct Store<uint16_t> {  // bf16 or fp16 bits, chosen at run time
  static uint16_t convert(float v, OutDtype dtype) {
    return dtype == OutDtype::BFloat16 ? float_to_bf16_bits(v) : float_to_half_bits(v);
  }
};

// Resized crop + flip into ws.plane (planar RGB, [0, 1]).
void resized_crop(const Images& images, int64_t image_index, const float* row, Workspace& ws) {
  const int S = ws.size;
  const CropBox crop = crop_box(row, images.height, images.width);
  const int top = crop.top, left = crop.left, crop_h = crop.height, crop_w = crop.width;
  const bool flip = row[FLIP] == 1.0f;

  for (int x = 0; x < S; ++x) {
    // flipped output column x shows resampled column S - 1 - x
    ws.x_first[x] = resample_weights(flip ? S - 1 - x : x, crop_w, S, ws.taps, &ws.x_weights[x * ws.taps], &ws.x_count[x]);
  }
  for (int y = 0; y < S; ++y) {
    ws.y_first[y] = resample_weights(y, crop_h, S, ws.taps, &ws.y_weights[y * ws.taps], &ws.y_count[y]);
  }
  const int row_begin = ws.y_first[0];
  const int row_end = ws.y_first[S - 1] + ws.y_count[S - 1];
  const int num_rows = row_end - row_begin;

  // horizontal pass over the crop rows that the vertical pass reads
  const uint8_t* image = images.data + image_index * images.stride_n;
  float* rows = ws.rows.data();
  const size_t channel_rows = static_cast<size_t>(num_rows) * S;
  for (int r = 0; r < num_rows; ++r) {
    const uint8_t* src = image + (top + row_begin + r) * images.stride_h + left * images.stride_w;
    for (int x = 0; x < S; ++x) {
      const float* w = &ws.x_weights[x * ws.taps];
      const uint8_t* px = src + ws.x_first[x] * images.stride_w;
      float acc[3] = {0.0f, 0.0f, 0.0f};
      for (int t = 0; t < ws.x_count[x]; ++t, px += images.stride_w) {
        for (int c = 0; c < 3; ++c) acc[c] += kByteToUnit.value[px[c * images.stride_c]] * w[t];
      }
      for (int c = 0; c < 3; ++c) rows[c * channel_rows + static_cast<size_t>(r) * S + x] = acc[c];
    }
  }
  // vertical pass: whole rows at once (vectorised over x)
  for (int c = 0; c < 3; ++c) {
    for (int y = 0; y < S; ++y) {
      float* __restrict__ out = &ws.plane[(static_cast<size_t>(c) * S + y) * S];
      const float* w = &ws.y_weights[y * ws.taps];
      const float* in = rows + c * channel_rows + static_cast<size_t>(ws.y_first[y] - row_begin) * S;
      for (int x = 0; x < S; ++x) out[x] = 0.0f;
      for (int t = 0; t < ws.y_count[y]; ++t) {
        const float wt = w[t];
        const float* __restrict__ src = in + static_cast<size_t>(t) * S;
        for (int x = 0; x < S; ++x) out[x] += src[x] * wt;
      }
    }
  }
}

double gray_sum(const float* __restrict__ r, const float* __restrict__ g, const float* __restrict__ b, int n) {
  double total = 0.0;
  for (int i = 0; i < n; ++i) total += gray(r[i], g[i], b[i]);
  return total;
}

void color_jitter(const float* row, const Config& config, Workspace& ws) {
  const int n = ws.size * ws.size;
  float* __restrict__ r = ws.plane.data();
  float* __restrict__ g = r + n;
  float* __restrict__ b = g + n;
  for (int position = 0; position < NUM_JITTER_OPS; ++position) {
    const int op = static_cast<int>(row[ORDER_0 + position]);
    if (op < 0 || op >= NUM_JITTER_OPS || !((config.jitter_op_mask >> op) & 1)) continue;
    if (op == OP_BRIGHTNESS) {
      const float f = row[BRIGHTNESS];
      for (int i = 0; i < n; ++i) r[i] = brightness(r[i], f);
      for (int i = 0; i < n; ++i) g[i] = brightness(g[i], f);
      for (int i = 0; i < n; ++i) b[i] = brightness(b[i], f);
    } else if (op == OP_CONTRAST) {
      const float f = row[CONTRAST];
      const float mean = static_cast<float>(gray_sum(r, g, b, n) / n);
      for (int i = 0; i < n; ++i) r[i] = blend(r[i], mean, f);
      for (int i = 0; i < n; ++i) g[i] = blend(g[i], mean, f);
      for (int i = 0; i < n; ++i) b[i] = blend(b[i], mean, f);
    } else if (op == OP_SATURATION) {
      const float f = row[SATURATION];
      for (int i = 0; i < n; ++i) {
        const float l = gray(r[i], g[i], b[i]);
        r[i] = blend(r[i], l, f);
        g[i] = blend(g[i], l, f);
        b[i] = blend(b[i], l, f);
      }
    } else {
      const float shift = row[HUE];
      int i = 0;
      for (; i + 4 <= n; i += 4) {  // four lanes at a time (see Float4 in augment_math.h)
        Float4 vr, vg, vb;
        memcpy(&vr, r + i, sizeof(vr));
        memcpy(&vg, g + i, sizeof(vg));
        memcpy(&vb, b + i, sizeof(vb));
        hue_shift(vr, vg, vb, shift);
        memcpy(r + i, &vr, sizeof(vr));
        memcpy(g + i, &vg, sizeof(vg));
        memcpy(b + i, &vb, sizeof(vb));
      }
      for (; i < n; ++i) hue_shift(r[i], g[i], b[i], shift);
    }
  }
}

void gaussian_blur(float sigma, int kernel_size, Workspace& ws) {
  const int S = ws.size, radius = kernel_size / 2, n = S * S;
  float* w = ws.gauss.data();
  gaussian_weights(sigma, kernel_size, w);
  float* horizontal = ws.scratch.data();
  float* padded = horizontal + static_cast<size_t>(3) * n;
  for (int c = 0; c < 3; ++c) {
    for (int y = 0; y < S; ++y) {
      const float* in = &ws.plane[static_cast<size_t>(c) * n + static_cast<size_t>(y) * S];
      for (int i = 0; i < S + 2 * radius; ++i) padded[i] = in[reflect_index(i - radius, S)];
      float* __restrict__ out = horizontal + static_cast<size_t>(c) * n + static_cast<size_t>(y) * S;
      for (int x = 0; x < S; ++x) out[x] = 0.0f;
      for (int k = 0; k < kernel_size; ++k) {
        const float wk = w[k];
        const float* __restrict__ src = padded + k;
        for (int x = 0; x < S; ++x) out[x] += wk * src[x];
      }
    }
    for (int y = 0; y < S; ++y) {
      float* __restrict__ out = &ws.plane[static_cast<size_t>(c) * n + static_cast<size_t>(y) * S];
      for (int x = 0; x < S; ++x) out[x] = 0.0f;
      for (int k = 0; k < kernel_size; ++k) {
        const float wk = w[k];
        const float* __restrict__ src = horizontal + static_cast<size_t>(c) * n + static_cast<size_t>(reflect_index(y + k - radius, S)) * S;
        for (int x = 0; x < S; ++x) out[x] += wk * src[x];
      }
    }
  }
}

template <typename T>
void store_patch(const float* row, const Config& config, const Output& output, int64_t p, Workspace& ws) {
  const int S = ws.size, n = S * S;
  const bool solarized = row[SOLARIZE] == 1.0f;
  T* out = static_cast<T*>(output.data) + p * output.stride_p;
  float* value = ws.scratch.data();  // the finished channel row, then converted and stored
  for (int c = 0; c < 3; ++c) {
    const float mean = config.mean[c], std = config.std[c];
    for (int y = 0; y < S; ++y) {
      const float* __restrict__ in = &ws.plane[static_cast<size_t>(c) * n + static_cast<size_t>(y) * S];
      if (solarized) {
        for (int x = 0; x < S; ++x) value[x] = normalize(solarize(in[x], config.solarize_threshold), mean, std);
      } else {
        for (int x = 0; x < S; ++x) value[x] = normalize(in[x], mean, std);
      }
      T* dst = out + c * output.stride_c + y * output.stride_y;
      if constexpr (std::is_same<T, float>::value) {
        if (output.stride_x == 1) {
          for (int x = 0; x < S; ++x) dst[x] = value[x];
        } else {
          for (int x = 0; x < S; ++x) dst[x * output.stride_x] = value[x];
        }
      } else {
        for (int x = 0; x < S; ++x) dst[x * output.stride_x] = Store<T>::convert(value[x], output.dtype);
      }
    }
  }
}

template <typename T>
void augment_all(const Images& images, const int64_t* source_index, const float* params, int64_t num_patches,
                 const Config& config, const Output& output) {
  const int S = config.output_size;
  const int taps = max_resample_taps(std::max({images.height, images.width, static_cast<int64_t>(S)}), S);
  // rows of the crop read by the vertical pass: the crop height plus one window of slack
  const int64_t max_crop_rows = images.height + taps;
#pragma omp parallel
  {
    Workspace ws(S, taps, max_crop_rows, config.blur_kernel_size);
#pragma omp for schedule(dynamic, 8)
    for (int64_t p = 0; p < num_patches; ++p) {
      const float* row = params + p * NUM_PARAMS;
      resized_crop(images, source_index[p], row, ws);
      if (row[JITTER] == 1.0f) color_jitter(row, config, ws);
      if (row[GRAYSCALE] == 1.0f) {
        const int n = S * S;
        float* __restrict__ r = ws.plane.data();
        float* __restrict__ g = r + n;
        float* __restrict__ b = g + n;
        for (int i = 0; i < n; ++i) {
          const float l = gray(r[i], g[i], b[i]);
          r[i] = l;
          g[i] = l;
          b[i] = l;
        }
      }
      if (row[BLUR_SIGMA] > 0.0f) gaussian_blur(row[BLUR_SIGMA], config.blur_kernel_size, ws);
      store_patch<T>(row, config, output, p, ws);
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
