// parallel/data/byte_tokenizer.h — the byte-level tokenizer for raw text: one token per byte.
//
//   std::vector<uint16_t> ids = byte_encode(text);                 // 'A' -> 65
//   std::string back = byte_decode(ids);                           // == text, for any bytes
//   token_span s = byte_tokenize_documents({doc_a, doc_b});        // a <EOS> b <EOS>
//
// Invariants:
//   1. Token ids 0..255 are the bytes themselves; 256 is BOS and 257 is EOS. The vocabulary
//      is always byte_vocab_size = 258, whether or not the specials are used, so a model
//      made for byte-level text has 258 embedding rows.
//   2. decode(encode(x)) == x for every byte string, including NUL and invalid UTF-8.
//   3. decode drops BOS/EOS; an id >= 258 throws errc::out_of_range naming its index.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "parallel/data/token_file.h"

namespace troupe::parallel {

inline constexpr uint32_t byte_bos_id = 256;
inline constexpr uint32_t byte_eos_id = 257;
inline constexpr int64_t byte_vocab_size = 258;

std::vector<uint16_t> byte_encode(std::string_view text, bool add_bos = false, bool add_eos = false);
std::string byte_decode(std::span<const uint16_t> ids);
std::string byte_decode(std::span<const int32_t> ids);

// Documents packed end to end, each followed by EOS (the separator a model learns to
// predict at a document's end); a single document gets no EOS when eos_after_last is false.
token_span byte_tokenize_documents(const std::vector<std::string_view>& docs, bool eos_after_last = true);

// Reads a whole text file (errors name the file).
std::string read_text_file(const std::string& path);

}  // namespace troupe::parallel
