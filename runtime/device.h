// runtime/device.h — which device a tensor lives on, and discovery of devices.
//
//   device d = resolve_device("cuda:0");   // falls back to cpu with a warning
//   for (auto& info : list_devices()) fmt::print("{}\n", info.name);
//
// Invariants:
//   1. device::cpu() always exists.
//   2. A CUDA device is used only when this build has CUDA and a GPU answers;
//      otherwise cuda_status() says why, and resolve_device() falls back to cpu.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace troupe::runtime {

enum class device_kind { cpu, cuda };

struct device {
  device_kind kind = device_kind::cpu;
  int index = 0;

  static device cpu() { return {device_kind::cpu, 0}; }
  static device cuda(int i = 0) { return {device_kind::cuda, i}; }
  bool is_cpu() const { return kind == device_kind::cpu; }
  bool is_cuda() const { return kind == device_kind::cuda; }
  std::string str() const;  // "cpu", "cuda:0"
  friend bool operator==(const device&, const device&) = default;
};

struct device_info {
  device dev;
  std::string name;          // "cpu (2 threads)", "NVIDIA H200"
  size_t total_memory = 0;   // bytes
  size_t free_memory = 0;    // bytes (0 when unknown)
};

struct cuda_state {
  bool built = false;        // compiled with CUDA
  bool available = false;    // a GPU answered
  int device_count = 0;
  std::string reason;        // why not available
};

// Parses "cpu", "cuda", "cuda:N"; throws invalid_argument otherwise.
device parse_device(std::string_view text);
// parse_device + fallback to cpu (logged once) when CUDA is not usable.
device resolve_device(std::string_view text);
cuda_state cuda_status();
std::vector<device_info> list_devices();

}  // namespace troupe::runtime
