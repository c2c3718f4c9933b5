// runtime/dtype.h — element types and their conversions.
//
//   dtype t = dtype_from_name("BF16");      // safetensors / torch names
//   size_t b = dtype_size(t);               // 2
//   float x = bf16_to_f32(f32_to_bf16(1.5f));
//
// Invariants:
//   1. dtype_size() is the storage size of one element in bytes.
//   2. f32 -> bf16/f16 conversions round to nearest even; NaN stays NaN.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

namespace troupe::runtime {

enum class dtype : uint8_t { f32, bf16, f16, i32, i64, u8 };

size_t dtype_size(dtype t);
// "f32", "bf16", ... (troupe's own spelling).
const char* dtype_name(dtype t);
// Accepts safetensors names (F32, BF16, F16, I32, I64, U8) and troupe names.
std::optional<dtype> dtype_from_name(std::string_view name);
// The safetensors spelling: "F32", "BF16", ...
const char* dtype_safetensors_name(dtype t);
bool dtype_is_float(dtype t);

uint16_t f32_to_bf16(float x);
float bf16_to_f32(uint16_t x);
uint16_t f32_to_f16(float x);
float f16_to_f32(uint16_t x);

// Converts n elements between any two dtypes (host memory).
void convert(void* dst, dtype dst_t, const void* src, dtype src_t, int64_t n);

template <typename T>
constexpr dtype dtype_of();
template <> constexpr dtype dtype_of<float>() { return dtype::f32; }
template <> constexpr dtype dtype_of<int32_t>() { return dtype::i32; }
template <> constexpr dtype dtype_of<int64_t>() { return dtype::i64; }
template <> constexpr dtype dtype_of<uint8_t>() { return dtype::u8; }

}  // namespace troupe::runtime
