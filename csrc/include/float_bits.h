// float32 bit casts and the rounding of float32 to the 16-bit output types, shared by the CPU
// and CUDA kernels (host and device): round to nearest even, as torch's .to().
#pragma once

#include <cstdint>
#include <cstring>

#include "host_device.h"

namespace empssl {

EMPSSL_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

EMPSSL_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// float32 -> bfloat16 bits, round to nearest even (as torch's .to(torch.bfloat16))
EMPSSL_HD uint16_t float_to_bf16_bits(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// float32 -> IEEE half bits, round to nearest even, with subnormals, overflow to inf, NaN
EMPSSL_HD uint16_t float_to_half_bits(float f) {
  uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  uint32_t h;
  if (u >= (143u << 23)) {  // >= 65536 (or inf / NaN); 65520 .. 65536 rounds up to inf below
    h = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {  // below 2^-14: half subnormal or zero; float addition rounds to even
    const float magic = bits_float(126u << 23);  // 0.5: its ulp is the half subnormal step 2^-24
    h = float_bits(bits_float(u) + magic) - (126u << 23);
  } else {
    const uint32_t mantissa_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu + mantissa_odd;
    h = u >> 13;
  }
  return static_cast<uint16_t>(h | sign);
}

}  // namespace empssl
