// runtime/process_limits.cpp — see process_limits.h.
#include "runtime/process_limits.h"

#include <sys/resource.h>

#include <cstdint>
#include <mutex>

#include "runtime/log.h"

namespace troupe::runtime {

void raise_open_file_limit() {
  static std::once_flag once;
  std::call_once(once, [] {
    rlimit rl{};
    if (::getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= rl.rlim_max) return;
    const rlim_t was = rl.rlim_cur;
    rl.rlim_cur = rl.rlim_max;
    if (::setrlimit(RLIMIT_NOFILE, &rl) == 0)
      log::debug("open-file limit raised from {} to {}", static_cast<uint64_t>(was), static_cast<uint64_t>(rl.rlim_max));
  });
}

}  // namespace troupe::runtime
