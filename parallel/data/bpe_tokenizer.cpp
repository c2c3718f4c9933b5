// parallel/data/bpe_tokenizer.cpp — HF tokenizer.json byte-level BPE: load, encode, decode.
//
// Pipeline of encode (the order of HF `tokenizers`):
//   added tokens split out of the raw text -> normalizer (NFC ...) -> pre-tokenizer
//   (Split regex / ByteLevel: regex split, then bytes -> GPT-2 unicode chars) -> BPE merges
//   per piece -> post-processor (TemplateProcessing: BOS ...).
// Regexes run on ICU (\p{L}, \p{N} for all of Unicode); \s and \S are written as
// \p{White_Space} / \P{White_Space}, Oniguruma's (HF's engine) meaning, which ICU documents
// differently ([\t\n\f\r\p{Z}]) even though ICU 72 behaves the same on \v and U+0085.
#include "parallel/data/bpe_tokenizer.h"

#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/regex.h>
#include <unicode/unistr.h>
#include <unicode/utf8.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>

#include "parallel/data/byte_tokenizer.h"
#include "runtime/error.h"

namespace troupe::parallel {

using json = nlohmann::json;
using runtime::errc;

// ---------------------------------------------------------------------------------------------
// UTF-8 helpers
// ---------------------------------------------------------------------------------------------
namespace {

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Length of the valid UTF-8 sequence starting at s[i] (1..4), or -k when the k bytes from i are
// a valid but incomplete prefix cut by the end of s, or 0 when s[i] starts an invalid sequence
// whose maximal valid subpart has `*consumed` bytes.
int utf8_step(std::string_view s, size_t i, size_t* consumed) {
  const auto b0 = static_cast<unsigned char>(s[i]);
  int need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (b0 < 0x80) return 1;
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 2;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 3;
    if (b0 == 0xE0) lo = 0xA0;
    if (b0 == 0xED) hi = 0x9F;
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 4;
    if (b0 == 0xF0) lo = 0x90;
    if (b0 == 0xF4) hi = 0x8F;
  } else {
    *consumed = 1;
    return 0;
  }
  size_t k = 1;
  for (; k < static_cast<size_t>(need); ++k) {
    if (i + k >= s.size()) return -static_cast<int>(k);
    const auto b = static_cast<unsigned char>(s[i + k]);
    const unsigned char l = (k == 1) ? lo : 0x80, h = (k == 1) ? hi : 0xBF;
    if (b < l || b > h) {
      *consumed = k;
      return 0;
    }
  }
  return need;
}

// Splits a valid UTF-8 string into its characters.
std::vector<std::string_view> utf8_chars(std::string_view s) {
  std::vector<std::string_view> out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    size_t consumed = 1;
    int n = utf8_step(s, i, &consumed);
    size_t len = n > 0 ? static_cast<size_t>(n) : (n < 0 ? s.size() - i : consumed);
    out.push_back(s.substr(i, len));
    i += len;
  }
  return out;
}

// GPT-2's reversible map of the 256 bytes onto printable unicode characters.
struct byte_unicode_map {
  std::array<std::string, 256> byte_to_str;
  std::unordered_map<uint32_t, uint8_t> cp_to_byte;
  byte_unicode_map() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      const uint32_t cp = printable ? static_cast<uint32_t>(b) : static_cast<uint32_t>(256 + n++);
      append_utf8(byte_to_str[b], cp);
      cp_to_byte[cp] = static_cast<uint8_t>(b);
    }
  }
};

const byte_unicode_map& byte_map() {
  static const byte_unicode_map m;
  return m;
}

std::string bytes_to_unicode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char c : bytes) out += byte_map().byte_to_str[static_cast<unsigned char>(c)];
  return out;
}

