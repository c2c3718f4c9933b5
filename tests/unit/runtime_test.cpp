// tests/unit/runtime_test.cpp — the runtime substrate: tensor views and copies against
// naive indexing, from_blob ownership, dtype conversions against independent reference
// rounding (exhaustive for f16), cpu streams and events, device parsing and fallback,
// allocator accounting and error rendering.
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <future>
#include <limits>
#include <random>
#include <vector>

#include "runtime/allocator.h"
#include "runtime/device.h"
#include "runtime/dtype.h"
#include "runtime/error.h"
#include "runtime/stream.h"
#include "runtime/tensor.h"

using namespace troupe::runtime;

namespace {

#define EXPECT_HAS(haystack, needle) \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) << "'" << (needle) << "' not in: " << (haystack)

tensor arange(const shape_t& shape) {
  std::vector<float> v(static_cast<size_t>(shape_numel(shape)));
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i);
  return tensor::from_vector(v, shape);
}

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Reference bf16 rounding: pick the nearer of the two bf16 neighbours in double, ties to even.
uint16_t ref_bf16(float x) {
  const uint32_t u = bits_of(x);
  const uint16_t lo = static_cast<uint16_t>(u >> 16);
  const uint16_t hi = static_cast<uint16_t>(lo + 1);  // next magnitude (may become inf)
  const double dlo = std::fabs(static_cast<double>(float_of(static_cast<uint32_t>(lo) << 16)));
  const double dhi_raw = std::fabs(static_cast<double>(float_of(static_cast<uint32_t>(hi) << 16)));
  const double dhi = std::isinf(dhi_raw) ? std::ldexp(1.0, 128) : dhi_raw;
  const double ax = std::fabs(static_cast<double>(x));
  if (ax - dlo < dhi - ax) return lo;
  if (ax - dlo > dhi - ax) return hi;
  return (lo & 1u) ? hi : lo;
}

// Reference f16 value of a bit pattern, from the IEEE definition.
double ref_f16_value(uint16_t h) {
  const int sign = (h >> 15) ? -1 : 1;
  const int e = (h >> 10) & 0x1f;
  const int m = h & 0x3ff;
  if (e == 0) return sign * std::ldexp(m, -24);
  if (e == 31) return m ? std::numeric_limits<double>::quiet_NaN() : sign * std::numeric_limits<double>::infinity();
  return sign * std::ldexp(1024 + m, e - 25);
}

// Reference f32 -> f16: binary search over the ordered positive halves, ties to even,
// with 2^16 standing in for inf (IEEE overflow rounding).
uint16_t ref_f16(float x) {
  if (std::isnan(x)) return 0x7e00;
  const uint16_t sign = std::signbit(x) ? 0x8000 : 0;
  const double ax = std::fabs(static_cast<double>(x));
  auto val = [](uint32_t h) { return h == 0x7c00 ? 65536.0 : ref_f16_value(static_cast<uint16_t>(h)); };
  if (ax >= 65536.0) return sign | 0x7c00;
  uint32_t lo = 0, hi = 0x7c00;  // val(lo) <= ax < val(hi)
  while (hi - lo > 1) {
    const uint32_t mid = (lo + hi) / 2;
    (val(mid) <= ax ? lo : hi) = mid;
  }
  const double dl = ax - val(lo), dh = val(hi) - ax;
  const uint32_t r = dl < dh ? lo : dh < dl ? hi : ((lo & 1u) ? hi : lo);
  return static_cast<uint16_t>(sign | r);
}

}  // namespace

// ---- tensors ---------------------------------------------------------------------

