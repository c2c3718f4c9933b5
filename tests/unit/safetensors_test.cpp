// tests/unit/safetensors_test.cpp — the safetensors reader/writer: round trips for every
// dtype, a file written by the Python safetensors library, view lifetime, atomic writes,
// bad files with their messages, a seeded fuzz of mutated headers, and sharded indexes.
#include "runtime/io/safetensors.h"
#include "tests/unit/tmp_dir.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

namespace fs = std::filesystem;
using namespace troupe::runtime;

namespace {

std::vector<char> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// [8-byte LE length][header][data_bytes zero bytes]
std::vector<char> make_file(const std::string& header, size_t data_bytes) {
  std::vector<char> b(8 + header.size() + data_bytes, 0);
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) b[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  std::memcpy(b.data() + 8, header.data(), header.size());
  return b;
}

safetensors_file parse(const std::vector<char>& bytes, const std::string& label = "mem.safetensors") {
  return safetensors_file::from_bytes(nullptr, bytes.data(), bytes.size(), label);
}

// The message of the troupe error that parsing `bytes` throws ("" when nothing is thrown).
std::string parse_error(const std::vector<char>& bytes) {
  try {
    parse(bytes);
  } catch (const error& e) {
    EXPECT_EQ(e.code(), errc::format) << e.what();
    return e.what();
  }
  return "";
}

#define EXPECT_HAS(haystack, needle) \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) << "'" << (needle) << "' not in: " << (haystack)

std::vector<uint8_t> bytes_of(const tensor& t) {
  const auto* p = static_cast<const uint8_t*>(t.data_ptr());
  return std::vector<uint8_t>(p, p + t.nbytes());
}

// One tensor of every dtype, with edge values, plus a zero-size and a scalar tensor.
std::vector<std::pair<std::string, tensor>> every_dtype() {
  std::vector<std::pair<std::string, tensor>> ts;
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> f = {0.0f, -0.0f, 1.0f, -2.5f, 3.14159265f, 1e-40f, 65504.0f, inf, -inf, 1e30f, 7.0f, -1e-3f};
  ts.emplace_back("f32", tensor::from_vector(f, {3, 4}));
  tensor bf = tensor::empty({2, 5}, dtype::bf16);
  tensor hf = tensor::empty({5}, dtype::f16);
  const std::vector<float> fv = {1.0f, -0.5f, 3.140625f, 0.1f, -100.25f, 1e-5f, 65504.0f, -2.0f, 0.333f, 1e38f};
  for (int i = 0; i < 10; ++i) static_cast<uint16_t*>(bf.data_ptr())[i] = f32_to_bf16(fv[i]);
  for (int i = 0; i < 5; ++i) static_cast<uint16_t*>(hf.data_ptr())[i] = f32_to_f16(fv[i]);
  ts.emplace_back("layers.0.bf16", bf);
  ts.emplace_back("f16", hf);
  ts.emplace_back("u8", tensor::from_vector<uint8_t>({0, 1, 127, 128, 255}, {5}));  // odd size before aligned ones
  ts.emplace_back("i32",
                  tensor::from_vector<int32_t>(
                      {std::numeric_limits<int32_t>::min(), -1, 0, 42, std::numeric_limits<int32_t>::max()}, {5}));
  ts.emplace_back("i64", tensor::from_vector<int64_t>({std::numeric_limits<int64_t>::min(), -7, int64_t{1} << 40,
                                                       std::numeric_limits<int64_t>::max()},
                                                      {2, 2}));
  ts.emplace_back("empty", tensor::empty({0, 3}, dtype::f32));
  ts.emplace_back("scalar", tensor::from_vector<float>({-9.5f}, {}));
  return ts;
}

}  // namespace