// One token's text back to bytes; a token with a char outside the map stays as its UTF-8 (HF).
std::string unicode_to_bytes(std::string_view tok) {
  std::string out;
  const auto& m = byte_map().cp_to_byte;
  for (size_t i = 0; i < tok.size();) {
    UChar32 cp;
    int32_t j = static_cast<int32_t>(i);
    U8_NEXT(reinterpret_cast<const uint8_t*>(tok.data()), j, static_cast<int32_t>(tok.size()), cp);
    auto it = cp < 0 ? m.end() : m.find(static_cast<uint32_t>(cp));
    if (it == m.end()) return std::string(tok);
    out.push_back(static_cast<char>(it->second));
    i = static_cast<size_t>(j);
  }
  return out;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  TROUPE_CHECK(in.good(), errc::not_found, "{}: cannot open tokenizer file", path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json parse_json_file(const std::string& path) {
  const std::string text = read_file(path);
  try {
    return json::parse(text);
  } catch (const json::parse_error& e) {
    TROUPE_THROW(errc::format, "{}: invalid JSON at byte {}: {}", path, e.byte, e.what());
  }
}

// JSON access that names file and path in its errors.
struct json_at {
  const json& j;
  const std::string& file;
  std::string path;

  json_at get(const std::string& key) const {
    TROUPE_CHECK(j.is_object(), errc::format, "{}: {}: expected an object, got {}", file, path, j.type_name());
    auto it = j.find(key);
    TROUPE_CHECK(it != j.end(), errc::format, "{}: {}.{}: missing", file, path, key);
    return json_at{*it, file, path + "." + key};
  }
  bool has(const std::string& key) const { return j.is_object() && j.contains(key) && !j.at(key).is_null(); }
  json_at at(size_t i) const { return json_at{j.at(i), file, fmt::format("{}[{}]", path, i)}; }
  std::string str() const {
    TROUPE_CHECK(j.is_string(), errc::format, "{}: {}: expected a string, got {}", file, path, j.type_name());
    return j.get<std::string>();
  }
  int64_t integer() const {
    TROUPE_CHECK(j.is_number_integer(), errc::format, "{}: {}: expected an integer, got {}", file, path,
                 j.type_name());
    return j.get<int64_t>();
  }
  bool boolean_or(const std::string& key, bool dflt) const {
    if (!has(key)) return dflt;
    const json& v = j.at(key);
    TROUPE_CHECK(v.is_boolean(), errc::format, "{}: {}.{}: expected true/false, got {}", file, path, key,
                 v.type_name());
    return v.get<bool>();
  }
  void expect_array() const {
    TROUPE_CHECK(j.is_array(), errc::format, "{}: {}: expected an array, got {}", file, path, j.type_name());
  }
};

// A special-token field of tokenizer_config.json: "<s>" or {"content": "<s>", ...}.
std::string token_field(const json& cfg, const char* key) {
  if (!cfg.is_object() || !cfg.contains(key)) return "";
  const json& v = cfg.at(key);
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v.at("content").is_string()) return v.at("content").get<std::string>();
  return "";
}

// Oniguruma's \s is Unicode White_Space; ICU documents [\t\n\f\r\p{Z}]. Pin the former.
std::string onig_to_icu(std::string_view pat) {
  std::string out;
  for (size_t i = 0; i < pat.size(); ++i) {
    if (pat[i] == '\\' && i + 1 < pat.size()) {
      const char c = pat[i + 1];
      if (c == 's') {
        out += "\\p{White_Space}";
      } else if (c == 'S') {
        out += "\\P{White_Space}";
      } else {
        out += pat.substr(i, 2);
      }
      ++i;
    } else {
      out.push_back(pat[i]);
    }
  }
  return out;
}

std::string icu_error_name(UErrorCode st) { return u_errorName(st); }

}  // namespace