TEST(Tensor, SelectSliceViewAgainstNaiveIndexing) {
  tensor x = arange({2, 3, 4});  // x[i][j][k] = 12 i + 4 j + k
  EXPECT_TRUE(x.is_contiguous());
  EXPECT_EQ(x.strides(), (shape_t{12, 4, 1}));
  EXPECT_EQ(x.describe(), "f32[2, 3, 4] cpu");

  tensor s = x.select(1, 2);  // (2, 4): x[i][2][k]
  ASSERT_EQ(s.shape(), (shape_t{2, 4}));
  EXPECT_FALSE(s.is_contiguous());
  for (int i = 0; i < 2; ++i)
    for (int k = 0; k < 4; ++k) EXPECT_EQ(s.at({i, k}), 12 * i + 8 + k);

  tensor sl = x.slice(2, 1, 3);  // (2, 3, 2): x[i][j][1 + k]
  ASSERT_EQ(sl.shape(), (shape_t{2, 3, 2}));
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j)
      for (int k = 0; k < 2; ++k) EXPECT_EQ(sl.at({i, j, k}), 12 * i + 4 * j + 1 + k);
  tensor neg = x.select(-1, 3);  // negative dims count from the end
  EXPECT_EQ(neg.at({1, 2}), 12 + 8 + 3);

  tensor c = sl.contiguous();
  EXPECT_TRUE(c.is_contiguous());
  EXPECT_NE(c.data_ptr(), sl.data_ptr());
  for (int i = 0; i < 12; ++i) EXPECT_EQ(c.data<float>()[i], 12 * (i / 6) + 4 * ((i / 2) % 3) + 1 + i % 2) << i;
  EXPECT_EQ(x.contiguous().data_ptr(), x.data_ptr());  // already contiguous: no copy

  tensor flat = x.view({-1});
  ASSERT_EQ(flat.shape(), (shape_t{24}));
  EXPECT_EQ(flat.at({17}), 17.0);
  tensor v = x.view({4, -1});
  EXPECT_EQ(v.shape(), (shape_t{4, 6}));
  EXPECT_EQ(v.at({3, 5}), 23.0);
  EXPECT_EQ(x.slice(0, 1, 2).view({-1}).at({0}), 12.0);  // a contiguous slice keeps its offset
  EXPECT_THROW(sl.view({-1}), error);                    // non-contiguous
  EXPECT_THROW(x.view({-1, -1}), error);
  EXPECT_THROW(x.view({5, -1}), error);
  EXPECT_THROW(x.view({2, 3}), error);

  // Views share storage; clone does not.
  tensor cl = x.clone();
  s.data<float>();  // typed access on a view is fine
  static_cast<float*>(x.select(0, 1).data_ptr())[0] = -5.0f;
  EXPECT_EQ(x.at({1, 0, 0}), -5.0);
  EXPECT_EQ(flat.at({12}), -5.0);
  EXPECT_EQ(cl.at({1, 0, 0}), 12.0);

  EXPECT_THROW(x.slice(2, 3, 5), error);
  EXPECT_THROW(x.slice(3, 0, 1), error);
  EXPECT_THROW(x.select(0, 2), error);
  EXPECT_THROW(x.data<int32_t>(), error);
  EXPECT_THROW(x.item(), error);
  EXPECT_THROW(x.at({0, 0}), error);
}

TEST(Tensor, CopiesConversionsAndZeroSize) {
  tensor x = arange({3, 4});
  tensor t = x.slice(1, 1, 3);  // strided (3, 2)
  tensor dst = tensor::zeros({3, 2});
  dst.copy_from(t);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 2; ++j) EXPECT_EQ(dst.at({i, j}), 4 * i + 1 + j);
  EXPECT_THROW(dst.copy_from(x), error);

  tensor half = x.to(dtype::bf16);
  EXPECT_EQ(half.dtype(), dtype::bf16);
  tensor back = half.to(dtype::f32);
  for (int i = 0; i < 12; ++i) EXPECT_EQ(back.data<float>()[i], static_cast<float>(i));  // small ints are exact
  tensor strided_to = t.to(dtype::i64);
  EXPECT_EQ(strided_to.at({2, 1}), 10.0);

  tensor full = tensor::full({2, 2}, 2.5, dtype::f16);
  EXPECT_EQ(full.at({1, 1}), 2.5);
  EXPECT_EQ(tensor::full({1}, 300.0, dtype::i32).item(), 300.0);

  tensor z = tensor::empty({0, 3});
  EXPECT_EQ(z.numel(), 0);
  EXPECT_EQ(z.nbytes(), 0u);
  tensor zc = z.clone();
  EXPECT_EQ(zc.shape(), (shape_t{0, 3}));
  EXPECT_EQ(z.slice(1, 1, 2).shape(), (shape_t{0, 1}));
  EXPECT_THROW(tensor::empty({2, -1}), error);
  EXPECT_EQ(tensor::from_vector<float>({4.0f}, {}).item(), 4.0);  // a scalar
}

