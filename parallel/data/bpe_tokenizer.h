// parallel/data/bpe_tokenizer.h — text tokenizers for serving: HF tokenizer.json byte-level BPE
// (GPT-2, Llama-3, Qwen2 files) and the examples' byte tokenizer behind one interface.
//
//   std::unique_ptr<text_tokenizer> tok = load_tokenizer("models/llama3");  // tokenizer.json, else bytes
//   std::vector<int32_t> ids = tok->encode("Hello world", /*add_special=*/true);  // BOS + ids
//   std::string text = tok->decode(ids);                                 // specials skipped
//   token_stream_decoder sd(*tok);                                       // for SSE streaming
//   for (int32_t id : ids) send(sd.push(id));                            // whole UTF-8 chars only
//   send(sd.finish());
//
// Invariants:
//   1. encode(text, false) equals the ids of HF `tokenizers` (Tokenizer.encode(text,
//      add_special_tokens=False)) for the supported pipelines: normalizer null/NFC/Sequence,
//      pre_tokenizer ByteLevel / Split(regex) / Sequence, model BPE (merges as "a b" or [a, b]),
//      decoder ByteLevel. Anything else is rejected at load with errc::unsupported, naming the
//      file and the JSON path.
//   2. Added tokens are matched in the raw text before normalization and pre-tokenization
//      (leftmost-longest), so "<|eot_id|>" written in a prompt is one id.
//   3. decode(encode(s, false)) == s for valid UTF-8 s; decode is UTF-8-lossy (an invalid
//      sequence becomes U+FFFD), as HF's is.
//   4. token_stream_decoder emits only complete UTF-8 characters; the concatenation of its
//      outputs plus finish() equals decode() of the same ids.
//   5. A tokenizer is immutable after loading: encode/decode are const and thread-safe.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace troupe::parallel {

// What the serving engine needs from any tokenizer.
class text_tokenizer {
 public:
  virtual ~text_tokenizer() = default;
  // add_special: add the BOS/EOS the model's post-processor (or tokenizer_config) asks for.
  virtual std::vector<int32_t> encode(std::string_view text, bool add_special = true) const = 0;
  // UTF-8-lossy text of ids; skip_special drops special tokens (BOS, EOS, <|eot_id|>, ...).
  virtual std::string decode(std::span<const int32_t> ids, bool skip_special = true) const = 0;
  // The raw bytes of one token (possibly a partial UTF-8 character); "" for a skipped special.
  virtual std::string token_bytes(int32_t id, bool skip_special = true) const = 0;
  virtual bool is_special(int32_t id) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual std::optional<int32_t> bos_id() const = 0;
  virtual const std::vector<int32_t>& eos_ids() const = 0;  // generation stops on any of them
  virtual std::optional<int32_t> token_to_id(std::string_view token) const = 0;
  virtual std::string id_to_token(int32_t id) const = 0;  // the vocabulary string (byte-mapped)
  // tokenizer_config.json's chat_template ("" when none) and its bos/eos token strings.
  virtual const std::string& chat_template_source() const = 0;
  virtual const std::string& bos_token() const = 0;
  virtual const std::string& eos_token() const = 0;
};

// HF tokenizer.json byte-level BPE.
class bpe_tokenizer final : public text_tokenizer {
 public:
  // Reads dir/tokenizer.json, and dir/tokenizer_config.json, dir/generation_config.json when
  // present. Errors (errc::format / not_found / unsupported) name the file and JSON path.
  static std::unique_ptr<bpe_tokenizer> load(const std::string& model_dir);
  // tokenizer.json alone, plus an optional tokenizer_config.json path ("" = none).
  static std::unique_ptr<bpe_tokenizer> load_files(const std::string& tokenizer_json,
                                                   const std::string& tokenizer_config_json = "",
                                                   const std::string& generation_config_json = "");
  ~bpe_tokenizer() override;

  std::vector<int32_t> encode(std::string_view text, bool add_special = true) const override;
  std::string decode(std::span<const int32_t> ids, bool skip_special = true) const override;
  std::string token_bytes(int32_t id, bool skip_special = true) const override;
  bool is_special(int32_t id) const override;
  int64_t vocab_size() const override;
  std::optional<int32_t> bos_id() const override { return bos_id_; }
  const std::vector<int32_t>& eos_ids() const override { return eos_ids_; }
  std::optional<int32_t> token_to_id(std::string_view token) const override;
  std::string id_to_token(int32_t id) const override;
  const std::string& chat_template_source() const override { return chat_template_; }
  const std::string& bos_token() const override { return bos_token_; }
  const std::string& eos_token() const override { return eos_token_; }

  struct impl;  // regex, merges, added tokens (bpe_tokenizer.cpp)

 private:
  bpe_tokenizer();
  std::unique_ptr<impl> impl_;
  std::optional<int32_t> bos_id_;
  std::vector<int32_t> eos_ids_;
  std::string chat_template_, bos_token_, eos_token_;
};

// The byte tokenizer of the examples (parallel/data/byte_tokenizer.h) behind text_tokenizer:
// ids 0..255 are bytes, 256 BOS, 257 EOS. add_special adds nothing: byte models are trained on
// documents separated by EOS with no BOS, and `troupe generate` encodes prompts the same way.
class byte_text_tokenizer final : public text_tokenizer {
 public:
  std::vector<int32_t> encode(std::string_view text, bool add_special = true) const override;
  std::string decode(std::span<const int32_t> ids, bool skip_special = true) const override;
  std::string token_bytes(int32_t id, bool skip_special = true) const override;
  bool is_special(int32_t id) const override;
  int64_t vocab_size() const override;
  std::optional<int32_t> bos_id() const override;
  const std::vector<int32_t>& eos_ids() const override { return eos_; }
  std::optional<int32_t> token_to_id(std::string_view token) const override;
  std::string id_to_token(int32_t id) const override;
  const std::string& chat_template_source() const override { return empty_; }
  const std::string& bos_token() const override { return bos_str_; }
  const std::string& eos_token() const override { return eos_str_; }

 private:
  std::vector<int32_t> eos_{257};
  std::string empty_, bos_str_{"<bos>"}, eos_str_{"<eos>"};
};

// model_dir/tokenizer.json when present, else the byte tokenizer.
std::unique_ptr<text_tokenizer> load_tokenizer(const std::string& model_dir);

// Turns token ids into text for streaming: push() returns only whole UTF-8 characters
// (bytes of a character split across tokens wait for the rest); finish() flushes what is left,
// with invalid bytes as U+FFFD.
class token_stream_decoder {
 public:
  explicit token_stream_decoder(const text_tokenizer& tok, bool skip_special = true)
      : tok_(&tok), skip_special_(skip_special) {}
  std::string push(int32_t id);
  std::string finish();

 private:
  const text_tokenizer* tok_;
  bool skip_special_;
  std::string pending_;
};

// U+FFFD for every maximal invalid subsequence (the WHATWG / Rust from_utf8_lossy rule).
std::string utf8_lossy(std::string_view bytes);

}  // namespace troupe::parallel