std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  for (size_t i = 0; i < bytes.size();) {
    size_t consumed = 1;
    int n = utf8_step(bytes, i, &consumed);
    if (n > 0) {
      out.append(bytes.substr(i, static_cast<size_t>(n)));
      i += static_cast<size_t>(n);
    } else {
      out += "\xEF\xBF\xBD";
      i += n < 0 ? static_cast<size_t>(-n) : consumed;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The pipeline pieces
// ---------------------------------------------------------------------------------------------
enum class split_behavior { isolated, removed, merged_with_previous, merged_with_next, contiguous };

struct pretok_step {
  enum kind_t { split_regex, split_string, byte_level, digits } kind;
  std::shared_ptr<icu::RegexPattern> regex;  // split_regex, byte_level with use_regex
  std::string literal;                       // split_string
  split_behavior behavior = split_behavior::isolated;
  bool invert = false;
  bool add_prefix_space = false;   // byte_level
  bool individual_digits = false;  // digits
};

struct added_token {
  std::string content;
  int32_t id;
  bool special, lstrip, rstrip, single_word;
};

struct bpe_tokenizer::impl {
  std::string file;
  // model
  std::unordered_map<std::string, int32_t> vocab;
  std::vector<std::string> id_to_tok;  // vocab + added tokens by id
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a<<32|b) -> (rank, merged id)
  std::optional<int32_t> unk_id;
  bool ignore_merges = false;
  bool byte_fallback_map = false;  // ByteLevel in the pre-tokenizer: pieces are byte-mapped
  bool byte_level_decoder = false;
  // normalizers (ICU instances are process-lifetime singletons)
  std::vector<const icu::Normalizer2*> normalizers;
  std::vector<pretok_step> pretok;
  // added tokens
  std::vector<added_token> added;
  std::unordered_map<int32_t, size_t> added_by_id;
  std::array<std::vector<size_t>, 256> added_by_first_byte;  // longest first
  // post-processor
  std::vector<int32_t> prefix_ids, suffix_ids;

  void load_model(const json_at& m);
  void load_normalizer(const json_at& n);
  void load_pretokenizer(const json_at& p);
  void load_post_processor(const json_at& p);
  void load_decoder(const json_at& d);

  std::string normalize(std::string s) const;
  std::vector<std::string> pre_tokenize(std::string s) const;
  void bpe_word(std::string_view piece, std::vector<int32_t>& out) const;
  void encode_segment(std::string_view seg, std::vector<int32_t>& out) const;
};

namespace {

std::shared_ptr<icu::RegexPattern> compile_regex(const std::string& pat, const std::string& file,
                                                 const std::string& path) {
  UErrorCode st = U_ZERO_ERROR;
  UParseError pe;
  const std::string icu_pat = onig_to_icu(pat);
  std::shared_ptr<icu::RegexPattern> re(
      icu::RegexPattern::compile(icu::UnicodeString::fromUTF8(icu_pat), 0, pe, st));
  TROUPE_CHECK(U_SUCCESS(st) && re, errc::format, "{}: {}: regex does not compile ({} at offset {}): {}", file, path,
               icu_error_name(st), pe.offset, pat);
  return re;
}

split_behavior parse_behavior(const json_at& b) {
  const std::string s = b.str();
  if (s == "Isolated") return split_behavior::isolated;
  if (s == "Removed") return split_behavior::removed;
  if (s == "MergedWithPrevious") return split_behavior::merged_with_previous;
  if (s == "MergedWithNext") return split_behavior::merged_with_next;
  if (s == "Contiguous") return split_behavior::contiguous;
  TROUPE_THROW(errc::unsupported, "{}: {}: unknown split behavior '{}'", b.file, b.path, s);
}

const std::shared_ptr<icu::RegexPattern>& gpt2_regex() {
  static const std::string file = "<builtin>";
  static const std::shared_ptr<icu::RegexPattern> re = compile_regex(
      R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)", file, "gpt2 regex");
  return re;
}

// (piece, is_match) spans of s for the matches of re.
std::vector<std::pair<std::string, bool>> regex_spans(const icu::RegexPattern& re, const std::string& s) {
  std::vector<std::pair<std::string, bool>> out;
  icu::UnicodeString u = icu::UnicodeString::fromUTF8(s);
  // UTF-16 index -> UTF-8 byte offset.
  std::vector<size_t> off(static_cast<size_t>(u.length()) + 1, s.size());
  {
    size_t b = 0;
    int32_t k = 0;
    while (k < u.length()) {
      off[static_cast<size_t>(k)] = b;
      const UChar32 cp = u.char32At(k);
      const int32_t n16 = U16_LENGTH(cp);
      if (n16 == 2) off[static_cast<size_t>(k) + 1] = b;
      b += static_cast<size_t>(U8_LENGTH(cp));
      k += n16;
    }
  }
  UErrorCode st = U_ZERO_ERROR;
  std::unique_ptr<icu::RegexMatcher> m(re.matcher(u, st));
  TROUPE_CHECK(U_SUCCESS(st), errc::internal, "bpe_tokenizer: regex matcher failed: {}", icu_error_name(st));
  size_t prev = 0;
  while (m->find(st) && U_SUCCESS(st)) {
    const size_t a = off[static_cast<size_t>(m->start(st))], e = off[static_cast<size_t>(m->end(st))];
    if (e == a) continue;
    if (a > prev) out.emplace_back(s.substr(prev, a - prev), false);
    out.emplace_back(s.substr(a, e - a), true);
    prev = e;
  }
  TROUPE_CHECK(U_SUCCESS(st), errc::internal, "bpe_tokenizer: regex search failed: {}", icu_error_name(st));
  if (prev < s.size()) out.emplace_back(s.substr(prev), false);
  return out;
}

std::vector<std::pair<std::string, bool>> literal_spans(const std::string& lit, const std::string& s) {
  std::vector<std::pair<std::string, bool>> out;
  if (lit.empty()) return {{s, false}};
  size_t prev = 0, pos;
  while ((pos = s.find(lit, prev)) != std::string::npos) {
    if (pos > prev) out.emplace_back(s.substr(prev, pos - prev), false);
    out.emplace_back(lit, true);
    prev = pos + lit.size();
  }
  if (prev < s.size()) out.emplace_back(s.substr(prev), false);
  return out;
}

// HF SplitDelimiterBehavior applied to (piece, is_delimiter) spans.
void apply_behavior(std::vector<std::pair<std::string, bool>> spans, split_behavior b, bool invert,
                    std::vector<std::string>& out) {
  if (invert)
    for (auto& s : spans) s.second = !s.second;
  switch (b) {
    case split_behavior::isolated:
      for (auto& s : spans) out.push_back(std::move(s.first));
      break;
    case split_behavior::removed:
      for (auto& s : spans)
        if (!s.second) out.push_back(std::move(s.first));
      break;
    case split_behavior::merged_with_previous: {
      bool prev_plain = false;
      for (auto& s : spans) {
        if (s.second && prev_plain) {
          out.back() += s.first;
          prev_plain = false;
        } else {
          out.push_back(std::move(s.first));
          prev_plain = !s.second;
        }
      }
      break;
    }
    case split_behavior::merged_with_next: {
      bool carry = false;
      for (auto& s : spans) {
        if (carry) {
          out.back() += s.first;
        } else {
          out.push_back(std::move(s.first));
        }
        carry = s.second;
      }
      break;
    }
    case split_behavior::contiguous: {
      bool prev_match = false;
      for (auto& s : spans) {
        if (s.second && prev_match) {
          out.back() += s.first;
        } else {
          out.push_back(std::move(s.first));
        }
        prev_match = s.second;
      }
      break;
    }
  }
}

}  // namespace

void bpe_tokenizer::impl::load_model(const json_at& m) {
  const std::string type = m.has("type") ? m.get("type").str() : "BPE";
  TROUPE_CHECK(type == "BPE", errc::unsupported, "{}: {}.type: '{}' is not supported (only BPE)", file, m.path, type);
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (m.has(k)) {
      const json_at v = m.get(k);
      TROUPE_CHECK(v.j.is_string() && v.j.get<std::string>().empty(), errc::unsupported,
                   "{}: {}: a BPE subword prefix/suffix is not supported", file, v.path);
    }
  }
  ignore_merges = m.boolean_or("ignore_merges", false);
  const json_at v = m.get("vocab");
  TROUPE_CHECK(v.j.is_object(), errc::format, "{}: {}: expected an object token -> id", file, v.path);
  int32_t max_id = -1;
  for (auto it = v.j.begin(); it != v.j.end(); ++it) {
    TROUPE_CHECK(it.value().is_number_integer() && it.value().get<int64_t>() >= 0, errc::format,
                 "{}: {}[\"{}\"]: expected a non-negative integer id", file, v.path, it.key());
    const auto id = static_cast<int32_t>(it.value().get<int64_t>());
    vocab[it.key()] = id;
    max_id = std::max(max_id, id);
  }
  id_to_tok.resize(static_cast<size_t>(max_id + 1));
  for (const auto& [tok, id] : vocab) id_to_tok[static_cast<size_t>(id)] = tok;
  const json_at mg = m.get("merges");
  mg.expect_array();
  for (size_t r = 0; r < mg.j.size(); ++r) {
    const json_at e = mg.at(r);
    std::string a, b;
    if (e.j.is_string()) {
      const std::string s = e.j.get<std::string>();
      const size_t sp = s.find(' ', 1);
      TROUPE_CHECK(sp != std::string::npos, errc::format, "{}: {}: merge '{}' is not 'a b'", file, e.path, s);
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else {
      TROUPE_CHECK(e.j.is_array() && e.j.size() == 2, errc::format, "{}: {}: a merge is \"a b\" or [a, b]", file,
                   e.path);
      a = e.at(0).str();
      b = e.at(1).str();
    }
    auto ia = vocab.find(a), ib = vocab.find(b), ic = vocab.find(a + b);
    TROUPE_CHECK(ia != vocab.end() && ib != vocab.end(), errc::format, "{}: {}: merge part '{}' is not in the vocab",
                 file, e.path, ia == vocab.end() ? a : b);
    TROUPE_CHECK(ic != vocab.end(), errc::format, "{}: {}: merged token '{}' is not in the vocab", file, e.path, a + b);
    const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(ia->second)) << 32) |
                         static_cast<uint32_t>(ib->second);
    merges.emplace(key, std::make_pair(static_cast<int32_t>(r), ic->second));  // first (lowest) rank wins
  }
  if (m.has("unk_token")) {
    const std::string unk = m.get("unk_token").str();
    auto it = vocab.find(unk);
    if (it != vocab.end()) unk_id = it->second;
  }
}

