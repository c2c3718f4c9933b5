#include "runtime/error.h"

#include <cstring>

namespace troupe::runtime {

const char* errc_name(errc code) {
  switch (code) {
    case errc::invalid_argument: return "invalid_argument";
    case errc::out_of_range: return "out_of_range";
    case errc::format: return "format";
    case errc::io: return "io";
    case errc::not_found: return "not_found";
    case errc::unsupported: return "unsupported";
    case errc::cuda: return "cuda";
    case errc::aborted: return "aborted";
    case errc::internal: return "internal";
  }
  return "unknown";
}

error::error(errc code, std::string message, const char* file, int line)
    : std::runtime_error(message), code_(code), message_(std::move(message)) {
  if (file != nullptr) {
    const char* base = std::strrchr(file, '/');
    location_ = fmt::format("{}:{}", base ? base + 1 : file, line);
  }
  render();
}

error& error::add_context(std::string ctx) {
  context_.push_back(std::move(ctx));
  render();
  return *this;
}

void error::render() {
  rendered_ = message_;
  for (const auto& c : context_) rendered_ += fmt::format("\n  {}", c);
  if (!location_.empty()) rendered_ += fmt::format(" [{} at {}]", errc_name(code_), location_);
}

}  // namespace troupe::runtime
