// parallel/data/byte_tokenizer.cpp — byte-level encode/decode and document packing.
#include "parallel/data/byte_tokenizer.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "runtime/error.h"

namespace troupe::parallel {

using runtime::errc;

std::vector<uint16_t> byte_encode(std::string_view text, bool add_bos, bool add_eos) {
  std::vector<uint16_t> ids;
  ids.reserve(text.size() + 2);
  if (add_bos) ids.push_back(static_cast<uint16_t>(byte_bos_id));
  for (char c : text) ids.push_back(static_cast<uint16_t>(static_cast<unsigned char>(c)));
  if (add_eos) ids.push_back(static_cast<uint16_t>(byte_eos_id));
  return ids;
}

template <typename Id>
static std::string decode_ids(std::span<const Id> ids) {
  std::string out;
  out.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t id = static_cast<int64_t>(ids[i]);
    TROUPE_CHECK(id >= 0 && id < byte_vocab_size, errc::out_of_range,
                 "byte_decode: id {} at index {} is outside the byte vocabulary [0, {})", id, i, byte_vocab_size);
    if (id < 256) out.push_back(static_cast<char>(static_cast<unsigned char>(id)));
  }
  return out;
}

std::string byte_decode(std::span<const uint16_t> ids) { return decode_ids(ids); }
std::string byte_decode(std::span<const int32_t> ids) { return decode_ids(ids); }

token_span byte_tokenize_documents(const std::vector<std::string_view>& docs, bool eos_after_last) {
  size_t total = 0;
  for (auto d : docs) total += d.size() + 1;
  std::vector<uint16_t> ids;
  ids.reserve(total);
  for (size_t i = 0; i < docs.size(); ++i) {
    for (char c : docs[i]) ids.push_back(static_cast<uint16_t>(static_cast<unsigned char>(c)));
    if (i + 1 < docs.size() || eos_after_last) ids.push_back(static_cast<uint16_t>(byte_eos_id));
  }
  return token_span::from_vector(std::move(ids));
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TROUPE_CHECK(in.good(), errno == ENOENT ? errc::not_found : errc::io, "{}: cannot open text file: {}", path,
               std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  TROUPE_CHECK(!in.bad(), errc::io, "{}: read failed", path);
  return ss.str();
}

}  // namespace troupe::parallel