void bpe_tokenizer::impl::load_normalizer(const json_at& n) {
  if (n.j.is_null()) return;
  const std::string type = n.get("type").str();
  if (type == "Sequence") {
    const json_at list = n.get("normalizers");
    list.expect_array();
    for (size_t i = 0; i < list.j.size(); ++i) load_normalizer(list.at(i));
    return;
  }
  UErrorCode st = U_ZERO_ERROR;
  const icu::Normalizer2* norm = nullptr;
  if (type == "NFC") norm = icu::Normalizer2::getNFCInstance(st);
  else if (type == "NFD") norm = icu::Normalizer2::getNFDInstance(st);
  else if (type == "NFKC") norm = icu::Normalizer2::getNFKCInstance(st);
  else if (type == "NFKD") norm = icu::Normalizer2::getNFKDInstance(st);
  else TROUPE_THROW(errc::unsupported, "{}: {}.type: normalizer '{}' is not supported (NFC/NFD/NFKC/NFKD/Sequence)",
                    file, n.path, type);
  TROUPE_CHECK(U_SUCCESS(st) && norm, errc::internal, "ICU normalizer {}: {}", type, icu_error_name(st));
  normalizers.push_back(norm);
}

void bpe_tokenizer::impl::load_pretokenizer(const json_at& p) {
  if (p.j.is_null()) return;
  const std::string type = p.get("type").str();
  if (type == "Sequence") {
    const json_at list = p.get("pretokenizers");
    list.expect_array();
    for (size_t i = 0; i < list.j.size(); ++i) load_pretokenizer(list.at(i));
  } else if (type == "Split") {
    pretok_step s{};
    const json_at pat = p.get("pattern");
    if (pat.has("Regex")) {
      s.kind = pretok_step::split_regex;
      s.regex = compile_regex(pat.get("Regex").str(), file, pat.path + ".Regex");
    } else {
      s.kind = pretok_step::split_string;
      s.literal = pat.get("String").str();
    }
    s.behavior = parse_behavior(p.get("behavior"));
    s.invert = p.boolean_or("invert", false);
    pretok.push_back(std::move(s));
  } else if (type == "ByteLevel") {
    pretok_step s{};
    s.kind = pretok_step::byte_level;
    s.add_prefix_space = p.boolean_or("add_prefix_space", false);
    if (p.boolean_or("use_regex", true)) s.regex = gpt2_regex();
    pretok.push_back(std::move(s));
    byte_fallback_map = true;
  } else if (type == "Digits") {
    pretok_step s{};
    s.kind = pretok_step::digits;
    s.individual_digits = p.boolean_or("individual_digits", false);
    pretok.push_back(std::move(s));
  } else {
    TROUPE_THROW(errc::unsupported,
                 "{}: {}.type: pre-tokenizer '{}' is not supported (ByteLevel, Split, Digits, Sequence)", file, p.path,
                 type);
  }
}