TEST(Safetensors, RoundTripEveryDtype) {
  tmp_dir d;
  const std::string path = d.file("all.safetensors");
  auto ts = every_dtype();
  std::map<std::string, std::string> meta = {{"format", "pt"}, {"step", "12"}, {"unicode", "h\xc3\xa9llo"}};
  safetensors_write(path, ts, meta);
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  safetensors_file f = safetensors_file::open(path);
  EXPECT_EQ(f.metadata(), meta);
  std::vector<std::string> want_names;
  for (auto& [n, t] : ts) want_names.push_back(n);
  EXPECT_EQ(f.names(), want_names);  // header order = the order given
  for (auto& [name, t] : ts) {
    ASSERT_TRUE(f.contains(name));
    tensor g = f.get(name);
    EXPECT_EQ(g.dtype(), t.dtype()) << name;
    EXPECT_EQ(g.shape(), t.shape()) << name;
    EXPECT_EQ(bytes_of(g), bytes_of(t)) << name;
    // written aligned: every view starts at a multiple of its element size
    EXPECT_EQ(reinterpret_cast<uintptr_t>(g.data_ptr()) % dtype_size(g.dtype()), 0u) << name;
  }

  // Independent check of the layout with a plain JSON parser: header padded to 8, no holes.
  auto raw = read_bytes(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(raw[i]);
  EXPECT_EQ((8 + n) % 8, 0u);
  auto j = nlohmann::json::parse(std::string(raw.data() + 8, n));
  size_t total = 0;
  for (auto& [name, t] : ts) {
    auto off = j[name]["data_offsets"];
    const size_t b = off[0].get<size_t>(), e = off[1].get<size_t>();
    ASSERT_EQ(e - b, t.nbytes()) << name;
    ASSERT_LE(8 + n + e, raw.size());
    EXPECT_EQ(0, std::memcmp(raw.data() + 8 + n + b, t.data_ptr(), t.nbytes())) << name;
    EXPECT_EQ(j[name]["dtype"].get<std::string>(), dtype_safetensors_name(t.dtype()));
    total += t.nbytes();
  }
  EXPECT_EQ(raw.size(), 8 + n + total);  // no holes, no trailing bytes
  EXPECT_EQ(j["__metadata__"]["step"], "12");
}

TEST(Safetensors, ReadsFileWrittenByPythonSafetensors) {
  // safetensors.torch.save({...}, metadata={"format": "pt", "note": "golden"}) with
  // safetensors 0.x / torch 2.x: ids i64 [-3, 2**40], w f32 [[1.5, -2, 3.25], [0, 1e-3, -7]],
  // b bf16 [1, -0.5, 3.140625], h f16 [65504, -2**-14], m u8 [7, 255, 0].
  static const char golden[] =
      "\x48\x01\x00\x00\x00\x00\x00\x00\x7b\x22\x5f\x5f\x6d\x65\x74\x61\x64\x61\x74\x61\x5f\x5f\x22\x3a\x7b\x22\x66"
      "\x6f\x72\x6d\x61\x74\x22\x3a\x22\x70\x74\x22\x2c\x22\x6e\x6f\x74\x65\x22\x3a\x22\x67\x6f\x6c\x64\x65\x6e\x22"
      "\x7d\x2c\x22\x69\x64\x73\x22\x3a\x7b\x22\x64\x74\x79\x70\x65\x22\x3a\x22\x49\x36\x34\x22\x2c\x22\x73\x68\x61"
      "\x70\x65\x22\x3a\x5b\x32\x5d\x2c\x22\x64\x61\x74\x61\x5f\x6f\x66\x66\x73\x65\x74\x73\x22\x3a\x5b\x30\x2c\x31"
      "\x36\x5d\x7d\x2c\x22\x77\x22\x3a\x7b\x22\x64\x74\x79\x70\x65\x22\x3a\x22\x46\x33\x32\x22\x2c\x22\x73\x68\x61"
      "\x70\x65\x22\x3a\x5b\x32\x2c\x33\x5d\x2c\x22\x64\x61\x74\x61\x5f\x6f\x66\x66\x73\x65\x74\x73\x22\x3a\x5b\x31"
      "\x36\x2c\x34\x30\x5d\x7d\x2c\x22\x62\x22\x3a\x7b\x22\x64\x74\x79\x70\x65\x22\x3a\x22\x42\x46\x31\x36\x22\x2c"
      "\x22\x73\x68\x61\x70\x65\x22\x3a\x5b\x33\x5d\x2c\x22\x64\x61\x74\x61\x5f\x6f\x66\x66\x73\x65\x74\x73\x22\x3a"
      "\x5b\x34\x30\x2c\x34\x36\x5d\x7d\x2c\x22\x68\x22\x3a\x7b\x22\x64\x74\x79\x70\x65\x22\x3a\x22\x46\x31\x36\x22"
      "\x2c\x22\x73\x68\x61\x70\x65\x22\x3a\x5b\x32\x5d\x2c\x22\x64\x61\x74\x61\x5f\x6f\x66\x66\x73\x65\x74\x73\x22"
      "\x3a\x5b\x34\x36\x2c\x35\x30\x5d\x7d\x2c\x22\x6d\x22\x3a\x7b\x22\x64\x74\x79\x70\x65\x22\x3a\x22\x55\x38\x22"
      "\x2c\x22\x73\x68\x61\x70\x65\x22\x3a\x5b\x33\x5d\x2c\x22\x64\x61\x74\x61\x5f\x6f\x66\x66\x73\x65\x74\x73\x22"
      "\x3a\x5b\x35\x30\x2c\x35\x33\x5d\x7d\x7d\x20\x20\xfd\xff\xff\xff\xff\xff\xff\xff\x00\x00\x00\x00\x00\x01\x00"
      "\x00\x00\x00\xc0\x3f\x00\x00\x00\xc0\x00\x00\x50\x40\x00\x00\x00\x00\x6f\x12\x83\x3a\x00\x00\xe0\xc0\x80\x3f"
      "\x00\xbf\x49\x40\xff\x7b\x00\x84\x07\xff\x00";
  tmp_dir d;
  const std::string path = d.file("py.safetensors");
  write_bytes(path, std::vector<char>(golden, golden + sizeof(golden) - 1));
  safetensors_file f = safetensors_file::open(path);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"ids", "w", "b", "h", "m"}));
  EXPECT_EQ(f.metadata().at("note"), "golden");
  tensor ids = f.get("ids");
  EXPECT_EQ(ids.data<int64_t>()[0], -3);
  EXPECT_EQ(ids.data<int64_t>()[1], int64_t{1} << 40);
  tensor w = f.get_as("w", dtype::f32, {2, 3});
  EXPECT_EQ(w.at({0, 2}), 3.25);
  EXPECT_EQ(w.at({1, 1}), static_cast<double>(1e-3f));
  tensor b = f.get_as("b", dtype::f32);
  EXPECT_EQ(b.at({0}), 1.0);
  EXPECT_EQ(b.at({1}), -0.5);
  EXPECT_EQ(b.at({2}), 3.140625);
  tensor h = f.get_as("h", dtype::f32);
  EXPECT_EQ(h.at({0}), 65504.0);
  EXPECT_EQ(h.at({1}), -std::ldexp(1.0, -14));
  tensor m = f.get("m");
  EXPECT_EQ(m.data<uint8_t>()[1], 255);
  EXPECT_EQ(m.data<uint8_t>()[0], 7);
}

