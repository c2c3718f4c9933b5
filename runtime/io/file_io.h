// runtime/io/file_io.h — the two file patterns every checkpoint and data format here uses:
// a whole file mapped read-only (zero-copy views that keep the mapping alive), and an atomic
// write (a temporary file, fsync, rename over the target, fsync of the directory).
//
//   mapped_file m = map_file("model.safetensors");        // m.data, m.size; m.owner keeps it mapped
//   atomic_file_writer w("train.bin");                    // writes train.bin.tmp
//   w.write(header, 1024); w.write(tokens, n * 2);
//   w.commit();                                            // fsync + rename: all or nothing
//
// Invariants:
//   1. map_file: a missing file is errc::not_found, anything else that stops it errc::io,
//      each naming the path. MAP_PRIVATE: with copy_on_write, writes through the mapping
//      never reach the file. An empty file maps to data == nullptr, size 0.
//   2. atomic_file_writer: until commit() the target is untouched; a writer destroyed
//      without commit (an exception) removes its temporary file. Errors name the path.
#pragma once
#include <cstddef>
#include <memory>
#include <string>

namespace troupe::runtime {

struct mapped_file {
  std::shared_ptr<void> owner;  // unmaps when the last copy goes away
  const char* data = nullptr;
  size_t size = 0;
};

// `what` names the kind of file in errors ("token file", "safetensors file").
mapped_file map_file(const std::string& path, const char* what, bool copy_on_write = false);

class atomic_file_writer {
 public:
  explicit atomic_file_writer(std::string path);
  ~atomic_file_writer();
  atomic_file_writer(const atomic_file_writer&) = delete;
  atomic_file_writer& operator=(const atomic_file_writer&) = delete;
  void write(const void* p, size_t n);
  void commit();
  const std::string& tmp_path() const { return tmp_; }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

}  // namespace troupe::runtime