TEST(Tensor, FromBlobKeepsItsOwnerAliveUntilTheLastView) {
  auto freed = std::make_shared<std::atomic<bool>>(false);
  float* raw = new float[6]{1, 2, 3, 4, 5, 6};
  std::shared_ptr<void> owner(raw, [freed](void* p) {
    delete[] static_cast<float*>(p);
    *freed = true;
  });
  tensor row;
  {
    tensor t = tensor::from_blob(raw, {2, 3}, dtype::f32, device::cpu(), owner);
    owner.reset();
    EXPECT_FALSE(*freed);
    EXPECT_EQ(t.data_ptr(), raw);  // no copy
    row = t.select(0, 1);
  }
  EXPECT_FALSE(*freed);  // the view still holds the storage
  EXPECT_EQ(row.at({2}), 6.0);
  tensor copy = row;
  row = tensor();
  EXPECT_FALSE(*freed);
  copy = tensor();
  EXPECT_TRUE(*freed);

  // Without an owner the memory is the caller's and is left alone.
  std::vector<float> mine = {7, 8};
  { tensor t = tensor::from_blob(mine.data(), {2}, dtype::f32, device::cpu()); }
  EXPECT_EQ(mine[1], 8.0f);
}

// ---- dtypes ----------------------------------------------------------------------

TEST(Dtype, NamesAndSizes) {
  for (dtype t : {dtype::f32, dtype::bf16, dtype::f16, dtype::i32, dtype::i64, dtype::u8}) {
    EXPECT_EQ(dtype_from_name(dtype_safetensors_name(t)), t);
    EXPECT_EQ(dtype_from_name(dtype_name(t)), t);
  }
  EXPECT_EQ(dtype_size(dtype::bf16), 2u);
  EXPECT_EQ(dtype_size(dtype::i64), 8u);
  EXPECT_EQ(dtype_from_name("bfloat16"), dtype::bf16);
  EXPECT_FALSE(dtype_from_name("F64").has_value());
  EXPECT_TRUE(dtype_is_float(dtype::f16));
  EXPECT_FALSE(dtype_is_float(dtype::u8));
}

TEST(Dtype, Bf16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16(float_of(0x3f808000)), 0x3f80);  // tie, 0x3f80 is even
  EXPECT_EQ(f32_to_bf16(float_of(0x3f818000)), 0x3f82);  // tie, rounds up to even
  EXPECT_EQ(f32_to_bf16(float_of(0x3f808001)), 0x3f81);  // just above the tie
  EXPECT_EQ(f32_to_bf16(float_of(0x3f807fff)), 0x3f80);  // just below
  EXPECT_EQ(f32_to_bf16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::infinity()), 0x7f80);
  EXPECT_EQ(f32_to_bf16(-std::numeric_limits<float>::infinity()), 0xff80);
  EXPECT_EQ(f32_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds past the largest bf16
  EXPECT_EQ(f32_to_bf16(float_of(0x00010000)), 0x0001);               // f32 subnormal, exact in bf16
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(std::nanf("")))));
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(float_of(0x7f800001)))));  // low-payload NaN is not inf
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(float_of(0xff800001)))));
  EXPECT_EQ(bf16_to_f32(0x4049), 3.140625f);

  std::mt19937 rng(7);
  for (int i = 0; i < 200000; ++i) {
    const float x = float_of(rng());
    if (std::isnan(x)) continue;
    ASSERT_EQ(f32_to_bf16(x), ref_bf16(x)) << std::hex << bits_of(x);
  }
}