TEST(Safetensors, ViewsOutliveTheFileObjectAndTheFile) {
  tmp_dir d;
  const std::string path = d.file("v.safetensors");
  std::vector<float> vals(1000);
  for (size_t i = 0; i < vals.size(); ++i) vals[i] = static_cast<float>(i) * 0.5f - 7.0f;
  safetensors_write(path, {{"x", tensor::from_vector(vals, {10, 100})}});
  tensor view;
  {
    safetensors_file f = safetensors_file::open(path);
    view = f.get("x");
    EXPECT_EQ(view.data_ptr(), f.get("x").data_ptr());  // zero-copy: both views see the mapping
  }
  fs::remove(path);
  ASSERT_EQ(view.shape(), (shape_t{10, 100}));
  for (size_t i = 0; i < vals.size(); ++i) ASSERT_EQ(view.data<float>()[i], vals[i]) << i;
  tensor row = view.select(0, 3);  // a view of the view still works
  EXPECT_EQ(row.at({7}), vals[307]);
}

TEST(Safetensors, WritingIntoAViewLeavesTheFileUnchanged) {
  tmp_dir d;
  const std::string path = d.file("cow.safetensors");
  safetensors_write(path, {{"x", tensor::full({4}, 2.0)}});
  {
    safetensors_file f = safetensors_file::open(path);
    tensor v = f.get("x");
    v.data<float>()[0] = 99.0f;
    EXPECT_EQ(v.at({0}), 99.0);
  }
  EXPECT_EQ(safetensors_file::open(path).get("x").at({0}), 2.0);
}

