#include "runtime/dtype.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "runtime/error.h"

namespace troupe::runtime {

size_t dtype_size(dtype t) {
  switch (t) {
    case dtype::f32: return 4;
    case dtype::bf16: return 2;
    case dtype::f16: return 2;
    case dtype::i32: return 4;
    case dtype::i64: return 8;
    case dtype::u8: return 1;
  }
  return 0;
}

const char* dtype_name(dtype t) {
  switch (t) {
    case dtype::f32: return "f32";
    case dtype::bf16: return "bf16";
    case dtype::f16: return "f16";
    case dtype::i32: return "i32";
    case dtype::i64: return "i64";
    case dtype::u8: return "u8";
  }
  return "?";
}

const char* dtype_safetensors_name(dtype t) {
  switch (t) {
    case dtype::f32: return "F32";
    case dtype::bf16: return "BF16";
    case dtype::f16: return "F16";
    case dtype::i32: return "I32";
    case dtype::i64: return "I64";
    case dtype::u8: return "U8";
  }
  return "?";
}

std::optional<dtype> dtype_from_name(std::string_view n) {
  if (n == "F32" || n == "f32" || n == "float32") return dtype::f32;
  if (n == "BF16" || n == "bf16" || n == "bfloat16") return dtype::bf16;
  if (n == "F16" || n == "f16" || n == "float16") return dtype::f16;
  if (n == "I32" || n == "i32" || n == "int32") return dtype::i32;
  if (n == "I64" || n == "i64" || n == "int64") return dtype::i64;
  if (n == "U8" || n == "u8" || n == "uint8") return dtype::u8;
  return std::nullopt;
}

bool dtype_is_float(dtype t) { return t == dtype::f32 || t == dtype::bf16 || t == dtype::f16; }

uint16_t f32_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

float bf16_to_f32(uint16_t x) {
  uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (absu >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (absu < 0x38800000u) {  // subnormal half or zero
    float af;
    std::memcpy(&af, &absu, 4);
    // scale so that the subnormal unit 2^-24 becomes 1, round to nearest even
    float scaled = af * 16777216.0f;
    uint32_t r = static_cast<uint32_t>(std::nearbyint(scaled));
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t mant = absu & 0x7fffffu;
  int32_t exp = static_cast<int32_t>(absu >> 23) - 127 + 15;
  uint32_t h = (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h += 1;  // may carry into exponent: correct
  return static_cast<uint16_t>(sign | h);
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {
      float f = std::ldexp(static_cast<float>(mant), -24);
      std::memcpy(&u, &f, 4);
      u |= sign;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp - 15 + 127) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

namespace {
double load_as_double(const void* src, dtype t, int64_t i) {
  switch (t) {
    case dtype::f32: return static_cast<const float*>(src)[i];
    case dtype::bf16: return bf16_to_f32(static_cast<const uint16_t*>(src)[i]);
    case dtype::f16: return f16_to_f32(static_cast<const uint16_t*>(src)[i]);
    case dtype::i32: return static_cast<const int32_t*>(src)[i];
    case dtype::i64: return static_cast<double>(static_cast<const int64_t*>(src)[i]);
    case dtype::u8: return static_cast<const uint8_t*>(src)[i];
  }
  return 0;
}
// Float -> integer truncates toward zero and saturates (NaN -> 0): a plain cast of an
// out-of-range value is undefined behaviour.
template <typename I>
I saturate(double v) {
  if (std::isnan(v)) return 0;
  constexpr double lo = static_cast<double>(std::numeric_limits<I>::min());
  constexpr double hi_excl = static_cast<double>(std::numeric_limits<I>::max()) + 1.0;  // a power of two: exact
  if (v <= lo) return std::numeric_limits<I>::min();
  if (v >= hi_excl) return std::numeric_limits<I>::max();
  return static_cast<I>(v);
}
void store_from_double(void* dst, dtype t, int64_t i, double v) {
  switch (t) {
    case dtype::f32: static_cast<float*>(dst)[i] = static_cast<float>(v); break;
    case dtype::bf16: static_cast<uint16_t*>(dst)[i] = f32_to_bf16(static_cast<float>(v)); break;
    case dtype::f16: static_cast<uint16_t*>(dst)[i] = f32_to_f16(static_cast<float>(v)); break;
    case dtype::i32: static_cast<int32_t*>(dst)[i] = saturate<int32_t>(v); break;
    case dtype::i64: static_cast<int64_t*>(dst)[i] = saturate<int64_t>(v); break;
    case dtype::u8: static_cast<uint8_t*>(dst)[i] = saturate<uint8_t>(v); break;
  }
}
}  // namespace

void convert(void* dst, dtype dst_t, const void* src, dtype src_t, int64_t n) {
  if (dst_t == src_t) {
    std::memcpy(dst, src, static_cast<size_t>(n) * dtype_size(dst_t));
    return;
  }
  if (src_t == dtype::bf16 && dst_t == dtype::f32) {
    auto* d = static_cast<float*>(dst);
    auto* s = static_cast<const uint16_t*>(src);
    for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
    return;
  }
  if (src_t == dtype::i64 && dst_t == dtype::i32) {
    auto* d = static_cast<int32_t*>(dst);
    auto* s = static_cast<const int64_t*>(src);
    for (int64_t i = 0; i < n; ++i) d[i] = static_cast<int32_t>(s[i]);
    return;
  }
  for (int64_t i = 0; i < n; ++i) store_from_double(dst, dst_t, i, load_as_double(src, src_t, i));
}

}  // namespace troupe::runtime
