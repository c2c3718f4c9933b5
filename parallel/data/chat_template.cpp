// parallel/data/chat_template.cpp — native renderings of the common HF chat templates.
#include "parallel/data/chat_template.h"

#include <fmt/format.h>

#include "parallel/data/bpe_tokenizer.h"
#include "runtime/log.h"

namespace troupe::parallel {

namespace {

// Jinja's `| trim` / Python str.strip(): leading and trailing whitespace.
std::string trim(std::string_view s) {
  auto ws = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; };
  size_t a = 0, b = s.size();
  while (a < b && ws(s[a])) ++a;
  while (b > a && ws(s[b - 1])) --b;
  return std::string(s.substr(a, b - a));
}

// The ChatML default system prompt of a template: '<|im_start|>system\n' TEXT '<|im_end|>'
// written as one literal (Qwen2: "You are a helpful assistant."), or "".
std::string chatml_default_system(std::string_view src) {
  const std::string_view open = "<|im_start|>system";
  for (size_t pos = src.find(open); pos != std::string_view::npos; pos = src.find(open, pos + 1)) {
    size_t a = pos + open.size();
    if (src.compare(a, 1, "\n") == 0) a += 1;
    else if (src.compare(a, 2, "\\n") == 0) a += 2;
    else continue;
    const size_t e = src.find("<|im_end|>", a);
    if (e == std::string_view::npos) break;
    std::string_view body = src.substr(a, e - a);
    if (body.find_first_of("{}'\"+") != std::string_view::npos) continue;  // an expression, not a literal
    std::string out;
    for (size_t i = 0; i < body.size(); ++i) {
      if (body[i] == '\\' && i + 1 < body.size() && body[i + 1] == 'n') {
        out.push_back('\n');
        ++i;
      } else {
        out.push_back(body[i]);
      }
    }
    return out;
  }
  return "";
}

}  // namespace

const char* chat_style_name(chat_style s) {
  switch (s) {
    case chat_style::plain: return "plain";
    case chat_style::llama3: return "llama3";
    case chat_style::chatml: return "chatml";
    case chat_style::mistral: return "mistral";
    case chat_style::mistral_v3: return "mistral_v3";
    case chat_style::llama2: return "llama2";
  }
  return "?";
}

chat_template chat_template::of_style(chat_style s, std::string bos_token, std::string eos_token,
                                      std::string default_system) {
  chat_template t;
  t.style_ = s;
  t.bos_ = std::move(bos_token);
  t.eos_ = std::move(eos_token);
  t.default_system_ = std::move(default_system);
  return t;
}

chat_template chat_template::detect(std::string_view src, std::string bos_token, std::string eos_token) {
  if (src.empty()) return of_style(chat_style::plain, std::move(bos_token), std::move(eos_token));
  if (src.find("<|start_header_id|>") != std::string_view::npos) {
    if (src.find("Cutting Knowledge Date") != std::string_view::npos)
      runtime::log::warn("chat template: Llama-3.1 template rendered as Llama-3 (no date/tools system preamble)");
    return of_style(chat_style::llama3, std::move(bos_token), std::move(eos_token));
  }
  if (src.find("<|im_start|>") != std::string_view::npos)
    return of_style(chat_style::chatml, std::move(bos_token), std::move(eos_token), chatml_default_system(src));
  if (src.find("[INST]") != std::string_view::npos) {
    const chat_style s = src.find("<<SYS>>") != std::string_view::npos   ? chat_style::llama2
                         : src.find(" [/INST]") != std::string_view::npos ? chat_style::mistral
                                                                           : chat_style::mistral_v3;
    return of_style(s, std::move(bos_token), std::move(eos_token));
  }
  std::string head(src.substr(0, 80));
  for (char& c : head)
    if (c == '\n') c = ' ';
  runtime::log::warn("chat template not recognised (\"{}{}\"); using the plain 'role: content' template", head,
                     src.size() > 80 ? "..." : "");
  return of_style(chat_style::plain, std::move(bos_token), std::move(eos_token));
}

chat_template chat_template::from_tokenizer(const text_tokenizer& tok) {
  return detect(tok.chat_template_source(), tok.bos_token(), tok.eos_token());
}

std::string chat_template::render(std::span<const chat_message> msgs, bool add_generation_prompt) const {
  std::string out;
  switch (style_) {
    case chat_style::plain:
      for (const auto& m : msgs) out += fmt::format("{}: {}\n", m.role, m.content);
      if (add_generation_prompt) out += "assistant:";
      return out;
    case chat_style::llama3:
      out = bos_;
      for (const auto& m : msgs)
        out += fmt::format("<|start_header_id|>{}<|end_header_id|>\n\n{}<|eot_id|>", m.role, trim(m.content));
      if (add_generation_prompt) out += "<|start_header_id|>assistant<|end_header_id|>\n\n";
      return out;
    case chat_style::chatml:
      if (!default_system_.empty() && (msgs.empty() || msgs[0].role != "system"))
        out += fmt::format("<|im_start|>system\n{}<|im_end|>\n", default_system_);
      for (const auto& m : msgs) out += fmt::format("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content);
      if (add_generation_prompt) out += "<|im_start|>assistant\n";
      return out;
    case chat_style::mistral_v3: {
      // System text goes with the last message when that is a user turn (else it is dropped).
      size_t first = 0;
      std::string system;
      if (!msgs.empty() && msgs[0].role == "system") {
        system = msgs[0].content;
        first = 1;
      }
      out = bos_;
      for (size_t i = first; i < msgs.size(); ++i) {
        const chat_message& m = msgs[i];
        if (m.role == "assistant") {
          out += ' ';
          out += m.content;
          out += eos_;
        } else if (i + 1 == msgs.size() && first == 1) {
          out += fmt::format("[INST] {}\n\n{}[/INST]", system, m.content);
        } else {
          out += fmt::format("[INST] {}[/INST]", m.content);
        }
      }
      return out;
    }
    case chat_style::mistral:
    case chat_style::llama2: {
      // The templates take no generation prompt: a prompt ending in "[/INST]" is the cue.
      const bool l2 = style_ == chat_style::llama2;
      std::string system;
      size_t first = 0;
      if (!msgs.empty() && msgs[0].role == "system") {
        system = msgs[0].content;
        first = 1;
      }
      if (!l2) out = bos_;
      bool system_pending = !system.empty();
      for (size_t i = first; i < msgs.size(); ++i) {
        const chat_message& m = msgs[i];
        if (m.role == "assistant") {
          if (l2) {
            out += ' ';
            out += trim(m.content);
            out += ' ';
          } else {
            out += m.content;
          }
          out += eos_;
          continue;
        }
        std::string content;
        if (system_pending) {
          content = l2 ? fmt::format("<<SYS>>\n{}\n<</SYS>>\n\n", system) : system + "\n\n";
          system_pending = false;
        }
        content += m.content;
        if (l2) out += bos_;
        out += "[INST] ";
        out += l2 ? trim(content) : content;
        out += " [/INST]";
      }
      if (system_pending) out += fmt::format("{}[INST] {} [/INST]", l2 ? bos_ : std::string(), system);
      return out;
    }
  }
  return out;
}

}  // namespace troupe::parallel