TEST(Safetensors, GetAsConvertsAndChecksShape) {
  tmp_dir d;
  const std::string path = d.file("g.safetensors");
  tensor bf = tensor::empty({2, 3}, dtype::bf16);
  const float src[6] = {1.0f, 0.1f, -3.3f, 1e-3f, 250.5f, -0.0f};
  for (int i = 0; i < 6; ++i) static_cast<uint16_t*>(bf.data_ptr())[i] = f32_to_bf16(src[i]);
  safetensors_write(path, {{"model.norm.weight", bf}});
  safetensors_file f = safetensors_file::open(path);
  tensor f32 = f.get_as("model.norm.weight", dtype::f32, {2, 3});
  ASSERT_EQ(f32.dtype(), dtype::f32);
  for (int i = 0; i < 6; ++i)
    EXPECT_EQ(f32.data<float>()[i], bf16_to_f32(f32_to_bf16(src[i])));  // exact: bf16 -> f32 is lossless
  tensor same = f.get_as("model.norm.weight", dtype::bf16);
  EXPECT_EQ(same.data_ptr(), f.get("model.norm.weight").data_ptr());  // no copy when the dtype matches
  try {
    f.get_as("model.norm.weight", dtype::f32, {3, 2});
    FAIL() << "shape mismatch not detected";
  } catch (const error& e) {
    EXPECT_HAS(e.what(), "model.norm.weight");
    EXPECT_HAS(e.what(), "[2, 3]");
    EXPECT_HAS(e.what(), "[3, 2]");
  }
  try {
    f.get("model.missing");
    FAIL();
  } catch (const error& e) {
    EXPECT_EQ(e.code(), errc::not_found);
    EXPECT_HAS(e.what(), "model.missing");
    EXPECT_HAS(e.what(), path);
  }
}

TEST(Safetensors, WriterIsAtomicAndValidatesInput) {
  tmp_dir d;
  const std::string path = d.file("a.safetensors");
  safetensors_write(path, {{"x", tensor::full({3}, 1.0)}});
  safetensors_write(path, {{"y", tensor::full({2}, 5.0)}});  // replaces the old file
  safetensors_file f = safetensors_file::open(path);
  EXPECT_FALSE(f.contains("x"));
  EXPECT_EQ(f.get("y").at({1}), 5.0);
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  EXPECT_THROW(safetensors_write(path, {{"a", tensor::full({1}, 1.0)}, {"a", tensor::full({1}, 2.0)}}), error);
  EXPECT_THROW(safetensors_write(path, {{"__metadata__", tensor::full({1}, 1.0)}}), error);
  EXPECT_THROW(safetensors_write(path, {{"u", tensor()}}), error);
  EXPECT_EQ(safetensors_file::open(path).get("y").at({0}), 5.0);  // failed writes left the file alone
  try {
    safetensors_write(d.file("no_such_dir/x.safetensors"), {{"x", tensor::full({1}, 1.0)}});
    FAIL();
  } catch (const error& e) {
    EXPECT_EQ(e.code(), errc::io);
    EXPECT_HAS(e.what(), "no_such_dir");
  }
}

TEST(Safetensors, WritesStridedViewsAsContiguousData) {
  tmp_dir d;
  const std::string path = d.file("s.safetensors");
  std::vector<float> v(12);
  for (int i = 0; i < 12; ++i) v[i] = static_cast<float>(i);
  tensor x = tensor::from_vector(v, {3, 4});
  safetensors_write(path, {{"cols", x.slice(1, 1, 3)}, {"row", x.select(0, 2)}});
  safetensors_file f = safetensors_file::open(path);
  tensor cols = f.get("cols");
  ASSERT_EQ(cols.shape(), (shape_t{3, 2}));
  for (int r = 0; r < 3; ++r)
    for (int c = 0; c < 2; ++c) EXPECT_EQ(cols.at({r, c}), 4 * r + c + 1);
  EXPECT_EQ(f.get("row").at({3}), 11.0);
}

// ---- bad files -------------------------------------------------------------------