TEST(Dtype, F16ExhaustiveDecodeAndRoundTrip) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const double ref = ref_f16_value(static_cast<uint16_t>(h));
    const float got = f16_to_f32(static_cast<uint16_t>(h));
    if (std::isnan(ref)) {
      ASSERT_TRUE(std::isnan(got)) << h;
      ASSERT_TRUE(std::isnan(f16_to_f32(f32_to_f16(got)))) << h;
      continue;
    }
    ASSERT_EQ(static_cast<double>(got), ref) << h;
    ASSERT_EQ(f32_to_f16(got), h) << h;  // every half survives f16 -> f32 -> f16
  }
}

TEST(Dtype, F16RoundsToNearestEven) {
  EXPECT_EQ(f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // the tie above the largest half goes to inf
  EXPECT_EQ(f32_to_f16(-1e10f), 0xfc00);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -14)), 0x0400);             // smallest normal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);             // smallest subnormal
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);             // tie between 0 and 2^-24 -> even (0)
  EXPECT_EQ(f32_to_f16(std::ldexp(3.0f, -25)), 0x0002);             // tie between 1 and 2 units -> even (2)
  EXPECT_EQ(f32_to_f16(std::ldexp(3.0f, -26)), 0x0001);             // 0.75 unit -> 1
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // tie -> even
  EXPECT_EQ(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie -> even (up)
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -14) - std::ldexp(1.0f, -25)), 0x0400);  // rounds up into normals
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_f16(float_of(0x00000001)), 0x0000);  // f32 subnormal underflows to 0
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(std::nanf("")))));
  EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(float_of(0x7f800001)))));

  std::mt19937 rng(11);
  for (int i = 0; i < 200000; ++i) {
    // Half of the samples in the f16 range, where rounding is interesting.
    float x =
        (i % 2) ? float_of(rng()) : std::ldexp(static_cast<float>(rng() % (1u << 24)), -static_cast<int>(rng() % 50));
    if (i % 4 == 1) x = -x;
    if (std::isnan(x)) continue;
    ASSERT_EQ(f32_to_f16(x), ref_f16(x)) << std::hex << bits_of(x);
  }
}

TEST(Dtype, ConvertBetweenAllTypes) {
  const std::vector<float> src = {0.0f, 1.5f, -2.75f, 100.0f, 255.0f};
  std::vector<int32_t> i32(5);
  convert(i32.data(), dtype::i32, src.data(), dtype::f32, 5);
  EXPECT_EQ(i32, (std::vector<int32_t>{0, 1, -2, 100, 255}));  // C truncation toward zero
  std::vector<int64_t> i64 = {-3, 1LL << 40, 7};
  std::vector<int32_t> narrowed(3);
  convert(narrowed.data(), dtype::i32, i64.data(), dtype::i64, 3);
  EXPECT_EQ(narrowed[0], -3);
  EXPECT_EQ(narrowed[2], 7);
  std::vector<uint8_t> u8 = {0, 7, 255};
  std::vector<float> f(3);
  convert(f.data(), dtype::f32, u8.data(), dtype::u8, 3);
  EXPECT_EQ(f, (std::vector<float>{0, 7, 255}));
  std::vector<uint16_t> bf(5), h(5);
  convert(bf.data(), dtype::bf16, src.data(), dtype::f32, 5);
  convert(h.data(), dtype::f16, bf.data(), dtype::bf16, 5);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(f16_to_f32(h[i]), src[i]) << i;  // all exactly representable
  std::vector<float> back(5);
  convert(back.data(), dtype::f32, h.data(), dtype::f16, 5);
  EXPECT_EQ(back, src);

  // Out-of-range and NaN to integers saturate (and NaN -> 0) instead of undefined behaviour.
  const std::vector<float> wild = {std::nanf(""), 1e20f, -1e20f, 300.0f, -5.0f};
  std::vector<int32_t> wi(5);
  convert(wi.data(), dtype::i32, wild.data(), dtype::f32, 5);
  EXPECT_EQ(
      wi, (std::vector<int32_t>{0, std::numeric_limits<int32_t>::max(), std::numeric_limits<int32_t>::min(), 300, -5}));
  std::vector<uint8_t> wu(5);
  convert(wu.data(), dtype::u8, wild.data(), dtype::f32, 5);
  EXPECT_EQ(wu, (std::vector<uint8_t>{0, 255, 0, 255, 0}));
  std::vector<int64_t> wl(5);
  convert(wl.data(), dtype::i64, wild.data(), dtype::f32, 5);
  EXPECT_EQ(wl[1], std::numeric_limits<int64_t>::max());
  EXPECT_EQ(wl[2], std::numeric_limits<int64_t>::min());
}

