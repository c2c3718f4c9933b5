// runtime/communicator_check.h — the conformance suite every communicator backend must
// pass: each collective on deterministic per-rank inputs, checked against a reference
// this rank computes locally from all ranks' inputs. Inputs are small dyadic rationals
// (k/8), so float sums are exact in any order and every comparison is exact: integers,
// f32 and bf16 (fp32 accumulation, one rounding) alike. One extra check reduces random
// f32 values and verifies every rank holds bitwise the same result.
//
//   auto results = check_communicator(comm);            // collective: all ranks call it
//   for (auto& r : results) if (!r.ok) log::error("{}: {}", r.name, r.detail);
//
// Used by tests/unit/communicator_*_test.cpp, the mpirun integration test and
// `troupe selftest`. A failing check does not throw: it is reported and the suite goes
// on, so every rank runs the same sequence of collectives. Exceptions from the backend
// (timeouts, aborts) propagate.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "runtime/communicator.h"
#include "runtime/device.h"

namespace troupe::runtime {

struct comm_check_options {
  std::vector<int64_t> sizes{1, 7, 4099};  // elements per rank per check
  device dev = device::cpu();               // where the buffers live (cuda for NCCL)
  bool point_to_point = true;               // include send/recv (NCCL groups may skip)
  // bf16 sums (all_reduce, reduce_scatter): 0 demands the exact fp32-accumulated,
  // once-rounded result. t > 0 accepts |got - exact sum| <= t * sum_r |x_r|, for backends
  // that round every partial sum to bf16 (NCCL: use P / 256.0, i.e. P bf16 roundings;
  // with P <= 4 the suite's inputs keep every partial sum exact anyway).
  double bf16_sum_tolerance = 0;
};

struct comm_check {
  std::string name;    // "all_reduce sum bf16 n=4099"
  bool ok = false;
  std::string detail;  // first mismatch: index, got, want
  double seconds = 0;
};

std::vector<comm_check> check_communicator(communicator& c, const comm_check_options& options = {});

// "27/27 passed (backend mpi, 4 ranks)" or the first failures, one per line.
std::string summarize(const std::vector<comm_check>& results, const communicator& c);

}  // namespace troupe::runtime