TEST(SafetensorsBad, ShortFileAndHeaderLength) {
  EXPECT_HAS(parse_error(std::vector<char>(5, 0)), "too short");
  EXPECT_HAS(parse_error(std::vector<char>(5, 0)), "mem.safetensors");
  auto b = make_file("{}", 0);
  b[0] = 100;  // header says 100 bytes, file has 2
  const std::string msg = parse_error(b);
  EXPECT_HAS(msg, "header length 100");
  EXPECT_HAS(msg, "byte 0");
  // An absurd length that does fit in the (sparse, never touched) buffer.
  const size_t big = 100'000'016;
  std::vector<char> huge(big, ' ');
  const uint64_t n = big - 8;
  for (int i = 0; i < 8; ++i) huge[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  EXPECT_HAS(parse_error(huge), "100 MB");
  EXPECT_HAS(parse_error(make_file("{", 0)), "malformed JSON");
}

TEST(SafetensorsBad, MalformedJsonNamesTheByte) {
  const std::string msg = parse_error(make_file(R"({"a": {"dtype": "F32",, }})", 0));
  EXPECT_HAS(msg, "malformed JSON");
  EXPECT_HAS(msg, "file byte 30");  // 8 + index of the second comma
  EXPECT_HAS(parse_error(make_file("[1, 2]", 0)), "must be a JSON object");
}

TEST(SafetensorsBad, EntryErrorsNameTheTensorAndOffset) {
  struct bad_case {
    std::string header;
    size_t data;
    std::vector<std::string> needles;
  };
  const std::vector<bad_case> cases = {
      {R"({"t": 5})", 0, {"'t'", "JSON object"}},
      {R"({"t": {"shape": [1], "data_offsets": [0, 4]}})", 4, {"'t'", "\"dtype\""}},
      {R"({"t": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}})", 8, {"'t'", "F64", "unknown dtype"}},
      {R"({"t": {"dtype": 32, "shape": [1], "data_offsets": [0, 4]}})", 4, {"'t'", "dtype"}},
      {R"({"t": {"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}})", 4, {"'t'", "f32"}},
      {R"({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4, {"'t'", "-1", "non-negative"}},
      {R"({"t": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}})", 4, {"'t'", "1.5"}},
      {R"({"t": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}})", 4, {"'t'", "shape"}},
      {R"({"t": {"dtype": "F32", "shape": [1]}})", 4, {"'t'", "data_offsets"}},
      {R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}})", 8, {"'t'", "[0,4,8]"}},
      {R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})", 4, {"'t'", "non-negative"}},
      {R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4]}})", 4, {"'t'", "data_offsets"}},
      {R"({"t": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})", 8, {"'t'", "[8, 4]", "begin is after end"}},
      {R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", 4, {"'t'", "[0, 8]", "4 bytes"}},
      {R"({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8, {"'t'", "12 bytes", "[3]"}},
      {R"({"t": {"dtype": "F32", "shape": [4611686018427387904, 8], "data_offsets": [0, 8]}})", 8, {"'t'", "64 bits"}},
      {R"({"t": {"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [0, 8]}})", 8, {"'t'", "overflow"}},
      {R"({"__metadata__": {"k": 1}})", 0, {"__metadata__", "\"k\"", "string"}},
      {R"({"__metadata__": [1]})", 0, {"__metadata__", "object"}},
  };
  for (const auto& c : cases) {
    const std::string msg = parse_error(make_file(c.header, c.data));
    ASSERT_FALSE(msg.empty()) << "accepted: " << c.header;
    EXPECT_HAS(msg, "mem.safetensors");
    for (const auto& needle : c.needles) EXPECT_HAS(msg, needle) << " for " << c.header;
    if (c.needles[0] == "'t'") {
      EXPECT_HAS(msg, "file byte 9");  // "t" starts at file byte 8 + 1
    }
  }
}

TEST(SafetensorsBad, OverlapAndDuplicates) {
  const std::string msg = parse_error(make_file(
      R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
      12));
  EXPECT_HAS(msg, "'a'");
  EXPECT_HAS(msg, "'b'");
  EXPECT_HAS(msg, "overlaps");
  EXPECT_HAS(msg, "file byte");
  const std::string dup = parse_error(make_file(
      R"({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]}})",
      2));
  EXPECT_HAS(dup, "'a'");
  EXPECT_HAS(dup, "twice");
  // Zero-size tensors may share an offset with anything.
  EXPECT_NO_THROW(parse(make_file(
      R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "z": {"dtype": "F32", "shape": [0, 5], "data_offsets": [4, 4]}})",
      8)));
}

