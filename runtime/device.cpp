#include "runtime/device.h"

#include <unistd.h>

#include <charconv>
#include <mutex>

#include "runtime/error.h"
#include "runtime/log.h"
#include "runtime/threads.h"

#ifdef TROUPE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

namespace troupe::runtime {

std::string device::str() const {
  return kind == device_kind::cpu ? std::string("cpu") : fmt::format("cuda:{}", index);
}

device parse_device(std::string_view text) {
  if (text == "cpu") return device::cpu();
  if (text == "cuda") return device::cuda(0);
  if (text.substr(0, 5) == "cuda:") {
    int idx = -1;
    auto rest = text.substr(5);
    auto [p, ec] = std::from_chars(rest.data(), rest.data() + rest.size(), idx);
    if (ec == std::errc() && p == rest.data() + rest.size() && idx >= 0) return device::cuda(idx);
  }
  TROUPE_THROW(errc::invalid_argument, "device '{}' is not valid; use cpu, cuda or cuda:N", text);
}

cuda_state cuda_status() {
  static cuda_state state = [] {
    cuda_state s;
#ifdef TROUPE_HAVE_CUDA
    s.built = true;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      s.reason = fmt::format("cudaGetDeviceCount: {}", cudaGetErrorString(e));
      cudaGetLastError();  // clear the sticky error
    } else if (n == 0) {
      s.reason = "no CUDA device found";
    } else {
      s.available = true;
      s.device_count = n;
    }
#else
    s.reason = "this build has no CUDA (nvcc was not found at configure time)";
#endif
    return s;
  }();
  return state;
}

device resolve_device(std::string_view text) {
  device d = parse_device(text);
  if (d.is_cpu()) return d;
  cuda_state s = cuda_status();
  if (!s.available) {
    static std::once_flag warned;
    std::call_once(warned, [&] { log::warn("{} requested but CUDA is not usable ({}); running on cpu", d.str(), s.reason); });
    return device::cpu();
  }
  TROUPE_CHECK(d.index < s.device_count, errc::invalid_argument,
               "device {} does not exist: {} CUDA device(s) visible", d.str(), s.device_count);
  return d;
}

std::vector<device_info> list_devices() {
  std::vector<device_info> out;
  long pages = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES), psize = sysconf(_SC_PAGESIZE);
  out.push_back({device::cpu(), fmt::format("cpu ({} threads)", num_threads()),
                 static_cast<size_t>(pages) * static_cast<size_t>(psize),
                 static_cast<size_t>(avail) * static_cast<size_t>(psize)});
#ifdef TROUPE_HAVE_CUDA
  cuda_state s = cuda_status();
  for (int i = 0; s.available && i < s.device_count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    size_t free_b = 0, total_b = 0;
    cudaSetDevice(i);
    cudaMemGetInfo(&free_b, &total_b);
    out.push_back({device::cuda(i), prop.name, total_b, free_b});
  }
#endif
  return out;
}

}  // namespace troupe::runtime
