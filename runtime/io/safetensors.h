// runtime/io/safetensors.h — read (mmap, zero-copy views) and write safetensors files.
//
//   safetensors_file f = safetensors_file::open("model.safetensors");
//   tensor w = f.get("model.embed_tokens.weight");            // view into the mapping
//   tensor w32 = f.get_as("model.norm.weight", dtype::f32, {64});  // checked shape, converted
//   safetensors_write("out.safetensors", {{"a", a}, {"b", b}}, {{"format", "pt"}});
//
// Invariants:
//   1. open() validates the whole header before returning: the 8-byte length, JSON,
//      every entry's dtype, shape and data_offsets (in range, begin <= end, size equal to
//      numel * dtype size, no two tensors overlapping). Any violation throws
//      errc::format naming the file, the tensor and the byte offset; nothing is mapped
//      afterwards.
//   2. get() returns a view that keeps the mapping alive (shared ownership); it is valid
//      after the safetensors_file goes away.
//   3. Writing is atomic: data goes to "<path>.tmp", is fsync'ed and renamed over <path>.
//      Tensors are laid out by decreasing dtype size, so every view is aligned; the
//      header is padded with spaces to a multiple of 8 bytes (the Python library's layout).
//   4. Sharded checkpoints: safetensors_index reads model.safetensors.index.json or a
//      single model.safetensors in a directory and finds each tensor's file.
//   5. The mapping is private copy-on-write: writing into a view never changes the file.
//      A tensor whose bytes are not aligned to its dtype size (foreign writers) is copied.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "runtime/tensor.h"

namespace troupe::runtime {

struct safetensors_entry {
  std::string name;
  runtime::dtype dtype;
  shape_t shape;
  size_t begin = 0;  // byte offsets inside the data section
  size_t end = 0;
};

class safetensors_file {
 public:
  static safetensors_file open(const std::string& path);
  // Parses a header from memory (the whole file's bytes); used by open() and by tests.
  static safetensors_file from_bytes(std::shared_ptr<void> owner, const char* data, size_t size,
                                     const std::string& label);

  const std::string& path() const { return path_; }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  const safetensors_entry& entry(const std::string& name) const;  // throws not_found
  std::vector<std::string> names() const;                         // in file order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  size_t data_offset() const { return data_offset_; }  // file offset of the data section (8 + N)
  size_t data_size() const { return data_size_; }      // bytes in the data section

  tensor get(const std::string& name) const;  // zero-copy view, the file's dtype
  // Checks the shape (when non-empty) and converts to dt (copy if the dtype differs).
  tensor get_as(const std::string& name, runtime::dtype dt, const shape_t& expected_shape = {}) const;

 private:
  std::string path_;
  std::shared_ptr<void> owner_;  // the mapping
  const char* data_ = nullptr;   // start of the data section
  size_t data_offset_ = 0;
  size_t data_size_ = 0;
  std::vector<safetensors_entry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

void safetensors_write(const std::string& path, const std::vector<std::pair<std::string, tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// All tensors of a checkpoint directory (one file or sharded with an index.json).
class safetensors_index {
 public:
  static safetensors_index open_dir(const std::string& dir);
  bool contains(const std::string& name) const;
  tensor get(const std::string& name) const;
  tensor get_as(const std::string& name, runtime::dtype dt, const shape_t& expected_shape = {}) const;
  std::vector<std::string> names() const;
  const safetensors_entry& entry(const std::string& name) const;

 private:
  std::string dir_;
  std::vector<safetensors_file> files_;
  std::map<std::string, size_t> where_;  // tensor -> index into files_
  std::vector<std::string> names_;       // index (or file) order
};

}  // namespace troupe::runtime