TEST(SafetensorsBad, OpenReportsMissingAndTruncatedFiles) {
  tmp_dir d;
  try {
    safetensors_file::open(d.file("nope.safetensors"));
    FAIL();
  } catch (const error& e) {
    EXPECT_EQ(e.code(), errc::not_found);
    EXPECT_HAS(e.what(), "nope.safetensors");
  }
  const std::string path = d.file("t.safetensors");
  safetensors_write(path, {{"w", tensor::full({64}, 1.0)}});
  auto raw = read_bytes(path);
  raw.resize(raw.size() - 10);
  write_bytes(path, raw);
  try {
    safetensors_file::open(path);
    FAIL();
  } catch (const error& e) {
    EXPECT_EQ(e.code(), errc::format);
    EXPECT_HAS(e.what(), path);
    EXPECT_HAS(e.what(), "'w'");
    EXPECT_HAS(e.what(), "[0, 256]");
  }
  write_bytes(path, std::vector<char>(3, 'x'));
  EXPECT_THROW(safetensors_file::open(path), error);
}

// ---- fuzz --------------------------------------------------------------------------

namespace {

// A file parsed from fuzzed bytes must be self-consistent; reading every tensor must stay
// inside the buffer (ASan checks that when enabled).
void check_consistent(const safetensors_file& f, size_t file_size) {
  ASSERT_EQ(f.data_offset() + f.data_size(), file_size);
  std::vector<std::pair<size_t, size_t>> ranges;
  for (const auto& name : f.names()) {
    const auto& e = f.entry(name);
    ASSERT_LE(e.begin, e.end);
    ASSERT_LE(e.end, f.data_size());
    ASSERT_EQ(e.end - e.begin, static_cast<size_t>(shape_numel(e.shape)) * dtype_size(e.dtype));
    tensor t = f.get(name);
    const auto* p = static_cast<const uint8_t*>(t.data_ptr());
    unsigned sum = 0;
    for (size_t i = 0; i < t.nbytes(); ++i) sum += p[i];
    (void)sum;
    if (e.end > e.begin) ranges.emplace_back(e.begin, e.end);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) ASSERT_GE(ranges[i].first, ranges[i - 1].second);
}

std::string mutate_json(const std::string& header, std::mt19937_64& rng) {
  nlohmann::ordered_json j = nlohmann::ordered_json::parse(header);
  std::vector<std::string> keys;
  for (auto it = j.begin(); it != j.end(); ++it) keys.push_back(it.key());
  auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  auto& e = j[keys[pick(keys.size())]];
  const std::vector<nlohmann::ordered_json> weird = {-1,
                                                     0,
                                                     1,
                                                     3,
                                                     7,
                                                     8,
                                                     1024,
                                                     1.5,
                                                     "x",
                                                     nullptr,
                                                     true,
                                                     nlohmann::ordered_json::array(),
                                                     nlohmann::ordered_json::object(),
                                                     uint64_t{1} << 63,
                                                     std::numeric_limits<uint64_t>::max(),
                                                     -9223372036854775807LL};
  auto random_value = [&]() -> nlohmann::ordered_json {
    if (rng() % 2) return weird[pick(weird.size())];
    return static_cast<int64_t>(rng() % 300);
  };
  switch (rng() % 8) {
    case 0:  // data_offsets element
      if (e.is_object() && e.contains("data_offsets") && e["data_offsets"].is_array() && !e["data_offsets"].empty())
        e["data_offsets"][pick(e["data_offsets"].size())] = random_value();
      break;
    case 1:  // data_offsets arity / shape of the array
      if (e.is_object())
        e["data_offsets"] = rng() % 2 ? nlohmann::ordered_json::array({random_value()}) : random_value();
      break;
    case 2:  // shape dimension
      if (e.is_object() && e.contains("shape") && e["shape"].is_array() && !e["shape"].empty())
        e["shape"][pick(e["shape"].size())] = random_value();
      break;
    case 3:  // shape rank
      if (e.is_object() && e.contains("shape") && e["shape"].is_array()) {
        if (rng() % 2)
          e["shape"].push_back(random_value());
        else if (!e["shape"].empty())
          e["shape"].erase(e["shape"].size() - 1);
      }
      break;
    case 4: {  // dtype
      const std::vector<nlohmann::ordered_json> dts = {"F32", "BF16", "F16", "I32", "I64", "U8", "F64", "bool", "", 4};
      if (e.is_object()) e["dtype"] = dts[pick(dts.size())];
      break;
    }
    case 5:  // drop a key
      if (e.is_object() && !e.empty()) e.erase(e.begin().key());
      break;
    case 6:  // replace the whole entry
      e = random_value();
      break;
    case 7:  // offsets that are consistent in size but shifted
      if (e.is_object() && e.contains("data_offsets") && e["data_offsets"].is_array() &&
          e["data_offsets"].size() == 2 && e["data_offsets"][0].is_number_unsigned() &&
          e["data_offsets"][1].is_number_unsigned()) {
        const uint64_t shift = rng() % 64;
        e["data_offsets"][0] = e["data_offsets"][0].get<uint64_t>() + shift;
        e["data_offsets"][1] = e["data_offsets"][1].get<uint64_t>() + shift;
      }
      break;
  }
  return j.dump();
}

}  // namespace

