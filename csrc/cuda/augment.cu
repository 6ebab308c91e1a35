// Fused multi-patch augmentation on CUDA. Torch-free: the launcher takes raw pointers, strides
// and a stream (ops.cpp converts tensors). Per-pixel math: csrc/include/augment_math.h.
//
// One thread block per (patch, 32x32 output tile): a 32x32 patch is one tile, held in shared
// memory (3 x 32 x 32 floats = 12 KiB) through the whole chain. The two non-local steps:
//  - contrast needs the mean gray of the whole patch after the earlier jitter ops. A one-tile
//    patch reduces it inside the block; for larger patches a first launch of the same kernel
//    (kPartial) writes each tile's gray sum to scratch and the second launch adds them in a
//    fixed order (deterministic, no atomics), recomputing the tile's earlier steps.
//  - blur needs a halo of blur_kernel_size / 2 pixels: a blurred patch's tile is computed
//    with its halo (clipped to the patch; reflect padding reads inside the clipped region).
// Limits (checked by the launcher; empssl/ops/augment.py states them before launch): the
// shared memory of a tile with its halo and resampling tables must fit the device's opt-in
// limit: blur_kernel_size <= 31 and image side <= 16 x output_size always fit (about 70 KiB).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "augment_math.h"
#include "augment_params.h"
#include "launchers.h"

namespace empssl {
namespace augment {
namespace {

constexpr int kTile = 32;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Shared memory layout of one block, in 4-byte words, computed identically by launcher and kernel.
struct SmemLayout {
  int region;  // largest region side: tile + 2 halo, clipped to the patch
  int taps;
  int state, tables, blur_rows, gauss, reduce, total;  // word offsets / total words

