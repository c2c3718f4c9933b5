// runtime/log.h — the project's logger (spdlog underneath).
//
//   troupe::runtime::log::info("loaded {} tensors from {}", n, path);
//   troupe::runtime::log::set_level("debug");    // or TROUPE_LOG_LEVEL=debug
//
// Invariants:
//   1. Logs go to stderr, ordered, with the level and (when set) the rank.
//   2. The level comes from TROUPE_LOG_LEVEL at first use; set_level overrides it.
#pragma once
#include <spdlog/spdlog.h>

#include <string_view>

namespace troupe::runtime::log {

spdlog::logger& logger();
void set_level(std::string_view level);  // trace|debug|info|warn|error|off
void set_rank(int rank);                 // prefixes lines with [rank N]

template <typename... Args>
void debug(fmt::format_string<Args...> f, Args&&... a) { logger().debug(f, std::forward<Args>(a)...); }
template <typename... Args>
void info(fmt::format_string<Args...> f, Args&&... a) { logger().info(f, std::forward<Args>(a)...); }
template <typename... Args>
void warn(fmt::format_string<Args...> f, Args&&... a) { logger().warn(f, std::forward<Args>(a)...); }
template <typename... Args>
void error(fmt::format_string<Args...> f, Args&&... a) { logger().error(f, std::forward<Args>(a)...); }

}  // namespace troupe::runtime::log
