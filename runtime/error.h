// runtime/error.h — the one error type used everywhere in troupe.
//
//   TROUPE_CHECK(n > 0, errc::invalid_argument, "{}: n must be positive, got {}", where, n);
//   try { load(path); } catch (troupe::runtime::error& e) {
//     e.add_context(fmt::format("while loading {}", path)); throw; }
//
// Invariants:
//   1. Library code never exits or aborts on a user's mistake: it throws `error`.
//   2. Every error carries a code, a message that says what/where/how to fix,
//      and the file:line where it was raised.
//   3. Context added while the error travels up is kept, innermost first.
#pragma once
#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace troupe::runtime {

enum class errc {
  invalid_argument,  // a caller passed something wrong (shape, dtype, value)
  out_of_range,      // an index or offset outside its bounds
  format,            // a file or message that does not parse (safetensors, JSON)
  io,                // the OS refused (open, mmap, read, write)
  not_found,         // a named thing is missing (tensor, key, file)
  unsupported,       // valid, but not supported by this build or device
  cuda,              // a CUDA/cuBLAS/NCCL call failed
  aborted,           // stopped on purpose: a peer died or the group was torn down
  internal,          // a bug in troupe
};

const char* errc_name(errc code);

class error : public std::runtime_error {
 public:
  error(errc code, std::string message, const char* file = nullptr, int line = 0);

  errc code() const noexcept { return code_; }
  const std::string& message() const noexcept { return message_; }
  const std::string& location() const noexcept { return location_; }
  const std::vector<std::string>& context() const noexcept { return context_; }

  // Adds a breadcrumb ("while loading model.safetensors"); what() includes it.
  error& add_context(std::string ctx);
  const char* what() const noexcept override { return rendered_.c_str(); }

 private:
  void render();
  errc code_;
  std::string message_;
  std::string location_;
  std::vector<std::string> context_;
  std::string rendered_;
};

}  // namespace troupe::runtime

#define TROUPE_THROW(code, ...)                                                       \
  throw ::troupe::runtime::error((code), ::fmt::format(__VA_ARGS__), __FILE__, __LINE__)

#define TROUPE_CHECK(cond, code, ...)  \
  do {                                 \
    if (!(cond)) {                     \
      TROUPE_THROW(code, __VA_ARGS__); \
    }                                  \
  } while (0)
