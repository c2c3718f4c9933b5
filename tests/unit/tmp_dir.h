// tests/unit/tmp_dir.h — a fresh directory per test, named after the running gtest and the
// pid, removed when the object goes away.
//
//   tmp_dir d;                               // /tmp/troupe_<suite>_<test>_<pid>/
//   write(d.file("a.bin"));                  // a path inside it
#pragma once
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <string>

class tmp_dir {
 public:
  tmp_dir() {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    path_ = std::filesystem::temp_directory_path() /
            fmt::format("troupe_{}_{}_{}", info->test_suite_name(), info->name(), ::getpid());
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~tmp_dir() { std::filesystem::remove_all(path_); }
  tmp_dir(const tmp_dir&) = delete;
  tmp_dir& operator=(const tmp_dir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};
