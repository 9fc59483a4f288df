// IEEE half precision for the C++ samples' fp16 paths (the CUDA backend takes fp16 or bf16
// activations): one conversion, so that every sample feeds the library and its reference the
// same halves. Header-only; included by path from each sample.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace sikv_sample {

// Half bits of x, round to nearest even; NaN stays NaN, overflow goes to infinity.
inline uint16_t to_half(float x) {
  uint32_t f;
  std::memcpy(&f, &x, 4);
  const uint32_t sign = (f >> 16) & 0x8000u;
  const uint32_t mag = f & 0x7fffffffu;
  if (mag >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (mag > 0x7f800000u ? 0x200u : 0u));
  if (mag >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds past the largest half
  if (mag < 0x38800000u) {                                   // subnormal half (or zero)
    const uint32_t shift = 113u - (mag >> 23);
    if (shift > 11) return uint16_t(sign);  // below half the smallest subnormal
    const uint32_t m = (mag & 0x7fffffu) | 0x800000u;
    uint32_t h = m >> (shift + 13);
    const uint32_t rest = m & ((1u << (shift + 13)) - 1u), half = 1u << (shift + 12);
    if (rest > half || (rest == half && (h & 1u))) ++h;
    return uint16_t(sign | h);
  }
  uint32_t h = ((mag - 0x38000000u) >> 13);
  const uint32_t rest = mag & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

inline float from_half(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t f;
  if (e == 0) {
    const float v = std::ldexp(float(m), -24);
    return sign ? -v : v;
  }
  if (e == 31) f = sign | 0x7f800000u | (m << 13);
  else f = sign | ((e + 112u) << 23) | (m << 13);
  float x;
  std::memcpy(&x, &f, 4);
  return x;
}

}  // namespace sikv_sample
