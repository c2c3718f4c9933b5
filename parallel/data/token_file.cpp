// parallel/data/token_file.cpp — token file reader (header/size/vocab validation, mmap) and writer.
#include "parallel/data/token_file.h"

#include "runtime/io/file_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "runtime/error.h"

namespace troupe::parallel {

using runtime::errc;

namespace {

const char* format_name(token_format f) {
  switch (f) {
    case token_format::llmc: return "llmc";
    case token_format::llmc_u16: return "llmc_u16";
    case token_format::llmc_u32: return "llmc_u32";
    case token_format::raw_u16: return "raw_u16";
    case token_format::raw_u32: return "raw_u32";
  }
  return "?";
}

bool is_llmc(token_format f) {
  return f == token_format::llmc || f == token_format::llmc_u16 || f == token_format::llmc_u32;
}

}  // namespace

template <typename T>
static token_span span_of_vector(std::vector<T> v) {
  auto owned = std::make_shared<std::vector<T>>(std::move(v));
  token_span s;
  s.data = owned->data();
  s.width = sizeof(T);
  s.size = static_cast<int64_t>(owned->size());
  s.owner = owned;
  return s;
}

token_span token_span::from_vector(std::vector<uint16_t> tokens) { return span_of_vector(std::move(tokens)); }
token_span token_span::from_vector(std::vector<uint32_t> tokens) { return span_of_vector(std::move(tokens)); }

token_file token_file::open(const std::string& path, token_format format, int64_t vocab_size) {
  const runtime::mapped_file m = runtime::map_file(path, "token file");
  const size_t size = m.size;

  token_file f;
  f.path_ = path;
  int width = format == token_format::raw_u32 || format == token_format::llmc_u32 ? 4 : 2;
  size_t offset = 0;
  int64_t count = 0;
  const std::shared_ptr<void>& owner = m.owner;
  const char* bytes = m.data;

  if (is_llmc(format)) {
    TROUPE_CHECK(size >= llmc_header_bytes, errc::format,
                 "{}: {} bytes is too short for an llm.c token file (header is {} bytes); for a headerless "
                 "nanoGPT file use format raw_u16",
                 path, size, llmc_header_bytes);
    int32_t header[3];
    std::memcpy(header, bytes, sizeof(header));
    TROUPE_CHECK(header[0] == llmc_magic, errc::format,
                 "{}: bad magic {} at byte offset 0 (llm.c token files start with {}); a headerless nanoGPT "
                 "file needs format raw_u16",
                 path, header[0], llmc_magic);
    TROUPE_CHECK(header[1] == 1 || header[1] == 2, errc::format,
                 "{}: unsupported version {} at byte offset 4 (1 = uint16 tokens, 2 = uint32 tokens)", path,
                 header[1]);
    width = header[1] == 1 ? 2 : 4;
    TROUPE_CHECK(format == token_format::llmc || (format == token_format::llmc_u16) == (width == 2),
                 errc::format, "{}: header version {} at byte offset 4 means uint{} tokens, but {} was asked for",
                 path, header[1], width * 8, format_name(format));
    TROUPE_CHECK(header[2] >= 0, errc::format, "{}: negative token count {} at byte offset 8", path, header[2]);
    count = header[2];
    offset = llmc_header_bytes;
    const size_t expected = offset + static_cast<size_t>(count) * static_cast<size_t>(width);
    TROUPE_CHECK(size == expected, errc::format,
                 "{}: header (byte offset 8) says {} tokens of {} bytes, so the file should have {} bytes, but it "
                 "has {} ({}; the file is {})",
                 path, count, width, expected, size, size < expected ? "token data ends early" : "trailing bytes",
                 size < expected ? "truncated" : "corrupt");
  } else {
    TROUPE_CHECK(size % static_cast<size_t>(width) == 0, errc::format,
                 "{}: {} bytes is not a multiple of {} ({}: a bare array of uint{} tokens); the last token at byte "
                 "offset {} is cut off",
                 path, size, width, format_name(format), width * 8, size - size % static_cast<size_t>(width));
    count = static_cast<int64_t>(size / static_cast<size_t>(width));
  }
  f.data_offset_ = offset;
  f.tokens_.data = bytes ? bytes + offset : nullptr;
  f.tokens_.width = width;
  f.tokens_.size = count;
  f.tokens_.owner = owner;
  if (vocab_size > 0) f.check_vocab(vocab_size);
  return f;
}

void token_file::check_vocab(int64_t vocab_size) const {
  TROUPE_CHECK(vocab_size > 0, errc::invalid_argument, "{}: vocab_size must be positive, got {}", path_, vocab_size);
  const uint64_t limit = static_cast<uint64_t>(vocab_size);
  for (int64_t i = 0; i < tokens_.size; ++i) {
    const uint32_t t = tokens_[i];
    if (t >= limit) {
      TROUPE_THROW(errc::out_of_range,
                   "{}: token {} (byte offset {}) is {}, not below the vocab size {}; the file was made with a "
                   "different tokenizer than the model's",
                   path_, i, data_offset_ + static_cast<size_t>(i) * static_cast<size_t>(tokens_.width), t,
                   vocab_size);
    }
  }
}

void token_file_write(const std::string& path, std::span<const uint32_t> tokens, token_format format) {
  uint32_t max_token = 0;
  size_t max_index = 0;
  for (size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] > max_token) max_token = tokens[i], max_index = i;
  if (format == token_format::llmc) format = max_token <= 0xFFFF ? token_format::llmc_u16 : token_format::llmc_u32;
  const int width = format == token_format::llmc_u32 || format == token_format::raw_u32 ? 4 : 2;
  TROUPE_CHECK(width == 4 || max_token <= 0xFFFF, errc::out_of_range,
               "{}: token {} is {}, which does not fit format {} (uint16); use a 32-bit format", path, max_index,
               max_token, format_name(format));
  TROUPE_CHECK(!is_llmc(format) || tokens.size() <= 0x7FFFFFFFu, errc::out_of_range,
               "{}: {} tokens do not fit the llm.c header's int32 count", path, tokens.size());

  runtime::atomic_file_writer w(path);
  if (is_llmc(format)) {
    std::vector<int32_t> header(llmc_header_ints, 0);
    header[0] = llmc_magic;
    header[1] = width == 2 ? 1 : 2;
    header[2] = static_cast<int32_t>(tokens.size());
    w.write(header.data(), llmc_header_bytes);
  }
  if (width == 4) {
    w.write(tokens.data(), tokens.size_bytes());
  } else {
    std::vector<uint16_t> narrow(tokens.begin(), tokens.end());
    w.write(narrow.data(), narrow.size() * sizeof(uint16_t));
  }
  w.commit();
}

}  // namespace troupe::parallel
