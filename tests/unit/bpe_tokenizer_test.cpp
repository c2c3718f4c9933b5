// HF tokenizer.json byte-level BPE and chat templates against the Python libraries: ids equal
// `tokenizers`' for ~40 strings on three pipelines (GPT-2 ByteLevel regex, Llama-3 Split +
// ByteLevel, Qwen2 NFC + Split + ByteLevel), round trips, streaming decode, special tokens,
// chat templates equal transformers' apply_chat_template, and error messages for broken files.
// Fixtures: tests/fixtures/tokenizers (make_tokenizer_fixtures.py).
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "parallel/data/bpe_tokenizer.h"
#include "parallel/data/chat_template.h"
#include "runtime/error.h"
#include "tests/unit/tmp_dir.h"
#include "tests/unit/expect_error.h"

using namespace troupe::parallel;
using json = nlohmann::json;
using troupe::runtime::errc;
using troupe::runtime::error;

namespace {

const std::string kDir = std::string(TROUPE_FIXTURES_DIR) + "/tokenizers";

const json& expected() {
  static const json j = [] {
    std::ifstream in(kDir + "/expected.json");
    return json::parse(in);
  }();
  return j;
}

std::vector<int32_t> ids_of(const json& a) { return a.get<std::vector<int32_t>>(); }

using troupe_test::expect_error;

class bpe_fixture : public ::testing::TestWithParam<std::string> {};

TEST_P(bpe_fixture, ids_equal_hf_tokenizers) {
  const std::string name = GetParam();
  auto tok = bpe_tokenizer::load(kDir + "/" + name);
  const json& exp = expected().at(name);
  EXPECT_EQ(tok->vocab_size(), exp.at("vocab_size").get<int64_t>());
  int n = 0;
  for (const json& c : exp.at("cases")) {
    const std::string text = c.at("text").get<std::string>();
    EXPECT_EQ(tok->encode(text, false), ids_of(c.at("ids"))) << name << ": " << text;
    EXPECT_EQ(tok->encode(text, true), ids_of(c.at("ids_special"))) << name << " (add_special): " << text;
    const std::vector<int32_t> ids = ids_of(c.at("ids"));
    EXPECT_EQ(tok->decode(ids, false), c.at("decoded").get<std::string>()) << name << ": " << text;
    EXPECT_EQ(tok->decode(ids, true), c.at("decoded_skip").get<std::string>()) << name << ": " << text;
    if (name != "qwen2") {  // qwen2 normalizes to NFC
      EXPECT_EQ(tok->decode(ids, false), text) << name << ": round trip";
    }
    ++n;
  }
  EXPECT_GE(n, 40);
  // Random strings over scripts, number kinds, combining marks and every kind of whitespace.
  int fuzz = 0;
  for (const json& c : exp.at("fuzz")) {
    const std::string text = c.at("text").get<std::string>();
    const std::vector<int32_t> ids = tok->encode(text, false);
    EXPECT_EQ(ids, ids_of(c.at("ids"))) << name << ": " << json(text).dump();
    if (name != "qwen2") {
      EXPECT_EQ(tok->decode(ids, false), text) << name << ": round trip";
    }
    ++fuzz;
  }
  EXPECT_EQ(fuzz, 80);
}

TEST_P(bpe_fixture, streaming_decode_emits_whole_characters) {
  const std::string name = GetParam();
  auto tok = bpe_tokenizer::load(kDir + "/" + name);
  int split_chars = 0;
  for (const json& c : expected().at(name).at("cases")) {
    const std::string text = c.at("text").get<std::string>();
    const std::vector<int32_t> ids = ids_of(c.at("ids"));
    token_stream_decoder sd(*tok, /*skip_special=*/false);
    std::string all;
    std::string raw_prefix;
    for (int32_t id : ids) {
      const std::string piece = sd.push(id);
      raw_prefix += tok->token_bytes(id, false);
      if (piece.empty() && raw_prefix.size() > all.size()) ++split_chars;
      EXPECT_EQ(utf8_lossy(piece), piece) << name << ": chunk is not whole UTF-8 in: " << text;
      all += piece;
    }
    all += sd.finish();
    EXPECT_EQ(all, c.at("decoded").get<std::string>()) << name;
  }
  // The fixture strings (CJK, emoji with a 1000-token vocab) do cut characters across tokens.
  EXPECT_GT(split_chars, 0);
}

TEST_P(bpe_fixture, chat_template_equals_transformers) {
  const std::string name = GetParam();
  auto tok = bpe_tokenizer::load(kDir + "/" + name);
  const chat_template tpl = chat_template::from_tokenizer(*tok);
  const chat_style want = name == "gpt2"     ? chat_style::mistral
                          : name == "llama3" ? chat_style::llama3
                                             : chat_style::chatml;
  EXPECT_EQ(tpl.style(), want) << chat_style_name(tpl.style());
  int compared = 0;
  for (const json& c : expected().at(name).at("chats")) {
    if (c.at("rendered").is_null()) continue;  // the Jinja template refuses (Mistral: system role)
    std::vector<chat_message> msgs;
    for (const json& m : c.at("messages")) msgs.push_back({m.at("role"), m.at("content")});
    EXPECT_EQ(tpl.render(msgs, c.at("add_generation_prompt").get<bool>()), c.at("rendered").get<std::string>())
        << name;
    ++compared;
  }
  EXPECT_GE(compared, 4);
}

TEST(chat_template, llama2_and_mistral_v3_equal_transformers) {
  int compared = 0;
  for (const json& t : expected().at("templates")) {
    const chat_template tpl = chat_template::detect(t.at("source").get<std::string>(), t.at("bos_token"),
                                                    t.at("eos_token"));
    EXPECT_EQ(chat_style_name(tpl.style()), t.at("style").get<std::string>());
    for (const json& c : t.at("chats")) {
      std::vector<chat_message> msgs;
      for (const json& m : c.at("messages")) msgs.push_back({m.at("role"), m.at("content")});
      EXPECT_EQ(tpl.render(msgs, c.at("add_generation_prompt").get<bool>()), c.at("rendered").get<std::string>())
          << t.at("style");
      ++compared;
    }
  }
  EXPECT_EQ(compared, 12);
}

INSTANTIATE_TEST_SUITE_P(pipelines, bpe_fixture, ::testing::Values("gpt2", "llama3", "qwen2"));

TEST(bpe_tokenizer, special_tokens_bos_eos_and_lookup) {
  auto l3 = bpe_tokenizer::load(kDir + "/llama3");
  const int32_t bot = *l3->token_to_id("<|begin_of_text|>"), eot = *l3->token_to_id("<|eot_id|>"),
                eos = *l3->token_to_id("<|end_of_text|>");
  EXPECT_EQ(l3->bos_id(), bot);
  // tokenizer_config eos first, then generation_config's list without duplicates.
  EXPECT_EQ(l3->eos_ids(), (std::vector<int32_t>{eot, eos}));
  EXPECT_TRUE(l3->is_special(eot));
  EXPECT_FALSE(l3->is_special(*l3->token_to_id("e")));
  EXPECT_EQ(l3->id_to_token(eot), "<|eot_id|>");
  EXPECT_EQ(l3->encode("a<|eot_id|>b", false).size(), 3u);
  EXPECT_EQ(l3->encode("x", true).front(), bot);
  EXPECT_EQ(l3->decode(std::vector<int32_t>{bot, eot}, true), "");
  EXPECT_EQ(l3->id_to_token(*l3->token_to_id("Ġthe")), "Ġthe");  // byte-mapped vocabulary strings

  auto qw = bpe_tokenizer::load(kDir + "/qwen2");
  EXPECT_FALSE(qw->bos_id().has_value());
  EXPECT_EQ(qw->eos_ids(), std::vector<int32_t>{*qw->token_to_id("<|im_end|>")});
  EXPECT_EQ(qw->encode("hi", true), qw->encode("hi", false));  // no BOS for Qwen2
  // NFC: a decomposed é encodes as the composed one.
  EXPECT_EQ(qw->encode("e\xCC\x81", false), qw->encode("\xC3\xA9", false));
  EXPECT_THROW(qw->id_to_token(1 << 20), error);
}

TEST(bpe_tokenizer, load_tokenizer_falls_back_to_bytes) {
  tmp_dir d;
  auto bytes = load_tokenizer(d.path().string());
  EXPECT_EQ(bytes->vocab_size(), 258);
  EXPECT_EQ(bytes->encode("hi", true), (std::vector<int32_t>{'h', 'i'}));  // as troupe generate: no BOS
  EXPECT_EQ(bytes->decode(std::vector<int32_t>{256, 0xE6, 0x97, 0xA5, 257}), "\xE6\x97\xA5");
  EXPECT_EQ(bytes->eos_ids(), std::vector<int32_t>{257});
  token_stream_decoder sd(*bytes);
  EXPECT_EQ(sd.push(0xE6), "");
  EXPECT_EQ(sd.push(0x97), "");
  EXPECT_EQ(sd.push(0xA5), "\xE6\x97\xA5");
  EXPECT_EQ(sd.push(0xFF), "\xEF\xBF\xBD");  // invalid byte: replaced at once
  EXPECT_EQ(sd.push(0xF0), "");
  EXPECT_EQ(sd.finish(), "\xEF\xBF\xBD");  // a cut-off 4-byte start
  auto bpe = load_tokenizer(kDir + "/llama3");
  EXPECT_EQ(bpe->vocab_size(), expected().at("llama3").at("vocab_size").get<int64_t>());
}

TEST(bpe_tokenizer, utf8_lossy_follows_maximal_subparts) {
  EXPECT_EQ(utf8_lossy("a\xC3"), "a\xEF\xBF\xBD");
  EXPECT_EQ(utf8_lossy("\xE6\x97x"), "\xEF\xBF\xBDx");        // one U+FFFD for a truncated sequence
  EXPECT_EQ(utf8_lossy("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate: 3
  EXPECT_EQ(utf8_lossy("\xF0\x9F\x98\x80"), "\xF0\x9F\x98\x80");
}

TEST(chat_template, default_and_unknown_templates) {
  const std::vector<chat_message> msgs{{"system", "Be terse."}, {"user", "Hi"}};
  const chat_template plain = chat_template::detect("");
  EXPECT_EQ(plain.style(), chat_style::plain);
  EXPECT_EQ(plain.render(msgs, true), "system: Be terse.\nuser: Hi\nassistant:");
  EXPECT_EQ(plain.render(msgs, false), "system: Be terse.\nuser: Hi\n");
  const chat_template unknown = chat_template::detect("{% for m in messages %}<<{{ m.content }}>>{% endfor %}");
  EXPECT_EQ(unknown.style(), chat_style::plain);
  // Mistral folds a system message into the first user turn rather than failing.
  const chat_template mi = chat_template::of_style(chat_style::mistral, "<s>", "</s>");
  EXPECT_EQ(mi.render(msgs, true), "<s>[INST] Be terse.\n\nHi [/INST]");
  // Llama-2 style (<<SYS>> block), as its Jinja template renders it.
  const chat_template l2 = chat_template::detect("... [INST] ... <<SYS>> ...", "<s>", "</s>");
  EXPECT_EQ(l2.style(), chat_style::llama2);
  const std::vector<chat_message> conv{{"system", "S"}, {"user", " U1 "}, {"assistant", "A1"}, {"user", "U2"}};
  EXPECT_EQ(l2.render(conv), "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\n U1 [/INST] A1 </s><s>[INST] U2 [/INST]");
  // ChatML's default system prompt is read from the template literal (escaped \n form too).
  const chat_template cm = chat_template::detect(
      "{{ '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{{'<|im_start|>' + message['role']}}");
  EXPECT_EQ(cm.default_system(), "You are Qwen.");
}

TEST(bpe_tokenizer, broken_files_name_file_and_json_path) {
  tmp_dir d;
  std::ifstream in(kDir + "/llama3/tokenizer.json");
  const json good = json::parse(in);
  auto write = [&](const json& j) {
    std::ofstream(d.file("tokenizer.json")) << j.dump();
    return d.file("tokenizer.json");
  };
  {
    std::ofstream(d.file("tokenizer.json")) << "{\"model\": ";
    error e = expect_error([&] { bpe_tokenizer::load(d.path().string()); });
    EXPECT_EQ(e.code(), errc::format);
    EXPECT_NE(e.message().find(d.file("tokenizer.json")), std::string::npos) << e.what();
    EXPECT_NE(e.message().find("invalid JSON at byte"), std::string::npos) << e.what();
  }
  {
    json j = good;
    j["model"]["merges"][3] = 17;
    const std::string path = write(j);
    error e = expect_error([&] { bpe_tokenizer::load_files(path); });
    EXPECT_NE(e.message().find(path + ": $.model.merges[3]: a merge is"), std::string::npos) << e.what();
  }
  {
    json j = good;
    j["model"].erase("vocab");
    error e = expect_error([&] { bpe_tokenizer::load_files(write(j)); });
    EXPECT_NE(e.message().find("$.model.vocab: missing"), std::string::npos) << e.what();
  }
  {
    json j = good;
    j["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = "(unclosed";
    error e = expect_error([&] { bpe_tokenizer::load_files(write(j)); });
    EXPECT_NE(e.message().find("$.pre_tokenizer.pretokenizers[0].pattern.Regex: regex does not compile"),
              std::string::npos)
        << e.what();
  }
  {
    json j = good;
    j["model"]["type"] = "WordPiece";
    error e = expect_error([&] { bpe_tokenizer::load_files(write(j)); });
    EXPECT_EQ(e.code(), errc::unsupported);
    EXPECT_NE(e.message().find("$.model.type: 'WordPiece' is not supported"), std::string::npos) << e.what();
  }
  {
    std::ofstream(d.file("tokenizer_config.json")) << R"({"eos_token": "<|nope|>"})";
    write(good);
    error e = expect_error([&] { bpe_tokenizer::load(d.path().string()); });
    EXPECT_NE(e.message().find("tokenizer_config.json: $.eos_token: '<|nope|>' is not a token"), std::string::npos)
        << e.what();
  }
  error e = expect_error([&] { bpe_tokenizer::load(d.file("missing_dir")); });
  EXPECT_EQ(e.code(), errc::not_found);
}

}  // namespace
