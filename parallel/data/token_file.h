// parallel/data/token_file.h — pre-tokenized token files (.bin), mmap'ed and zero-copy.
//
//   token_file f = token_file::open("train.bin");                          // llm.c layout
//   token_file g = token_file::open("nanogpt.bin", token_format::raw_u16);  // headerless
//   token_file h = token_file::open("train.bin", token_format::llmc, /*vocab_size=*/50257);
//   uint32_t t = f.tokens()[7];
//   token_file_write("out.bin", tokens, token_format::llmc_u32);
//
// Formats:
//   llmc     llm.c: a header of 256 int32 (little-endian) — [0] magic 20240520,
//            [1] version (1 = uint16 tokens, 2 = uint32 tokens), [2] token count —
//            then the tokens. Width comes from the header.
//   raw_u16  nanoGPT: a bare array of uint16 tokens, no header (the caller names the width).
//   raw_u32  a bare array of uint32 tokens.
//
// Invariants:
//   1. open() validates before returning: magic, version, and that the file size is exactly
//      header + count * width (raw: a multiple of the width). A violation throws errc::format
//      naming the file, the byte offset and the value found; nothing stays mapped.
//   2. With vocab_size > 0, open() checks every token < vocab_size; the first offender is
//      reported with its token index, byte offset and value (errc::out_of_range).
//   3. tokens() is a view into a private read-only mapping that shares ownership of it: it
//      stays valid after the token_file goes away.
//   4. Writing is atomic: "<path>.tmp", fsync, rename.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace troupe::parallel {

enum class token_format { llmc, llmc_u16, llmc_u32, raw_u16, raw_u32 };
// llmc (reading) takes the width from the header; llmc_u16/llmc_u32 also require it.
// For writing, llmc means llmc_u16 when every token fits in 16 bits, else llmc_u32.

inline constexpr int32_t llmc_magic = 20240520;
inline constexpr int64_t llmc_header_ints = 256;
inline constexpr size_t llmc_header_bytes = llmc_header_ints * sizeof(int32_t);

// A read-only run of tokens of width 2 or 4 bytes; cheap to copy (shares the owner).
struct token_span {
  const void* data = nullptr;
  int width = 2;  // bytes per token: 2 or 4
  int64_t size = 0;
  std::shared_ptr<const void> owner;

  uint32_t operator[](int64_t i) const {
    return width == 2 ? static_cast<const uint16_t*>(data)[i] : static_cast<const uint32_t*>(data)[i];
  }
  // Copies an owned vector into a span (for text that was tokenized in memory).
  static token_span from_vector(std::vector<uint16_t> tokens);
  static token_span from_vector(std::vector<uint32_t> tokens);
};

class token_file {
 public:
  static token_file open(const std::string& path, token_format format = token_format::llmc, int64_t vocab_size = 0);

  const std::string& path() const { return path_; }
  const token_span& tokens() const { return tokens_; }
  int64_t size() const { return tokens_.size; }
  int width() const { return tokens_.width; }
  size_t data_offset() const { return data_offset_; }  // byte offset of token 0 in the file
  // Throws errc::out_of_range at the first token >= vocab_size (index, byte offset, value).
  void check_vocab(int64_t vocab_size) const;

 private:
  std::string path_;
  token_span tokens_;
  size_t data_offset_ = 0;
};

// Writes tokens in the given format (llmc picks the narrowest width that fits). Throws
// errc::out_of_range naming the index when a token does not fit a 16-bit format.
void token_file_write(const std::string& path, std::span<const uint32_t> tokens, token_format format);

}  // namespace troupe::parallel
