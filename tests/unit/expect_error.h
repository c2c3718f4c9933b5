// tests/unit/expect_error.h — runs f and returns the troupe error it throws (a test failure when
// it throws none), so a test can assert the error's code and message:
//   const error e = expect_error([&] { load("missing"); });
//   EXPECT_EQ(e.code(), errc::not_found);
#pragma once
#include <gtest/gtest.h>

#include "runtime/error.h"

namespace troupe_test {

template <typename F>
troupe::runtime::error expect_error(F&& f) {
  try {
    f();
  } catch (const troupe::runtime::error& e) {
    return e;
  }
  ADD_FAILURE() << "expected a troupe::runtime::error";
  return troupe::runtime::error(troupe::runtime::errc::internal, "no error");
}

}  // namespace troupe_test
