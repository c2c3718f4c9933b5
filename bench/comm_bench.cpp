// bench/comm_bench.cpp — the data plane's collectives against raw MPI in the same run:
// all_reduce (sum, f32) and all_to_all_v (equal counts) at several message sizes, as
// bus bandwidth, for MPI_Allreduce / MPI_Alltoallv on MPI_COMM_WORLD (the baseline),
// troupe's MPI backend and troupe's UCX backend (bootstrapped over MPI). Plus the
// latency of a bare MPI_Barrier, the floor under any control-plane round trip.
//
//   mpirun --oversubscribe -np 4 build/bench/comm_bench            # 64 KiB, 1 MiB, 16 MiB
//   mpirun -np 2 build/bench/comm_bench --quick                   # 1 MiB, few iterations
//   mpirun -np 2 build/bench/comm_bench --ucx-tls tcp             # UCX over TCP instead
//
// Bus bandwidth follows nccl-tests: all_reduce busbw = 2(P-1)/P * bytes / t,
// all_to_all busbw = (P-1)/P * bytes / t, bytes = the buffer size on each rank. t is the
// slowest rank's mean time per call, best of 7 trials (the backends take turns within a trial); the ratio is busbw / baseline's.
#include <fmt/format.h>

#include <cstdio>
#include <cstring>
#include <string>

#ifdef TROUPE_HAVE_MPI
#define OMPI_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <vector>

#include "runtime/communicator_mpi.h"
#include "runtime/error.h"
#ifdef TROUPE_HAVE_UCX
#include "runtime/communicator_ucx.h"
#endif

using namespace troupe::runtime;