// ---- streams and events ------------------------------------------------------------

TEST(Stream, RunsTasksInOrder) {
  stream s(device::cpu());
  std::vector<int> seen;  // touched only by the stream's thread until synchronize
  for (int i = 0; i < 1000; ++i) s.enqueue([&seen, i] { seen.push_back(i); });
  s.synchronize();
  ASSERT_EQ(seen.size(), 1000u);
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(seen[i], i);
  EXPECT_EQ(s.native_handle(), nullptr);
  EXPECT_EQ(s.dev(), device::cpu());
}

TEST(Stream, ExceptionIsRethrownBySynchronizeOnce) {
  stream s;
  std::atomic<int> after{0};
  s.enqueue([] { TROUPE_THROW(errc::internal, "task {} failed", 1); });
  s.enqueue([] { throw std::runtime_error("second failure is not the one reported"); });
  s.enqueue([&] { after = 1; });
  try {
    s.synchronize();
    FAIL() << "the task's exception was lost";
  } catch (const error& e) {
    EXPECT_EQ(e.code(), errc::internal);
    EXPECT_HAS(e.what(), "task 1 failed");
  }
  EXPECT_EQ(after.load(), 1);  // later tasks still ran
  EXPECT_NO_THROW(s.synchronize());
}

TEST(Stream, DestructorDrainsPendingTasks) {
  std::atomic<int> done{0};
  {
    stream s;
    for (int i = 0; i < 100; ++i) s.enqueue([&] { ++done; });
  }
  EXPECT_EQ(done.load(), 100);
}

TEST(Event, RecordSynchronizeAndQuery) {
  event never;
  EXPECT_TRUE(never.query());
  never.synchronize();  // returns at once

  stream s;
  std::promise<void> gate;
  std::shared_future<void> open = gate.get_future().share();
  std::atomic<int> stage{0};
  s.enqueue([open, &stage] {
    open.wait();
    stage = 1;
  });
  event e;
  e.record(s);
  EXPECT_FALSE(e.query());  // the gated task cannot have finished
  gate.set_value();
  e.synchronize();
  EXPECT_EQ(stage.load(), 1);
  EXPECT_TRUE(e.query());
  s.synchronize();
}

TEST(Event, BlockOrdersWorkAcrossTwoCpuStreams) {
  stream producer, consumer;
  std::promise<void> gate;
  std::shared_future<void> open = gate.get_future().share();
  std::atomic<int> value{0};
  std::atomic<int> observed{-1};
  producer.enqueue([open, &value] {
    open.wait();
    value = 42;
  });
  event e;
  e.record(producer);
  e.block(consumer);
  consumer.enqueue([&] { observed = value.load(); });
  EXPECT_EQ(observed.load(), -1);  // the consumer waits for the producer's event
  gate.set_value();
  consumer.synchronize();
  EXPECT_EQ(observed.load(), 42);
  // Re-recording: block() waits for the latest record only.
  producer.enqueue([&] { value = 43; });
  e.record(producer);
  e.block(consumer);
  consumer.enqueue([&] { observed = value.load(); });
  consumer.synchronize();
  EXPECT_EQ(observed.load(), 43);
  producer.synchronize();
}

// ---- devices and allocators ------------------------------------------------------------