  __host__ __device__ SmemLayout(int output_size, int kernel_size, int taps_) : taps(taps_) {
    const int tile = output_size < kTile ? output_size : kTile;
    region = tile + 2 * (kernel_size / 2);
    region = region < output_size ? region : output_size;
    state = 0;
    tables = state + 3 * region * region;
    // resampling tables (weights, first, count for rows and columns) live until the patch is
    // resampled; the horizontal blur result reuses their space afterwards
    const int table_words = 2 * region * (taps + 2);
    const int blur_words = 3 * region * tile;
    blur_rows = tables;
    gauss = tables + (table_words > blur_words ? table_words : blur_words);
    reduce = gauss + kernel_size;
    total = reduce + kWarps + 1;
  }
};

__device__ __forceinline__ void store_value(float* out, float v) { *out = v; }
__device__ __forceinline__ void store_value(__nv_bfloat16* out, float v) { *out = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_value(__half* out, float v) { *out = __float2half_rn(v); }

// Sum over the block in a fixed order; every thread gets the result.
__device__ __forceinline__ float block_sum(float value, float* reduce) {
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) reduce[warp] = value;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kWarps; ++w) total += reduce[w];
    reduce[kWarps] = total;
  }
  __syncthreads();
  const float total = reduce[kWarps];
  __syncthreads();  // reduce[] may be reused by the next call
  return total;
}

template <typename OutT, bool kPartial>
__global__ void __launch_bounds__(kThreads, 4) augment_kernel(Images images, const int64_t* __restrict__ source_index,
                                                          const float* __restrict__ params, Config config, Output output,
                                                          float* __restrict__ scratch, int taps) {
  extern __shared__ float smem[];
  const int S = config.output_size;
  const SmemLayout layout(S, config.blur_kernel_size, taps);
  const int64_t p = blockIdx.x;
  const int tiles_per_side = (S + kTile - 1) / kTile;
  const int num_tiles = tiles_per_side * tiles_per_side;
  const int tile = blockIdx.y;
  const float* row = params + p * NUM_PARAMS;

  const bool jitter = row[JITTER] == 1.0f;
  const bool contrast_on = jitter && ((config.jitter_op_mask >> OP_CONTRAST) & 1);
  if (kPartial && !contrast_on) return;
  const float sigma = row[BLUR_SIGMA];
  const bool blur = !kPartial && sigma > 0.0f;
  const int halo = blur ? config.blur_kernel_size / 2 : 0;

  const int ty0 = (tile / tiles_per_side) * kTile, tx0 = (tile % tiles_per_side) * kTile;
  const int tile_h = min(kTile, S - ty0), tile_w = min(kTile, S - tx0);
  const int ry0 = max(0, ty0 - halo), ry1 = min(S, ty0 + tile_h + halo);
  const int rx0 = max(0, tx0 - halo), rx1 = min(S, tx0 + tile_w + halo);
  const int RH = ry1 - ry0, RW = rx1 - rx0, region_pixels = RH * RW;

  float* state_r = smem + layout.state;
  float* state_g = state_r + region_pixels;
  float* state_b = state_g + region_pixels;

  // ---- resampling tables of the region's rows and (flipped) columns
  {
    const CropBox crop = crop_box(row, images.height, images.width);
    const bool flip = row[FLIP] == 1.0f;
    float* x_weights = smem + layout.tables;
    float* y_weights = x_weights + layout.region * taps;
    int* x_first = reinterpret_cast<int*>(y_weights + layout.region * taps);
    int* x_count = x_first + layout.region;
    int* y_first = x_count + layout.region;
    int* y_count = y_first + layout.region;
    for (int i = threadIdx.x; i < RW + RH; i += kThreads) {
      if (i < RW) {
        const int x = rx0 + i;
        x_first[i] = resample_weights(flip ? S - 1 - x : x, crop.width, S, taps, x_weights + i * taps, x_count + i);
      } else {
        const int j = i - RW;
        y_first[j] = resample_weights(ry0 + j, crop.height, S, taps, y_weights + j * taps, y_count + j);
      }
    }
    __syncthreads();

    // ---- resized crop (+ flip) of the region: horizontal sums first, as the reference
    // clamped, not checked: a check would need a host sync per call (ops.cpp checks on the CPU;
    // MultiPatchAugment.apply checks values before launch); an index out of range reads a real image
    const int64_t source = min(max(source_index[p], (int64_t)0), images.num_images - 1);
    const uint8_t* image = images.data + source * images.stride_n;
    for (int i = threadIdx.x; i < region_pixels; i += kThreads) {
      const int ly = i / RW, lx = i - ly * RW;
      const float* wy = y_weights + ly * taps;
      const float* wx = x_weights + lx * taps;
      const int nx = x_count[lx], ny = y_count[ly];
      const uint8_t* src_row = image + (int64_t)(crop.top + y_first[ly]) * images.stride_h +
                               (int64_t)(crop.left + x_first[lx]) * images.stride_w;
      float acc_r = 0.0f, acc_g = 0.0f, acc_b = 0.0f;
      for (int ty = 0; ty < ny; ++ty, src_row += images.stride_h) {
        float hr = 0.0f, hg = 0.0f, hb = 0.0f;
        const uint8_t* px = src_row;
        for (int tx = 0; tx < nx; ++tx, px += images.stride_w) {
          const float w = wx[tx];
          hr += (float)__ldg(px) * INV_255 * w;
          hg += (float)__ldg(px + images.stride_c) * INV_255 * w;
          hb += (float)__ldg(px + 2 * images.stride_c) * INV_255 * w;
        }
        const float w = wy[ty];
        acc_r += hr * w;
        acc_g += hg * w;
        acc_b += hb * w;
      }
      state_r[i] = acc_r;
      state_g[i] = acc_g;
      state_b[i] = acc_b;
    }
  }

  // ---- colour jitter, each thread on its own pixels; only contrast synchronises
  if (jitter) {
    for (int position = 0; position < NUM_JITTER_OPS; ++position) {
      const int op = (int)row[ORDER_0 + position];
      if (op < 0 || op >= NUM_JITTER_OPS || !((config.jitter_op_mask >> op) & 1)) continue;
      if (op == OP_CONTRAST) {
        float* reduce = smem + layout.reduce;
        float mean;
        if (kPartial || num_tiles == 1) {
          float partial = 0.0f;
          for (int i = threadIdx.x; i < region_pixels; i += kThreads) partial += gray(state_r[i], state_g[i], state_b[i]);
          const float total = block_sum(partial, reduce);
          if (kPartial) {
            if (threadIdx.x == 0) scratch[p * num_tiles + tile] = total;
            return;
          }
          mean = div_rn(total, (float)(S * S));
        } else {
          float total = 0.0f;
          for (int k = 0; k < num_tiles; ++k) total += scratch[p * num_tiles + k];
          mean = div_rn(total, (float)(S * S));
        }
        const float f = row[CONTRAST];
        for (int i = threadIdx.x; i < region_pixels; i += kThreads) {
          state_r[i] = blend(state_r[i], mean, f);
          state_g[i] = blend(state_g[i], mean, f);
          state_b[i] = blend(state_b[i], mean, f);
        }
      } else if (op == OP_BRIGHTNESS) {
        const float f = row[BRIGHTNESS];
        for (int i = threadIdx.x; i < region_pixels; i += kThreads) {
          state_r[i] = brightness(state_r[i], f);
          state_g[i] = brightness(state_g[i], f);
          state_b[i] = brightness(state_b[i], f);
        }
      } else if (op == OP_SATURATION) {
        const float f = row[SATURATION];
        for (int i = threadIdx.x; i < region_pixels; i += kThreads) {
          const float l = gray(state_r[i], state_g[i], state_b[i]);
          state_r[i] = blend(state_r[i], l, f);
          state_g[i] = blend(state_g[i], l, f);
          state_b[i] = blend(state_b[i], l, f);
        }
      } else {
        const float shift = row[HUE];
        for (int i = threadIdx.x; i < region_pixels; i += kThreads) {
          float r = state_r[i], g = state_g[i], b = state_b[i];
          hue_shift(r, g, b, shift);
          state_r[i] = r;
          state_g[i] = g;
          state_b[i] = b;
        }
      }
    }
  }
  if (kPartial) return;  // jitter without contrast in its order never reaches here (contrast_on)

  if (row[GRAYSCALE] == 1.0f) {
    for (int i = threadIdx.x; i < region_pixels; i += kThreads) {
      const float l = gray(state_r[i], state_g[i], state_b[i]);
      state_r[i] = l;
      state_g[i] = l;
      state_b[i] = l;
    }
  }

  const bool solarized = row[SOLARIZE] == 1.0f;
  OutT* out = static_cast<OutT*>(output.data) + p * output.stride_p;
  const int tile_pixels = tile_h * tile_w;
  if (!blur) {
    // region == tile here
    for (int i = threadIdx.x; i < tile_pixels; i += kThreads) {
      const int ly = i / tile_w, lx = i - ly * tile_w;
      const float value[3] = {state_r[i], state_g[i], state_b[i]};
      OutT* dst = out + (int64_t)(ty0 + ly) * output.stride_y + (int64_t)(tx0 + lx) * output.stride_x;
#pragma unroll
      for (int c = 0; c < 3; ++c) {
        float v = solarized ? solarize(value[c], config.solarize_threshold) : value[c];
        store_value(dst + c * output.stride_c, normalize(v, config.mean[c], config.std[c]));
      }
    }
    return;
  }

  // ---- separable Gaussian blur with reflect padding: rows of the region, then the tile
  const int K = config.blur_kernel_size, radius = K / 2;
  float* gauss = smem + layout.gauss;
  float* blurred_rows = smem + layout.blur_rows;  // (3, RH, tile_w), over the resampling tables
  if (threadIdx.x == 0) gaussian_weights(sigma, K, gauss);
  __syncthreads();  // also: every thread is done with the resampling tables
  for (int i = threadIdx.x; i < RH * tile_w; i += kThreads) {
    const int ly = i / tile_w, lx = i - ly * tile_w;
    const float* in_r = state_r + ly * RW;
    float acc_r = 0.0f, acc_g = 0.0f, acc_b = 0.0f;
    for (int k = 0; k < K; ++k) {
      const int x = reflect_index(tx0 + lx + k - radius, S) - rx0;
      const float w = gauss[k];
      acc_r += w * in_r[x];
      acc_g += w * in_r[x + region_pixels];
      acc_b += w * in_r[x + 2 * region_pixels];
    }
    blurred_rows[i] = acc_r;
    blurred_rows[i + RH * tile_w] = acc_g;
    blurred_rows[i + 2 * RH * tile_w] = acc_b;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < tile_pixels; i += kThreads) {
    const int ly = i / tile_w, lx = i - ly * tile_w;
    float value[3] = {0.0f, 0.0f, 0.0f};
    for (int k = 0; k < K; ++k) {
      const int y = reflect_index(ty0 + ly + k - radius, S) - ry0;
      const float w = gauss[k];
#pragma unroll
      for (int c = 0; c < 3; ++c) value[c] += w * blurred_rows[(c * RH + y) * tile_w + lx];
    }
    OutT* dst = out + (int64_t)(ty0 + ly) * output.stride_y + (int64_t)(tx0 + lx) * output.stride_x;
#pragma unroll
    for (int c = 0; c < 3; ++c) {
      float v = solarized ? solarize(value[c], config.solarize_threshold) : value[c];
      store_value(dst + c * output.stride_c, normalize(v, config.mean[c], config.std[c]));
    }
  }
}

template <typename OutT>
const char* launch(const Images& images, const int64_t* source_index, const float* params, int64_t num_patches,
                   const Config& config, const Output& output, float* scratch, cudaStream_t stream) {
  const int S = config.output_size;
  int64_t max_side = images.height > images.width ? images.height : images.width;
  max_side = max_side > S ? max_side : S;
  const int taps = max_resample_taps(max_side, S);
  const SmemLayout layout(S, config.blur_kernel_size, taps);
  const size_t smem_bytes = static_cast<size_t>(layout.total) * sizeof(float);
  int device = 0, smem_limit = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    return "cannot query the CUDA device";
  }
  if (smem_bytes > static_cast<size_t>(smem_limit)) {
    return "the patch tile, blur halo and resampling tables need more shared memory than this GPU has per block "
           "(reduce blur_kernel_size or the source image size relative to output_size)";
  }
  if (num_patches > 0x7fffffffLL) return "more than 2^31 - 1 patches in one call";
  const int tiles_per_side = (S + kTile - 1) / kTile;
  const dim3 grid(static_cast<unsigned>(num_patches), static_cast<unsigned>(tiles_per_side * tiles_per_side));
  if (tiles_per_side > 1) {
    auto partial = augment_kernel<OutT, true>;
    if (cudaFuncSetAttribute(partial, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_bytes) != cudaSuccess)
      return "cudaFuncSetAttribute failed";
    partial<<<grid, kThreads, smem_bytes, stream>>>(images, source_index, params, config, output, scratch, taps);
  }
  auto full = augment_kernel<OutT, false>;
  if (cudaFuncSetAttribute(full, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_bytes) != cudaSuccess)
    return "cudaFuncSetAttribute failed";
  full<<<grid, kThreads, smem_bytes, stream>>>(images, source_index, params, config, output, scratch, taps);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

int64_t augment_cuda_scratch_floats(int64_t num_patches, int output_size) {
  const int64_t tiles_per_side = (output_size + kTile - 1) / kTile;
  return tiles_per_side > 1 ? num_patches * tiles_per_side * tiles_per_side : 0;
}

const char* augment_cuda(const Images& images, const int64_t* source_index, const float* params, int64_t num_patches,
                         const Config& config, const Output& output, float* scratch, cudaStream_t stream) {
  switch (output.dtype) {
    case DType::Float32:
      return launch<float>(images, source_index, params, num_patches, config, output, scratch, stream);
    case DType::BFloat16:
      return launch<__nv_bfloat16>(images, source_index, params, num_patches, config, output, scratch, stream);
    default:
      return launch<__half>(images, source_index, params, num_patches, config, output, scratch, stream);
  }
}

}  // namespace augment
}  // namespace empssl