namespace {

struct args {
  bool quick = false;
  std::string ucx_tls = "posix,cma,self";
};

// Mean seconds per call of the slowest rank for each op, best of `trials` runs of
// `iters` calls. The ops take turns within each trial, so a load spike on the machine
// hits all of them alike rather than one backend's whole measurement.
std::vector<double> time_ops(int iters, int trials, const std::vector<std::function<void()>>& ops) {
  for (const auto& op : ops) op();  // warm-up (and first touch of buffers)
  std::vector<double> best(ops.size(), 1e30);
  for (int t = 0; t < trials; ++t)
    for (size_t k = 0; k < ops.size(); ++k) {
      MPI_Barrier(MPI_COMM_WORLD);
      const double t0 = MPI_Wtime();
      for (int i = 0; i < iters; ++i) ops[k]();
      double mine = (MPI_Wtime() - t0) / iters, slowest = 0;
      MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
      best[k] = std::min(best[k], slowest);
    }
  return best;
}

struct row {
  std::string op, size, backend;
  double us = 0, busbw = 0, ratio = 0;
};

std::string human(size_t bytes) {
  if (bytes >= (1u << 20)) return fmt::format("{} MiB", bytes >> 20);
  return fmt::format("{} KiB", bytes >> 10);
}

int run(const args& a) {
  mpi_session mpi;
  const int P = mpi.size(), me = mpi.rank();
  communicator_options co;
  co.timeout_ms = 120000;
  auto tmpi = make_mpi_communicator(co);
  std::unique_ptr<communicator> tucx;
  std::string ucx_note;
#ifdef TROUPE_HAVE_UCX
  try {
    auto boot = make_mpi_bootstrap();
    ucx_options uo;
    uo.timeout_ms = 120000;
    uo.transports = a.ucx_tls;
    tucx = make_ucx_communicator(*boot, uo);
  } catch (const error& e) {
    ucx_note = fmt::format("UCX backend skipped: {}", e.what());
  }
#else
  ucx_note = "UCX backend skipped: built without UCX";
#endif
  // Every rank must agree on whether UCX takes part.
  int have = tucx ? 1 : 0, all = 0;
  MPI_Allreduce(&have, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  if (!all) tucx.reset();

  const std::vector<size_t> sizes = a.quick ? std::vector<size_t>{1u << 20} : std::vector<size_t>{64u << 10, 1u << 20, 16u << 20};
  const int trials = a.quick ? 1 : 7;
  std::vector<row> rows;
  for (size_t bytes : sizes) {
    const int64_t n = static_cast<int64_t>(bytes / sizeof(float));
    const int iters = a.quick ? 3 : std::max(3, static_cast<int>((64u << 20) / bytes));  // ~64 MiB moved per trial
    const double ar_f = 2.0 * (P - 1) / P, a2a_f = static_cast<double>(P - 1) / P;
    // Times ops[0] (raw MPI), ops[1] (troupe mpi) and, with UCX, ops[2]; adds their rows.
    auto measure = [&](const char* op, double factor, std::vector<std::function<void()>> ops) {
      if (!tucx) ops.pop_back();
      const auto t = time_ops(iters, trials, ops);
      const char* names[] = {"raw MPI", "troupe mpi", "troupe ucx"};
      const double base = factor * static_cast<double>(bytes) / t[0] / 1e9;
      for (size_t k = 0; k < t.size(); ++k) {
        const double busbw = factor * static_cast<double>(bytes) / t[k] / 1e9;
        rows.push_back(row{op, human(bytes), names[k], t[k] * 1e6, busbw, busbw / base});
      }
    };
    // all_reduce: zeros stay zeros, so repeated in-place sums never overflow.
    std::vector<float> buf(static_cast<size_t>(n), 0.f);
    tensor t = tensor::zeros({n});
    measure("all_reduce", ar_f,
            {[&] { MPI_Allreduce(MPI_IN_PLACE, buf.data(), static_cast<int>(n), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD); },
             [&] { tmpi->all_reduce(t, reduce_op::sum); }, [&] { tucx->all_reduce(t, reduce_op::sum); }});
    // all_to_all_v with equal counts: n/P elements to every rank.
    const int64_t per = n / P;
    std::vector<int> counts(static_cast<size_t>(P), static_cast<int>(per)), displs(static_cast<size_t>(P));
    for (int r = 0; r < P; ++r) displs[static_cast<size_t>(r)] = static_cast<int>(per * r);
    std::vector<float> sbuf(static_cast<size_t>(per * P), 1.f), rbuf(sbuf.size());
    std::vector<int64_t> c64(static_cast<size_t>(P), per);
    tensor ts = tensor::full({per * P}, 1.0), tr = tensor::zeros({per * P});
    measure("all_to_all_v", a2a_f,
            {[&] {
               MPI_Alltoallv(sbuf.data(), counts.data(), displs.data(), MPI_FLOAT, rbuf.data(), counts.data(),
                             displs.data(), MPI_FLOAT, MPI_COMM_WORLD);
             },
             [&] { tmpi->all_to_all_v(tr, c64, ts, c64); }, [&] { tucx->all_to_all_v(tr, c64, ts, c64); }});
  }
  const int bar_iters = a.quick ? 100 : 2000;
  std::vector<std::function<void()>> bars{[] { MPI_Barrier(MPI_COMM_WORLD); }, [&] { tmpi->barrier(); },
                                          [&] { tucx->barrier(); }};
  if (!tucx) bars.pop_back();
  const auto bar = time_ops(bar_iters, trials, bars);
  const double bar_raw = bar[0], bar_mpi = bar[1], bar_ucx = tucx ? bar[2] : 0;

  if (me == 0) {
    std::printf("comm_bench: %d ranks, f32, best of %d trials%s\n", P, trials, a.quick ? " (--quick)" : "");
    if (!ucx_note.empty()) std::printf("%s\n", ucx_note.c_str());
    if (tucx) std::printf("UCX transports: %s\n", a.ucx_tls.empty() ? "(UCX default)" : a.ucx_tls.c_str());
    std::printf("| op | bytes/rank | backend | time us | busbw GB/s | vs raw MPI |\n|---|---:|---|---:|---:|---:|\n");
    for (const auto& r : rows)
      std::printf("| %s | %s | %s | %.1f | %.3f | %.2fx |\n", r.op.c_str(), r.size.c_str(), r.backend.c_str(), r.us,
                  r.busbw, r.ratio);
    std::printf("\nbarrier latency: MPI_Barrier %.1f us; troupe mpi barrier %.1f us (%.2fx)", bar_raw * 1e6,
                bar_mpi * 1e6, bar_mpi / bar_raw);
    if (tucx) std::printf("; troupe ucx barrier %.1f us (%.2fx)", bar_ucx * 1e6, bar_ucx / bar_raw);
    std::printf("\n");
  }
  tucx.reset();
  tmpi.reset();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  args a;
  for (int i = 1; i < argc; ++i) {
    const std::string s = argv[i];
    if (s == "--quick") a.quick = true;
    else if (s == "--ucx-tls" && i + 1 < argc) a.ucx_tls = argv[++i];
    else {
      std::fprintf(stderr, "usage: mpirun -np P %s [--quick] [--ucx-tls posix,cma,self|tcp|\"\"]\n", argv[0]);
      return 2;
    }
  }
  try {
    return run(a);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "comm_bench: %s\n", e.what());
    return 1;
  }
}

#else  // TROUPE_HAVE_MPI

int main() {
  std::fprintf(stderr, "comm_bench: troupe was built without MPI; install Open MPI and reconfigure\n");
  return 1;
}

#endif  // TROUPE_HAVE_MPI