void bpe_tokenizer::impl::load_post_processor(const json_at& p) {
  if (p.j.is_null()) return;
  const std::string type = p.get("type").str();
  if (type == "Sequence") {
    const json_at list = p.get("processors");
    list.expect_array();
    for (size_t i = 0; i < list.j.size(); ++i) load_post_processor(list.at(i));
  } else if (type == "TemplateProcessing") {
    const json_at single = p.get("single");
    single.expect_array();
    const json_at specials = p.get("special_tokens");
    bool seen_seq = false;
    for (size_t i = 0; i < single.j.size(); ++i) {
      const json_at item = single.at(i);
      if (item.has("Sequence")) {
        seen_seq = true;
        continue;
      }
      const std::string name = item.get("SpecialToken").get("id").str();
      const json_at ids = specials.get(name).get("ids");
      ids.expect_array();
      for (size_t k = 0; k < ids.j.size(); ++k)
        (seen_seq ? suffix_ids : prefix_ids).push_back(static_cast<int32_t>(ids.at(k).integer()));
    }
  } else if (type != "ByteLevel") {
    TROUPE_THROW(errc::unsupported,
                 "{}: {}.type: post-processor '{}' is not supported (TemplateProcessing, ByteLevel, Sequence)", file,
                 p.path, type);
  }
}

void bpe_tokenizer::impl::load_decoder(const json_at& d) {
  if (d.j.is_null()) return;
  const std::string type = d.get("type").str();
  if (type == "Sequence") {
    const json_at list = d.get("decoders");
    list.expect_array();
    for (size_t i = 0; i < list.j.size(); ++i) load_decoder(list.at(i));
  } else if (type == "ByteLevel") {
    byte_level_decoder = true;
  } else {
    TROUPE_THROW(errc::unsupported, "{}: {}.type: decoder '{}' is not supported (ByteLevel, Sequence)", file, d.path,
                 type);
  }
}

std::string bpe_tokenizer::impl::normalize(std::string s) const {
  for (const icu::Normalizer2* n : normalizers) {
    UErrorCode st = U_ZERO_ERROR;
    icu::UnicodeString u = icu::UnicodeString::fromUTF8(s);
    icu::UnicodeString r = n->normalize(u, st);
    TROUPE_CHECK(U_SUCCESS(st), errc::internal, "bpe_tokenizer: normalization failed: {}", icu_error_name(st));
    s.clear();
    r.toUTF8String(s);
  }
  return s;
}

std::vector<std::string> bpe_tokenizer::impl::pre_tokenize(std::string s) const {
  std::vector<std::string> pieces{std::move(s)};
  for (const pretok_step& step : pretok) {
    std::vector<std::string> next;
    for (std::string& p : pieces) {
      switch (step.kind) {
        case pretok_step::split_regex:
          apply_behavior(regex_spans(*step.regex, p), step.behavior, step.invert, next);
          break;
        case pretok_step::split_string:
          apply_behavior(literal_spans(step.literal, p), step.behavior, step.invert, next);
          break;
        case pretok_step::digits: {
          // Digits: runs of ASCII-or-Unicode decimal digits isolated (or one digit per piece).
          std::vector<std::pair<std::string, bool>> spans;
          for (std::string_view ch : utf8_chars(p)) {
            UChar32 cp;
            int32_t j = 0;
            U8_NEXT(reinterpret_cast<const uint8_t*>(ch.data()), j, static_cast<int32_t>(ch.size()), cp);
            const bool dig = cp >= 0 && u_isdigit(cp);
            if (!spans.empty() && spans.back().second == dig && !(dig && step.individual_digits))
              spans.back().first += ch;
            else
              spans.emplace_back(std::string(ch), dig);
          }
          for (auto& sp : spans) next.push_back(std::move(sp.first));
          break;
        }
        case pretok_step::byte_level: {
          if (step.add_prefix_space && (p.empty() || p[0] != ' ')) p.insert(p.begin(), ' ');
          std::vector<std::string> parts;
          if (step.regex)
            apply_behavior(regex_spans(*step.regex, p), split_behavior::isolated, false, parts);
          else
            parts.push_back(std::move(p));
          for (auto& part : parts) next.push_back(bytes_to_unicode(part));
          break;
        }
      }
    }
    pieces = std::move(next);
  }
  if (pretok.empty() && byte_level_decoder) {
    // A byte-level decoder without a ByteLevel pre-tokenizer still maps bytes.
    for (auto& p : pieces) p = bytes_to_unicode(p);
  }
  pieces.erase(std::remove_if(pieces.begin(), pieces.end(), [](const std::string& x) { return x.empty(); }),
               pieces.end());
  return pieces;
}

