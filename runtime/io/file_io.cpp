// runtime/io/file_io.cpp — see file_io.h.
#include "runtime/io/file_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "runtime/error.h"

namespace troupe::runtime {

namespace {

struct fd_guard {
  int fd = -1;
  ~fd_guard() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

mapped_file map_file(const std::string& path, const char* what, bool copy_on_write) {
  fd_guard g{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  TROUPE_CHECK(g.fd >= 0, errno == ENOENT ? errc::not_found : errc::io, "{}: cannot open {}: {}", path, what,
               std::strerror(errno));
  struct stat st {};
  TROUPE_CHECK(::fstat(g.fd, &st) == 0, errc::io, "{}: fstat failed: {}", path, std::strerror(errno));
  TROUPE_CHECK(S_ISREG(st.st_mode), errc::io, "{}: not a regular file", path);
  mapped_file m;
  m.size = static_cast<size_t>(st.st_size);
  if (m.size == 0) return m;
  void* p = ::mmap(nullptr, m.size, copy_on_write ? PROT_READ | PROT_WRITE : PROT_READ, MAP_PRIVATE, g.fd, 0);
  TROUPE_CHECK(p != MAP_FAILED, errc::io, "{}: mmap of {} bytes failed: {}", path, m.size, std::strerror(errno));
  const size_t n = m.size;
  m.owner = std::shared_ptr<void>(p, [n](void* q) { ::munmap(q, n); });
  m.data = static_cast<const char*>(p);
  return m;
}

atomic_file_writer::atomic_file_writer(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp") {
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  TROUPE_CHECK(fd_ >= 0, errc::io, "{}: cannot create: {}", tmp_, std::strerror(errno));
}

atomic_file_writer::~atomic_file_writer() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(tmp_.c_str());
}

void atomic_file_writer::write(const void* p, size_t n) {
  TROUPE_CHECK(fd_ >= 0, errc::internal, "{}: write after commit", path_);
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = ::write(fd_, c, n);
    if (w < 0 && errno == EINTR) continue;
    TROUPE_CHECK(w > 0, errc::io, "{}: write failed: {}", tmp_, w < 0 ? std::strerror(errno) : "wrote 0 bytes");
    c += w;
    n -= static_cast<size_t>(w);
  }
}

void atomic_file_writer::commit() {
  TROUPE_CHECK(fd_ >= 0, errc::internal, "{}: committed twice", path_);
  TROUPE_CHECK(::fsync(fd_) == 0, errc::io, "{}: fsync failed: {}", tmp_, std::strerror(errno));
  const int rc = ::close(fd_);
  fd_ = -1;
  TROUPE_CHECK(rc == 0, errc::io, "{}: close failed: {}", tmp_, std::strerror(errno));
  TROUPE_CHECK(::rename(tmp_.c_str(), path_.c_str()) == 0, errc::io, "rename {} -> {} failed: {}", tmp_, path_,
               std::strerror(errno));
  committed_ = true;
  std::filesystem::path parent = std::filesystem::path(path_).parent_path();
  if (parent.empty()) parent = ".";
  const int dfd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);  // best effort: makes the rename durable
    ::close(dfd);
  }
}

}  // namespace troupe::runtime
