// runtime/shared_weights.cpp — see shared_weights.h.
#include "runtime/shared_weights.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include "runtime/error.h"
#include "runtime/process_limits.h"

namespace troupe::runtime {

namespace {

// One memfd and its mapping; unmapped and closed with the last tensor that shares it.
struct region {
  void* ptr = MAP_FAILED;
  size_t len = 0;
  int fd = -1;
  ~region();
};

struct live_region {
  int fd = -1;
  int64_t bytes = 0, dev = 0, ino = 0;
};

// Data pointer -> every live region (invariant 2). Never destroyed: a tensor may outlive main().
std::mutex g_mu;
std::map<const void*, live_region>& live() {
  static auto* m = new std::map<const void*, live_region>;
  return *m;
}

region::~region() {
  {
    std::lock_guard<std::mutex> g(g_mu);
    live().erase(ptr);
  }
  if (ptr != MAP_FAILED) ::munmap(ptr, len);
  if (fd >= 0) ::close(fd);
}

size_t page_round(size_t n) {
  const auto page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  return std::max(page, (n + page - 1) / page * page);
}

tensor wrap(std::shared_ptr<region> r, const shape_t& shape, dtype dt, int64_t bytes) {
  struct stat st {};
  TROUPE_CHECK(::fstat(r->fd, &st) == 0, errc::io, "shared weights: fstat of a memfd failed: {}", std::strerror(errno));
  {
    std::lock_guard<std::mutex> g(g_mu);
    live()[r->ptr] = {r->fd, bytes, static_cast<int64_t>(st.st_dev), static_cast<int64_t>(st.st_ino)};
  }
  void* p = r->ptr;
  return tensor::from_blob(p, shape, dt, device::cpu(), std::move(r));
}

}  // namespace

void shared_weights_boot_id(uint64_t out[2]) {
  static uint64_t id[2] = {0, 0};
  static std::once_flag once;
  std::call_once(once, [] {
    FILE* f = std::fopen("/proc/sys/kernel/random/boot_id", "r");
    if (!f) return;
    char buf[64] = {0};
    const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
    std::fclose(f);
    std::string hex;
    for (size_t i = 0; i < n; ++i)
      if (std::isxdigit(static_cast<unsigned char>(buf[i]))) hex += buf[i];
    if (hex.size() != 32) return;
    id[0] = std::stoull(hex.substr(0, 16), nullptr, 16);
    id[1] = std::stoull(hex.substr(16, 16), nullptr, 16);
  });
  out[0] = id[0];
  out[1] = id[1];
}

tensor shared_weights_copy(const tensor& t) {
  if (!t.defined() || !t.device().is_cpu()) return t;
  raise_open_file_limit();  // a descriptor per tensor (invariant 1)
  const tensor src = t.is_contiguous() ? t : t.contiguous();
  const size_t bytes = src.nbytes();
  auto r = std::make_shared<region>();
  r->len = page_round(bytes);
  r->fd = ::memfd_create("troupe-weights", MFD_CLOEXEC);
  TROUPE_CHECK(r->fd >= 0, errc::io, "shared weights: memfd_create failed: {}", std::strerror(errno));
  TROUPE_CHECK(::ftruncate(r->fd, static_cast<off_t>(r->len)) == 0, errc::io,
               "shared weights: growing a memfd to {} bytes failed: {}", r->len, std::strerror(errno));
  r->ptr = ::mmap(nullptr, r->len, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
  TROUPE_CHECK(r->ptr != MAP_FAILED, errc::io, "shared weights: mapping {} bytes failed: {}", r->len,
               std::strerror(errno));
  if (bytes > 0) std::memcpy(r->ptr, src.data_ptr(), bytes);
  return wrap(std::move(r), src.shape(), src.dtype(), static_cast<int64_t>(bytes));
}

std::optional<shared_weights_handle_t> shared_weights_handle(const tensor& t) {
  if (!t.defined() || !t.device().is_cpu() || !t.is_contiguous()) return std::nullopt;
  std::lock_guard<std::mutex> g(g_mu);
  const auto it = live().find(t.data_ptr());
  if (it == live().end() || it->second.bytes != static_cast<int64_t>(t.nbytes())) return std::nullopt;
  shared_weights_handle_t h;
  shared_weights_boot_id(h.boot);
  h.pid = ::getpid();
  h.fd = it->second.fd;
  h.bytes = it->second.bytes;
  h.dev = it->second.dev;
  h.ino = it->second.ino;
  return h;
}

std::optional<tensor> shared_weights_map(const shared_weights_handle_t& h, const shape_t& shape, dtype dt) {
  uint64_t boot[2];
  shared_weights_boot_id(boot);
  const int64_t bytes = shape_numel(shape) * static_cast<int64_t>(dtype_size(dt));
  if (boot[0] == 0 || boot[0] != h.boot[0] || boot[1] != h.boot[1] || h.pid <= 0 || h.fd < 0 || h.bytes != bytes)
    return std::nullopt;
  const std::string path = fmt::format("/proc/{}/fd/{}", h.pid, h.fd);
  auto r = std::make_shared<region>();
  r->fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (r->fd < 0) return std::nullopt;
  struct stat st {};
  char link[64] = {0};  // what was opened, not the path again: a memfd's link reads "/memfd:troupe-weights (deleted)"
  const ssize_t n = ::readlink(fmt::format("/proc/self/fd/{}", r->fd).c_str(), link, sizeof(link) - 1);
  if (::fstat(r->fd, &st) != 0 || !S_ISREG(st.st_mode) || n <= 0 ||
      std::strncmp(link, "/memfd:troupe-weights", 21) != 0 || st.st_size < static_cast<off_t>(bytes) ||
      static_cast<int64_t>(st.st_dev) != h.dev || static_cast<int64_t>(st.st_ino) != h.ino)
    return std::nullopt;
  r->len = page_round(static_cast<size_t>(bytes));
  r->ptr = ::mmap(nullptr, r->len, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
  if (r->ptr == MAP_FAILED) return std::nullopt;
  return wrap(std::move(r), shape, dt, bytes);
}

}  // namespace troupe::runtime