TEST(SafetensorsFuzz, MutatedHeadersParseConsistentlyOrThrow) {
  tmp_dir d;
  const std::string path = d.file("base.safetensors");
  auto base_tensors = every_dtype();
  safetensors_write(path, base_tensors, {{"format", "pt"}});
  const std::vector<char> base = read_bytes(path);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(base[i]);
  const std::string header(base.data() + 8, n);
  const std::vector<char> data(base.begin() + 8 + static_cast<std::ptrdiff_t>(n), base.end());

  std::mt19937_64 rng(20260128);
  int accepted = 0, rejected = 0;
  const int iterations = 6000;
  for (int it = 0; it < iterations; ++it) {
    std::vector<char> bytes;
    const int kind = static_cast<int>(rng() % 6);
    if (kind == 0) {  // byte flips anywhere in the length or header
      bytes = base;
      const int flips = 1 + static_cast<int>(rng() % 4);
      for (int k = 0; k < flips; ++k) bytes[rng() % (8 + n)] = static_cast<char>(rng() % 256);
    } else if (kind == 1) {  // truncation
      bytes = base;
      bytes.resize(rng() % base.size());
    } else if (kind == 2) {  // header-length edits
      bytes = base;
      const uint64_t v = rng() % 3 == 0 ? rng() : n + (rng() % 33) - 16;
      for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((v >> (8 * i)) & 0xff);
    } else if (kind == 3 || kind == 4) {  // structured JSON edits, one or several
      std::string h = header;
      const int edits = kind == 3 ? 1 : 2 + static_cast<int>(rng() % 3);
      for (int k = 0; k < edits; ++k) {
        try {
          h = mutate_json(h, rng);
        } catch (const nlohmann::json::exception&) {
          break;  // the previous edit made the header unparsable as a whole; keep it
        }
      }
      bytes = make_file(h, 0);
      bytes.resize(8 + h.size());
      bytes.insert(bytes.end(), data.begin(), data.end());
    } else {  // garbage JSON-ish text
      static const char* tokens[] = {"{",
                                     "}",
                                     "[",
                                     "]",
                                     ",",
                                     ":",
                                     "\"a\"",
                                     "\"dtype\"",
                                     "\"F32\"",
                                     "\"shape\"",
                                     "\"data_offsets\"",
                                     "0",
                                     "4",
                                     "-1",
                                     "1e9",
                                     "null",
                                     "true",
                                     "\"\\u0000\"",
                                     " ",
                                     "\"__metadata__\"",
                                     "\xff"};
      std::string h;
      const int len = 1 + static_cast<int>(rng() % 40);
      for (int k = 0; k < len; ++k) h += tokens[rng() % (sizeof(tokens) / sizeof(tokens[0]))];
      bytes = make_file(h, rng() % 64);
    }
    // Exact-size heap copy so that any out-of-bounds read is caught by ASan.
    std::unique_ptr<char[]> buf(new char[bytes.size() + 1]);
    std::memcpy(buf.get(), bytes.data(), bytes.size());
    try {
      safetensors_file f = safetensors_file::from_bytes(nullptr, buf.get(), bytes.size(), "fuzz");
      check_consistent(f, bytes.size());
      ++accepted;
    } catch (const error& e) {
      ASSERT_EQ(e.code(), errc::format) << e.what();
      ++rejected;
    } catch (const std::exception& e) {
      FAIL() << "iteration " << it << ": non-troupe exception " << e.what();
    }
  }
  EXPECT_EQ(accepted + rejected, iterations);
  RecordProperty("accepted", accepted);
  RecordProperty("rejected", rejected);
  // Both outcomes must be exercised for the fuzz to mean anything.
  EXPECT_GT(accepted, iterations / 50);
  EXPECT_GT(rejected, iterations / 2);
}

