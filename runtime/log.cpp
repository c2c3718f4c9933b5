#include "runtime/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <cstdlib>
#include <string>

namespace troupe::runtime::log {

namespace {
std::shared_ptr<spdlog::logger> make_logger() {
  auto l = spdlog::stderr_color_mt("troupe");
  l->set_pattern("[%H:%M:%S.%e] [troupe] [%^%l%$] %v");
  l->set_level(spdlog::level::info);
  if (const char* env = std::getenv("TROUPE_LOG_LEVEL")) l->set_level(spdlog::level::from_str(env));
  return l;
}
}  // namespace

spdlog::logger& logger() {
  static std::shared_ptr<spdlog::logger> l = make_logger();
  return *l;
}

void set_level(std::string_view level) { logger().set_level(spdlog::level::from_str(std::string(level))); }

void set_rank(int rank) {
  logger().set_pattern(fmt::format("[%H:%M:%S.%e] [troupe] [rank {}] [%^%l%$] %v", rank));
}

}  // namespace troupe::runtime::log
