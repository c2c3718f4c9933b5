// parallel/data/chat_template.h — OpenAI-style messages to a prompt, for /v1/chat/completions.
//
//   std::unique_ptr<text_tokenizer> tok = load_tokenizer(model_dir);
//   chat_template tpl = chat_template::from_tokenizer(*tok);   // style detected from the Jinja source
//   std::string prompt = tpl.render({{"system", "Be terse."}, {"user", "Hi"}}, /*add_generation_prompt=*/true);
//   std::vector<int32_t> ids = tok->encode(prompt, /*add_special=*/false);  // the prompt has BOS already
//
// Invariants:
//   1. No Jinja engine: a template is recognised by its markers and rendered natively, giving the
//      same string as transformers' apply_chat_template(tokenize=False) for the shipped templates:
//        llama3   "<|start_header_id|>"  BOS + header/role/"\n\n" + trimmed content + "<|eot_id|>"
//        chatml   "<|im_start|>"         Qwen/ChatML, with the template's default system prompt if any
//        mistral  "[INST]", " [/INST]"   BOS + "[INST] user [/INST]" + "assistant" + EOS (v0.1)
//        mistral_v3 "[INST]", no " [/INST]" BOS + "[INST] user[/INST]" + " assistant" + EOS, the
//                 system message folded into the last user turn (v0.3, Mixtral)
//        llama2   "[INST]" + "<<SYS>>"   BOS + "[INST] <<SYS>>\nsys\n<</SYS>>\n\n user [/INST]" ...
//        plain    no template            "role: content\n" per message, then "assistant:"
//   2. An unrecognised template falls back to plain, with one warning that names it.
//   3. render never throws on roles a template would reject: mistral (v0.1) folds a system
//      message into the first user turn; other roles are rendered with their own name.
#pragma once
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace troupe::parallel {

class text_tokenizer;

struct chat_message {
  std::string role;  // "system", "user", "assistant", ...
  std::string content;
};

enum class chat_style { plain, llama3, chatml, mistral, mistral_v3, llama2 };
const char* chat_style_name(chat_style s);

class chat_template {
 public:
  chat_template() = default;
  // Detects the style of a tokenizer_config.json chat_template ("" -> plain).
  static chat_template detect(std::string_view jinja_source, std::string bos_token = "", std::string eos_token = "");
  // The tokenizer's chat_template_source(), bos_token() and eos_token().
  static chat_template from_tokenizer(const text_tokenizer& tok);
  static chat_template of_style(chat_style s, std::string bos_token = "", std::string eos_token = "",
                                std::string default_system = "");

  std::string render(std::span<const chat_message> messages, bool add_generation_prompt = true) const;
  std::string render(const std::vector<chat_message>& messages, bool add_generation_prompt = true) const {
    return render(std::span<const chat_message>(messages), add_generation_prompt);
  }

  chat_style style() const { return style_; }
  const std::string& default_system() const { return default_system_; }  // chatml: "" when none

 private:
  chat_style style_ = chat_style::plain;
  std::string bos_, eos_, default_system_;
};

}  // namespace troupe::parallel