// ---- sharded checkpoints -------------------------------------------------------------

TEST(SafetensorsIndex, SingleFileAndShardedDirectories) {
  tmp_dir d;
  fs::create_directories(d.path() / "single");
  safetensors_write((d.path() / "single" / "model.safetensors").string(),
                    {{"a", tensor::full({2}, 1.0)}, {"b", tensor::full({3}, 2.0)}});
  safetensors_index one = safetensors_index::open_dir((d.path() / "single").string());
  EXPECT_EQ(one.names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(one.get("b").at({2}), 2.0);

  const fs::path sh = d.path() / "sharded";
  fs::create_directories(sh);
  safetensors_write((sh / "model-00001-of-00002.safetensors").string(),
                    {{"embed", tensor::full({4}, 3.0)}, {"norm", tensor::full({2}, 4.0)}});
  safetensors_write((sh / "model-00002-of-00002.safetensors").string(), {{"head", tensor::full({2, 2}, 5.0)}});
  {
    std::ofstream idx(sh / "model.safetensors.index.json");
    idx << R"({"metadata": {"total_size": 40}, "weight_map": {"embed": "model-00001-of-00002.safetensors",
              "head": "model-00002-of-00002.safetensors", "norm": "model-00001-of-00002.safetensors"}})";
  }
  safetensors_index many = safetensors_index::open_dir(sh.string());
  EXPECT_EQ(many.names(), (std::vector<std::string>{"embed", "head", "norm"}));
  EXPECT_TRUE(many.contains("head"));
  EXPECT_FALSE(many.contains("nope"));
  EXPECT_EQ(many.get("embed").at({3}), 3.0);
  EXPECT_EQ(many.get_as("head", dtype::bf16, {2, 2}).dtype(), dtype::bf16);
  EXPECT_EQ(many.entry("norm").shape, (shape_t{2}));
  EXPECT_THROW(many.get_as("head", dtype::f32, {4}), error);
  EXPECT_THROW(many.get("nope"), error);
}

TEST(SafetensorsIndex, BadIndexesNameTheDirectory) {
  tmp_dir d;
  const fs::path sh = d.path() / "ckpt";
  fs::create_directories(sh);
  auto expect_error = [&](const std::string& index_json, const std::vector<std::string>& needles) {
    {
      std::ofstream idx(sh / "model.safetensors.index.json");
      idx << index_json;
    }
    try {
      safetensors_index::open_dir(sh.string());
      ADD_FAILURE() << "accepted " << index_json;
    } catch (const error& e) {
      EXPECT_HAS(e.what(), sh.string());
      for (auto& n : needles) EXPECT_HAS(e.what(), n);
    }
  };
  safetensors_write((sh / "part1.safetensors").string(), {{"a", tensor::full({1}, 1.0)}});
  expect_error(R"({"weight_map": {"a": "part1.safetensors", "b": "part2.safetensors"}})",
               {"part2.safetensors", "\"b\""});
  expect_error(R"({"weight_map": {"a": "part1.safetensors", "c": "part1.safetensors"}})", {"'c'", "part1"});
  expect_error(R"({"weight_map": {"a": 3}})", {"\"a\"", "string"});
  expect_error(R"({"weight_map": {"a": "../x.safetensors"}})", {"inside the directory"});
  expect_error(R"({"metadata": {}})", {"weight_map"});
  expect_error(R"({"weight_map": )", {"malformed JSON"});
  fs::remove(sh / "model.safetensors.index.json");
  try {
    safetensors_index::open_dir(sh.string());
    FAIL();
  } catch (const error& e) {
    EXPECT_EQ(e.code(), errc::not_found);
    EXPECT_HAS(e.what(), sh.string());
  }
}