// BPE on one pre-tokenized piece: merge the lowest-rank adjacent pair (leftmost on ties) until
// none is left (HF's Word::merge_all with a priority queue).
void bpe_tokenizer::impl::bpe_word(std::string_view piece, std::vector<int32_t>& out) const {
  if (ignore_merges) {
    auto it = vocab.find(std::string(piece));
    if (it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  struct sym {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  std::vector<sym> syms;
  for (std::string_view ch : utf8_chars(piece)) {
    auto it = vocab.find(std::string(ch));
    if (it != vocab.end()) {
      syms.push_back({it->second, 0, 0, true});
    } else if (unk_id) {
      syms.push_back({*unk_id, 0, 0, true});
    }
  }
  const auto n = static_cast<int32_t>(syms.size());
  for (int32_t i = 0; i < n; ++i) {
    syms[static_cast<size_t>(i)].prev = i - 1;
    syms[static_cast<size_t>(i)].next = i + 1 < n ? i + 1 : -1;
  }
  struct cand {
    int32_t rank, pos, left_id, right_id, new_id;
    bool operator>(const cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<cand, std::vector<cand>, std::greater<cand>> q;
  auto push_pair = [&](int32_t i) {
    if (i < 0) return;
    const int32_t j = syms[static_cast<size_t>(i)].next;
    if (j < 0) return;
    const uint64_t key = (static_cast<uint64_t>(static_cast<uint32_t>(syms[static_cast<size_t>(i)].id)) << 32) |
                         static_cast<uint32_t>(syms[static_cast<size_t>(j)].id);
    auto it = merges.find(key);
    if (it != merges.end())
      q.push({it->second.first, i, syms[static_cast<size_t>(i)].id, syms[static_cast<size_t>(j)].id,
              it->second.second});
  };
  for (int32_t i = 0; i + 1 < n; ++i) push_pair(i);
  while (!q.empty()) {
    const cand c = q.top();
    q.pop();
    sym& l = syms[static_cast<size_t>(c.pos)];
    if (!l.alive || l.id != c.left_id || l.next < 0) continue;
    sym& r = syms[static_cast<size_t>(l.next)];
    if (!r.alive || r.id != c.right_id) continue;
    l.id = c.new_id;
    r.alive = false;
    l.next = r.next;
    if (r.next >= 0) syms[static_cast<size_t>(r.next)].prev = c.pos;
    push_pair(l.prev);
    push_pair(c.pos);
  }
  for (int32_t i = n > 0 ? 0 : -1; i >= 0; i = syms[static_cast<size_t>(i)].next)
    out.push_back(syms[static_cast<size_t>(i)].id);
}

void bpe_tokenizer::impl::encode_segment(std::string_view seg, std::vector<int32_t>& out) const {
  if (seg.empty()) return;
  for (const std::string& piece : pre_tokenize(normalize(std::string(seg)))) bpe_word(piece, out);
}

// ---------------------------------------------------------------------------------------------
// bpe_tokenizer
// ---------------------------------------------------------------------------------------------
bpe_tokenizer::bpe_tokenizer() : impl_(std::make_unique<impl>()) {}
bpe_tokenizer::~bpe_tokenizer() = default;

std::unique_ptr<bpe_tokenizer> bpe_tokenizer::load(const std::string& model_dir) {
  namespace fs = std::filesystem;
  const fs::path dir(model_dir);
  const fs::path tj = dir / "tokenizer.json", tc = dir / "tokenizer_config.json", gc = dir / "generation_config.json";
  TROUPE_CHECK(fs::exists(tj), errc::not_found, "{}: no tokenizer.json in the model directory", tj.string());
  return load_files(tj.string(), fs::exists(tc) ? tc.string() : "", fs::exists(gc) ? gc.string() : "");
}

std::unique_ptr<bpe_tokenizer> bpe_tokenizer::load_files(const std::string& tokenizer_json,
                                                         const std::string& tokenizer_config_json,
                                                         const std::string& generation_config_json) {
  std::unique_ptr<bpe_tokenizer> t(new bpe_tokenizer());
  impl& im = *t->impl_;
  im.file = tokenizer_json;
  const json root = parse_json_file(tokenizer_json);
  const json_at r{root, im.file, "$"};
  TROUPE_CHECK(root.is_object(), errc::format, "{}: $: expected a JSON object", im.file);
  im.load_model(r.get("model"));
  if (r.has("normalizer")) im.load_normalizer(r.get("normalizer"));
  if (r.has("pre_tokenizer")) im.load_pretokenizer(r.get("pre_tokenizer"));
  if (r.has("post_processor")) im.load_post_processor(r.get("post_processor"));
  if (r.has("decoder")) im.load_decoder(r.get("decoder"));
  TROUPE_CHECK(im.byte_fallback_map || im.byte_level_decoder, errc::unsupported,
               "{}: $.pre_tokenizer: no ByteLevel pre-tokenizer or decoder; only byte-level BPE is supported", im.file);

  if (r.has("added_tokens")) {
    const json_at list = r.get("added_tokens");
    list.expect_array();
    for (size_t i = 0; i < list.j.size(); ++i) {
      const json_at a = list.at(i);
      added_token tok{a.get("content").str(), static_cast<int32_t>(a.get("id").integer()),
                      a.boolean_or("special", false), a.boolean_or("lstrip", false), a.boolean_or("rstrip", false),
                      a.boolean_or("single_word", false)};
      TROUPE_CHECK(!tok.content.empty() && tok.id >= 0, errc::format, "{}: {}: empty content or negative id", im.file,
                   a.path);
      if (static_cast<size_t>(tok.id) >= im.id_to_tok.size()) im.id_to_tok.resize(static_cast<size_t>(tok.id) + 1);
      im.id_to_tok[static_cast<size_t>(tok.id)] = tok.content;
      im.vocab[tok.content] = tok.id;
      im.added_by_id[tok.id] = im.added.size();
      im.added.push_back(std::move(tok));
    }
    for (size_t i = 0; i < im.added.size(); ++i)
      im.added_by_first_byte[static_cast<unsigned char>(im.added[i].content[0])].push_back(i);
    for (auto& v : im.added_by_first_byte)
      std::stable_sort(v.begin(), v.end(),
                       [&](size_t a, size_t b) { return im.added[a].content.size() > im.added[b].content.size(); });
  }

  // tokenizer_config.json: bos/eos strings, chat template, add_bos_token.
  auto id_of = [&](const std::string& s) -> std::optional<int32_t> {
    auto it = im.vocab.find(s);
    if (it == im.vocab.end()) return std::nullopt;
    return it->second;
  };
  if (!tokenizer_config_json.empty()) {
    const json cfg = parse_json_file(tokenizer_config_json);
    TROUPE_CHECK(cfg.is_object(), errc::format, "{}: $: expected a JSON object", tokenizer_config_json);
    t->bos_token_ = token_field(cfg, "bos_token");
    t->eos_token_ = token_field(cfg, "eos_token");
    if (!t->bos_token_.empty()) {
      t->bos_id_ = id_of(t->bos_token_);
      TROUPE_CHECK(t->bos_id_.has_value(), errc::format, "{}: $.bos_token: '{}' is not a token of {}",
                   tokenizer_config_json, t->bos_token_, im.file);
    }
    if (!t->eos_token_.empty()) {
      auto e = id_of(t->eos_token_);
      TROUPE_CHECK(e.has_value(), errc::format, "{}: $.eos_token: '{}' is not a token of {}", tokenizer_config_json,
                   t->eos_token_, im.file);
      t->eos_ids_.push_back(*e);
    }
    if (cfg.contains("chat_template")) {
      const json& ct = cfg.at("chat_template");
      if (ct.is_string()) {
        t->chat_template_ = ct.get<std::string>();
      } else if (ct.is_array()) {
        for (const json& e : ct)
          if (e.is_object() && e.value("name", "") == "default" && e.contains("template") &&
              e.at("template").is_string())
            t->chat_template_ = e.at("template").get<std::string>();
      }
    }
    const bool add_bos = cfg.contains("add_bos_token") && cfg.at("add_bos_token").is_boolean() &&
                         cfg.at("add_bos_token").get<bool>();
    const bool add_eos = cfg.contains("add_eos_token") && cfg.at("add_eos_token").is_boolean() &&
                         cfg.at("add_eos_token").get<bool>();
    if (im.prefix_ids.empty() && im.suffix_ids.empty()) {
      if (add_bos && t->bos_id_) im.prefix_ids.push_back(*t->bos_id_);
      if (add_eos && !t->eos_ids_.empty()) im.suffix_ids.push_back(t->eos_ids_.front());
    }
  }
  if (!generation_config_json.empty()) {
    const json gen = parse_json_file(generation_config_json);
    if (gen.is_object() && gen.contains("eos_token_id")) {
      const json& e = gen.at("eos_token_id");
      std::vector<int32_t> ids;
      if (e.is_number_integer()) ids.push_back(e.get<int32_t>());
      else if (e.is_array())
        for (size_t i = 0; i < e.size(); ++i) {
          TROUPE_CHECK(e[i].is_number_integer(), errc::format, "{}: $.eos_token_id[{}]: expected an integer id",
                       generation_config_json, i);
          ids.push_back(e[i].get<int32_t>());
        }
      else TROUPE_THROW(errc::format, "{}: $.eos_token_id: expected an id or a list of ids", generation_config_json);
      for (int32_t id : ids)
        if (std::find(t->eos_ids_.begin(), t->eos_ids_.end(), id) == t->eos_ids_.end()) t->eos_ids_.push_back(id);
    }
    if (!t->bos_id_ && gen.is_object() && gen.contains("bos_token_id") && gen.at("bos_token_id").is_number_integer())
      t->bos_id_ = gen.at("bos_token_id").get<int32_t>();
  }
  return t;
}

std::vector<int32_t> bpe_tokenizer::encode(std::string_view text, bool add_special) const {
  const impl& im = *impl_;
  std::vector<int32_t> out;
  if (add_special) out = im.prefix_ids;
  auto is_ws = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; };
  auto is_word = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  size_t seg_start = 0, i = 0;
  while (i < text.size()) {
    const added_token* hit = nullptr;
    for (size_t k : im.added_by_first_byte[static_cast<unsigned char>(text[i])]) {
      const added_token& a = im.added[k];
      if (text.compare(i, a.content.size(), a.content) != 0) continue;
      if (a.single_word && ((i > 0 && is_word(text[i - 1])) ||
                            (i + a.content.size() < text.size() && is_word(text[i + a.content.size()]))))
        continue;
      hit = &a;
      break;
    }
    if (!hit) {
      ++i;
      continue;
    }
    size_t a0 = i, a1 = i + hit->content.size();
    if (hit->lstrip)
      while (a0 > seg_start && is_ws(text[a0 - 1])) --a0;
    if (hit->rstrip)
      while (a1 < text.size() && is_ws(text[a1])) ++a1;
    im.encode_segment(text.substr(seg_start, a0 - seg_start), out);
    out.push_back(hit->id);
    seg_start = i = a1;
  }
  im.encode_segment(text.substr(seg_start), out);
  if (add_special) out.insert(out.end(), im.suffix_ids.begin(), im.suffix_ids.end());
  return out;
}

std::string bpe_tokenizer::token_bytes(int32_t id, bool skip_special) const {
  const impl& im = *impl_;
  TROUPE_CHECK(id >= 0 && static_cast<size_t>(id) < im.id_to_tok.size(), errc::out_of_range,
               "bpe_tokenizer: id {} is outside the vocabulary [0, {}) of {}", id, im.id_to_tok.size(), im.file);
  auto it = im.added_by_id.find(id);
  if (it != im.added_by_id.end() && im.added[it->second].special && skip_special) return "";
  return unicode_to_bytes(im.id_to_tok[static_cast<size_t>(id)]);
}

std::string bpe_tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string bytes;
  for (int32_t id : ids) bytes += token_bytes(id, skip_special);
  return utf8_lossy(bytes);
}

bool bpe_tokenizer::is_special(int32_t id) const {
  auto it = impl_->added_by_id.find(id);
  return it != impl_->added_by_id.end() && impl_->added[it->second].special;
}

int64_t bpe_tokenizer::vocab_size() const { return static_cast<int64_t>(impl_->id_to_tok.size()); }

std::optional<int32_t> bpe_tokenizer::token_to_id(std::string_view token) const {
  auto it = impl_->vocab.find(std::string(token));
  if (it == impl_->vocab.end()) return std::nullopt;
  return it->second;
}

std::string bpe_tokenizer::id_to_token(int32_t id) const {
  TROUPE_CHECK(id >= 0 && static_cast<size_t>(id) < impl_->id_to_tok.size(), errc::out_of_range,
               "bpe_tokenizer: id {} is outside the vocabulary [0, {}) of {}", id, impl_->id_to_tok.size(),
               impl_->file);
  return impl_->id_to_tok[static_cast<size_t>(id)];
}

// ---------------------------------------------------------------------------------------------
// byte_text_tokenizer, load_tokenizer, token_stream_decoder
// ---------------------------------------------------------------------------------------------
std::vector<int32_t> byte_text_tokenizer::encode(std::string_view text, bool /*add_special*/) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size());
  for (char c : text) ids.push_back(static_cast<unsigned char>(c));
  return ids;
}

std::string byte_text_tokenizer::token_bytes(int32_t id, bool skip_special) const {
  TROUPE_CHECK(id >= 0 && id < byte_vocab_size, errc::out_of_range,
               "byte tokenizer: id {} is outside the byte vocabulary [0, {})", id, byte_vocab_size);
  if (id < 256) return std::string(1, static_cast<char>(static_cast<unsigned char>(id)));
  if (skip_special) return "";
  return id == static_cast<int32_t>(byte_bos_id) ? bos_str_ : eos_str_;
}

std::string byte_text_tokenizer::decode(std::span<const int32_t> ids, bool skip_special) const {
  std::string bytes;
  for (int32_t id : ids) bytes += token_bytes(id, skip_special);
  return utf8_lossy(bytes);
}

bool byte_text_tokenizer::is_special(int32_t id) const { return id >= 256 && id < byte_vocab_size; }
int64_t byte_text_tokenizer::vocab_size() const { return byte_vocab_size; }
std::optional<int32_t> byte_text_tokenizer::bos_id() const { return static_cast<int32_t>(byte_bos_id); }

std::optional<int32_t> byte_text_tokenizer::token_to_id(std::string_view token) const {
  if (token.size() == 1) return static_cast<unsigned char>(token[0]);
  if (token == bos_str_) return static_cast<int32_t>(byte_bos_id);
  if (token == eos_str_) return static_cast<int32_t>(byte_eos_id);
  return std::nullopt;
}

std::string byte_text_tokenizer::id_to_token(int32_t id) const { return token_bytes(id, false); }

std::unique_ptr<text_tokenizer> load_tokenizer(const std::string& model_dir) {
  if (std::filesystem::exists(std::filesystem::path(model_dir) / "tokenizer.json"))
    return bpe_tokenizer::load(model_dir);
  return std::make_unique<byte_text_tokenizer>();
}

std::string token_stream_decoder::push(int32_t id) {
  pending_ += tok_->token_bytes(id, skip_special_);
  // Hold back a trailing valid-but-incomplete UTF-8 sequence; emit the rest.
  size_t keep_from = pending_.size();
  for (size_t back = 1; back <= 3 && back <= pending_.size(); ++back) {
    const size_t i = pending_.size() - back;
    const auto b = static_cast<unsigned char>(pending_[i]);
    if ((b & 0xC0) == 0x80) continue;  // continuation byte: look further back
    size_t consumed = 1;
    if (utf8_step(pending_, i, &consumed) < 0) keep_from = i;
    break;
  }
  std::string out = utf8_lossy(std::string_view(pending_).substr(0, keep_from));
  pending_.erase(0, keep_from);
  return out;
}

std::string token_stream_decoder::finish() {
  std::string out = utf8_lossy(pending_);
  pending_.clear();
  return out;
}

}  // namespace troupe::parallel