TEST(Device, ParseAndResolve) {
  EXPECT_EQ(parse_device("cpu"), device::cpu());
  EXPECT_EQ(parse_device("cuda"), device::cuda(0));
  EXPECT_EQ(parse_device("cuda:3"), device::cuda(3));
  EXPECT_EQ(device::cuda(2).str(), "cuda:2");
  EXPECT_EQ(device::cpu().str(), "cpu");
  for (const char* bad : {"gpu", "CPU", "cuda:", "cuda:-1", "cuda:1x", "cuda:99999999999", "", "cuda0"}) {
    try {
      parse_device(bad);
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const error& e) {
      EXPECT_EQ(e.code(), errc::invalid_argument);
      EXPECT_HAS(e.what(), "cpu, cuda or cuda:N");
    }
  }
  EXPECT_EQ(resolve_device("cpu"), device::cpu());
  const cuda_state st = cuda_status();
  if (!st.available) {
    EXPECT_FALSE(st.reason.empty());
    EXPECT_EQ(resolve_device("cuda:0"), device::cpu());  // falls back
    EXPECT_EQ(resolve_device("cuda:7"), device::cpu());
    EXPECT_THROW(allocator_for(device::cuda(0)), error);
    EXPECT_THROW(stream(device::cuda(0)), error);
  } else {
    EXPECT_EQ(resolve_device("cuda:0"), device::cuda(0));
    EXPECT_THROW(resolve_device(fmt::format("cuda:{}", st.device_count)), error);
  }
  EXPECT_THROW(resolve_device("tpu"), error);
  auto devs = list_devices();
  ASSERT_FALSE(devs.empty());
  EXPECT_EQ(devs[0].dev, device::cpu());
  EXPECT_GT(devs[0].total_memory, 0u);
  EXPECT_EQ(devs.size(), 1u + static_cast<size_t>(st.available ? st.device_count : 0));
}

TEST(Allocator, CountsBytesAndPeak) {
  allocator& a = cpu_allocator();
  EXPECT_EQ(&allocator_for(device::cpu()), &a);
  EXPECT_EQ(a.dev(), device::cpu());
  const size_t base = a.allocated_bytes();
  {
    tensor big = tensor::empty({3 << 18});  // 3 MiB of f32
    EXPECT_EQ(a.allocated_bytes(), base + (3u << 20));
    EXPECT_GE(a.peak_bytes(), base + (3u << 20));
    EXPECT_EQ(reinterpret_cast<uintptr_t>(big.data_ptr()) % 64, 0u);
  }
  EXPECT_EQ(a.allocated_bytes(), base);
  tensor small = tensor::empty({1 << 18});  // 1 MiB
  EXPECT_EQ(a.allocated_bytes(), base + (1u << 20));
  EXPECT_GE(a.peak_bytes(), base + (3u << 20));  // the peak remembers the 3 MiB
  small = tensor();
  EXPECT_EQ(a.allocated_bytes(), base);

  void* p = a.allocate(0);
  void* q = a.allocate(0);
  EXPECT_NE(p, nullptr);
  EXPECT_NE(p, q);
  a.deallocate(p, 0);
  a.deallocate(q, 0);
  EXPECT_EQ(a.allocated_bytes(), base);
}

TEST(Error, CarriesCodeLocationAndContext) {
  try {
    TROUPE_CHECK(1 + 1 == 3, errc::invalid_argument, "{}: n must be {}, got {}", "where", "positive", -1);
    FAIL();
  } catch (error& e) {
    EXPECT_EQ(e.code(), errc::invalid_argument);
    EXPECT_EQ(e.message(), "where: n must be positive, got -1");
    EXPECT_HAS(e.location(), "runtime_test.cpp:");
    e.add_context("while loading model.safetensors");
    EXPECT_HAS(e.what(), "while loading model.safetensors");
    EXPECT_HAS(e.what(), "invalid_argument");
    ASSERT_EQ(e.context().size(), 1u);
  }
  EXPECT_STREQ(errc_name(errc::format), "format");
}
