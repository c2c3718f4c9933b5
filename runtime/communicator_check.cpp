// runtime/communicator_check.cpp — see communicator_check.h.
#include "runtime/communicator_check.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <random>

#include "runtime/dtype.h"
#include "runtime/error.h"

namespace troupe::runtime {

namespace {

// Rank r's input element i for check `salt`: an integer in [-63, 63], seen as k/8 for
// floats. Max over ranks is unique-ish; sums stay exact in f32 and in fp32-then-bf16.
int64_t ival(int rank, int64_t i, int salt) {
  uint64_t h = static_cast<uint64_t>(rank + 1) * 0x9E3779B97F4A7C15ull ^ static_cast<uint64_t>(i + 1) * 0xC2B2AE3D27D4EB4Full ^
               static_cast<uint64_t>(salt + 7) * 0x165667B19E3779F9ull;
  h ^= h >> 29;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 32;
  return static_cast<int64_t>(h % 127) - 63;
}

// The integer payload for dtype dt: big values for i64 so 32-bit truncation would show.
int64_t payload(dtype dt, int rank, int64_t i, int salt) {
  const int64_t v = ival(rank, i, salt);
  if (dt == dtype::i64) return v * 1000000007ll * 1000 + rank;
  if (dt == dtype::i32) return v * 100003 + rank;
  return v;
}

double as_number(dtype dt, int64_t p) { return (dt == dtype::f32 || dt == dtype::bf16) ? static_cast<double>(p) / 8.0 : static_cast<double>(p); }

void store(tensor& t, int64_t i, dtype dt, double v) {
  switch (dt) {
    case dtype::f32: static_cast<float*>(t.data_ptr())[i] = static_cast<float>(v); break;
    case dtype::bf16: static_cast<uint16_t*>(t.data_ptr())[i] = f32_to_bf16(static_cast<float>(v)); break;
    case dtype::i32: static_cast<int32_t*>(t.data_ptr())[i] = static_cast<int32_t>(v); break;
    case dtype::i64: static_cast<int64_t*>(t.data_ptr())[i] = static_cast<int64_t>(v); break;
    default: TROUPE_THROW(errc::unsupported, "communicator check: dtype {}", dtype_name(dt));
  }
}

double load(const tensor& t, int64_t i, dtype dt) {
  switch (dt) {
    case dtype::f32: return static_cast<const float*>(t.data_ptr())[i];
    case dtype::bf16: return bf16_to_f32(static_cast<const uint16_t*>(t.data_ptr())[i]);
    case dtype::i32: return static_cast<const int32_t*>(t.data_ptr())[i];
    case dtype::i64: return static_cast<double>(static_cast<const int64_t*>(t.data_ptr())[i]);
    default: TROUPE_THROW(errc::unsupported, "communicator check: dtype {}", dtype_name(dt));
  }
}

// Exact comparison; i64 compared as integers (doubles lose the low bits).
bool same(const tensor& got, int64_t i, dtype dt, double want, int64_t want_i64) {
  if (dt == dtype::i64) return static_cast<const int64_t*>(got.data_ptr())[i] == want_i64;
  if (dt == dtype::bf16) return load(got, i, dt) == static_cast<double>(bf16_to_f32(f32_to_bf16(static_cast<float>(want))));
  return load(got, i, dt) == want;
}

struct runner {
  communicator& c;
  const comm_check_options& o;
  std::vector<comm_check> out;
  int P, me;

  tensor on_device(const tensor& host) const { return o.dev.is_cpu() ? host : host.to(o.dev); }
  tensor to_host(const tensor& t) const { return o.dev.is_cpu() ? t : t.to(device::cpu()); }

  // Rank r's input of n elements (k/8 for floats).
  tensor input(dtype dt, int r, int64_t n, int salt) const {
    tensor t = tensor::empty({std::max<int64_t>(n, 1)}, dt);
    for (int64_t i = 0; i < n; ++i) store(t, i, dt, as_number(dt, payload(dt, r, i, salt)));
    return n == 0 ? tensor::empty({0}, dt) : t;
  }

  template <typename F>
  void run(const std::string& name, F&& body) {
    comm_check r;
    r.name = name;
    const auto t0 = std::chrono::steady_clock::now();
    r.detail = body();
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    r.ok = r.detail.empty();
    out.push_back(std::move(r));
  }

  // Mismatch report for element i, or "".
  static std::string mismatch(const tensor& got, int64_t i, dtype dt, double want, int64_t want_i64) {
    if (same(got, i, dt, want, want_i64)) return "";
    if (dt == dtype::i64)
      return fmt::format("element {}: got {} want {}", i, static_cast<const int64_t*>(got.data_ptr())[i], want_i64);
    return fmt::format("element {}: got {} want {}", i, load(got, i, dt), want);
  }

  // A bf16 sum under options.bf16_sum_tolerance: scale is sum_r |x_r| for element i.
  std::string mismatch_bf16_sum(const tensor& got, int64_t i, double want, double scale) const {
    const double g = load(got, i, dtype::bf16);
    if (std::abs(g - want) <= o.bf16_sum_tolerance * scale) return "";
    return fmt::format("element {}: got {} want {} (tolerance {} x {})", i, g, want, o.bf16_sum_tolerance, scale);
  }
  bool bf16_tolerant(dtype dt, reduce_op op) const { return dt == dtype::bf16 && op == reduce_op::sum && o.bf16_sum_tolerance > 0; }

  void all_reduce(dtype dt, reduce_op op, int64_t n, int salt) {
    run(fmt::format("all_reduce {} {} n={}", op == reduce_op::sum ? "sum" : "max", dtype_name(dt), n), [&] {
      tensor t = on_device(input(dt, me, n, salt));
      c.all_reduce(t, op);
      const tensor got = to_host(t);
      for (int64_t i = 0; i < n; ++i) {
        double want = 0, scale = 0;
        int64_t want_i = 0;
        for (int r = 0; r < P; ++r) {
          const int64_t p = payload(dt, r, i, salt);
          const double v = as_number(dt, p);
          scale += std::abs(v);
          if (op == reduce_op::sum) want += v, want_i += p;
          else if (r == 0 || v > want) want = v, want_i = p;
        }
        if (bf16_tolerant(dt, op)) {
          if (auto m = mismatch_bf16_sum(got, i, want, scale); !m.empty()) return m;
        } else if (auto m = mismatch(got, i, dt, want, want_i); !m.empty()) {
          return m;
        }
      }
      return std::string();
    });
  }

  void reduce_scatter(dtype dt, int64_t n, int salt) {
    run(fmt::format("reduce_scatter sum {} n={}", dtype_name(dt), n), [&] {
      tensor in = on_device(input(dt, me, n * P, salt));
      tensor o_ = tensor::zeros({n}, dt, o.dev);
      c.reduce_scatter(o_, in, reduce_op::sum);
      const tensor got = to_host(o_);
      for (int64_t i = 0; i < n; ++i) {
        double want = 0, scale = 0;
        int64_t want_i = 0;
        for (int r = 0; r < P; ++r) {
          const int64_t p = payload(dt, r, me * n + i, salt);
          want += as_number(dt, p), want_i += p;
          scale += std::abs(as_number(dt, p));
        }
        if (bf16_tolerant(dt, reduce_op::sum)) {
          if (auto m = mismatch_bf16_sum(got, i, want, scale); !m.empty()) return m;
        } else if (auto m = mismatch(got, i, dt, want, want_i); !m.empty()) {
          return m;
        }
      }
      return std::string();
    });
  }

  void all_gather(dtype dt, int64_t n, int salt) {
    run(fmt::format("all_gather {} n={}", dtype_name(dt), n), [&] {
      tensor in = on_device(input(dt, me, n, salt));
      tensor o_ = tensor::zeros({n * P}, dt, o.dev);
      c.all_gather(o_, in);
      const tensor got = to_host(o_);
      for (int r = 0; r < P; ++r)
        for (int64_t i = 0; i < n; ++i) {
          const int64_t p = payload(dt, r, i, salt);
          if (auto m = mismatch(got, r * n + i, dt, as_number(dt, p), p); !m.empty())
            return fmt::format("block of rank {}: {}", r, m);
        }
      return std::string();
    });
  }

  // Uneven counts, zeros included: count(src -> dst) elements.
  static int64_t count(int src, int dst, int64_t n) { return (src * 3 + dst * 5 + n) % 7 == 0 ? 0 : ((src + 2 * dst + n) % 5) * n / 4 + 1; }

  void all_to_all_v(dtype dt, int64_t n, int salt) {
    run(fmt::format("all_to_all_v {} n={}", dtype_name(dt), n), [&] {
      std::vector<int64_t> sc(static_cast<size_t>(P)), rc(static_cast<size_t>(P));
      int64_t st = 0, rt = 0;
      for (int r = 0; r < P; ++r) {
        st += sc[static_cast<size_t>(r)] = count(me, r, n);
        rt += rc[static_cast<size_t>(r)] = count(r, me, n);
      }
      // Rank s's send buffer is one input stream; its block for rank d starts at the
      // sum of its counts for ranks < d.
      tensor send = on_device(input(dt, me, st, salt));
      tensor recv = tensor::zeros({std::max<int64_t>(rt, 1)}, dt, o.dev);
      c.all_to_all_v(recv, rc, send, sc);
      const tensor got = to_host(recv);
      int64_t at = 0;
      for (int s = 0; s < P; ++s) {
        int64_t off = 0;
        for (int d = 0; d < me; ++d) off += count(s, d, n);
        for (int64_t i = 0; i < count(s, me, n); ++i, ++at) {
          const int64_t p = payload(dt, s, off + i, salt);
          if (auto m = mismatch(got, at, dt, as_number(dt, p), p); !m.empty())
            return fmt::format("block from rank {}: {}", s, m);
        }
      }
      return std::string();
    });
  }

  void broadcast(dtype dt, int64_t n, int root, int salt) {
    run(fmt::format("broadcast {} n={} root={}", dtype_name(dt), n, root), [&] {
      tensor t = on_device(me == root ? input(dt, me, n, salt) : tensor::zeros({n}, dt));
      c.broadcast(t, root);
      const tensor got = to_host(t);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t p = payload(dt, root, i, salt);
        if (auto m = mismatch(got, i, dt, as_number(dt, p), p); !m.empty()) return m;
      }
      return std::string();
    });
  }

  // Ring: rank r sends to r+1 and receives from r-1. Rank 0 sends first and everyone
  // else receives first, a chain that completes for any P even if sends block until
  // matched (rendezvous).
  void send_recv(dtype dt, int64_t n, int salt) {
    run(fmt::format("send/recv ring {} n={}", dtype_name(dt), n), [&] {
      if (P == 1) return std::string();
      const int next = (me + 1) % P, prev = (me + P - 1) % P;
      tensor s = on_device(input(dt, me, n, salt));
      tensor r = tensor::zeros({n}, dt, o.dev);
      if (me == 0) {
        c.send(s, next, 100 + salt);
        c.recv(r, prev, 100 + salt);
      } else {
        c.recv(r, prev, 100 + salt);
        c.send(s, next, 100 + salt);
      }
      const tensor got = to_host(r);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t p = payload(dt, prev, i, salt);
        if (auto m = mismatch(got, i, dt, as_number(dt, p), p); !m.empty()) return fmt::format("from rank {}: {}", prev, m);
      }
      return std::string();
    });
  }

  // Random (non-dyadic) f32 sums: order matters, so this checks that every rank got
  // bitwise the same result (invariant 2), by gathering a hash of each rank's result.
  void identical_everywhere(int64_t n) {
    run(fmt::format("all_reduce sum f32 identical on every rank n={}", n), [&] {
      std::mt19937 gen(static_cast<uint32_t>(1234 + me));
      std::uniform_real_distribution<float> u(-1.f, 1.f);
      tensor t = tensor::empty({n});
      for (int64_t i = 0; i < n; ++i) t.data<float>()[i] = u(gen);
      tensor d = on_device(t);
      c.all_reduce(d, reduce_op::sum);
      const tensor got = to_host(d);
      uint64_t h = 1469598103934665603ull;
      for (int64_t i = 0; i < n; ++i) {
        uint32_t bits;
        std::memcpy(&bits, got.data<float>() + i, 4);
        h = (h ^ bits) * 1099511628211ull;
      }
      tensor mine = tensor::empty({1}, dtype::i64);
      mine.data<int64_t>()[0] = static_cast<int64_t>(h >> 1);
      tensor all = tensor::zeros({P}, dtype::i64, o.dev);
      tensor mine_d = on_device(mine);
      c.all_gather(all, mine_d);
      const tensor hashes = to_host(all);
      for (int r = 0; r < P; ++r)
        if (hashes.data<int64_t>()[r] != mine.data<int64_t>()[0])
          return fmt::format("rank {} holds a different result than rank {}", r, me);
      return std::string();
    });
  }
};

}  // namespace

std::vector<comm_check> check_communicator(communicator& c, const comm_check_options& options) {
  runner r{c, options, {}, c.size(), c.rank()};
  int salt = 0;
  const dtype all_types[] = {dtype::f32, dtype::bf16, dtype::i32, dtype::i64};
  for (int64_t n : options.sizes) {
    for (dtype dt : all_types) {
      r.all_reduce(dt, reduce_op::sum, n, ++salt);
      r.all_reduce(dt, reduce_op::max, n, ++salt);
    }
    for (dtype dt : {dtype::f32, dtype::bf16, dtype::i64}) r.reduce_scatter(dt, n, ++salt);
    for (dtype dt : {dtype::f32, dtype::i32}) r.all_gather(dt, n, ++salt);
    for (dtype dt : {dtype::f32, dtype::i64}) r.all_to_all_v(dt, n, ++salt);
    r.broadcast(dtype::bf16, n, static_cast<int>(n % r.P), ++salt);
    if (options.point_to_point) r.send_recv(dtype::f32, n, ++salt);
  }
  r.identical_everywhere(options.sizes.empty() ? 1 : options.sizes.back());
  r.run("barrier", [&] {
    c.barrier();
    return std::string();
  });
  return r.out;
}

std::string summarize(const std::vector<comm_check>& results, const communicator& c) {
  int passed = 0;
  std::string failures;
  for (const auto& r : results) {
    if (r.ok) ++passed;
    else failures += fmt::format("\n  FAIL {}: {}", r.name, r.detail);
  }
  return fmt::format("{}/{} checks passed (backend {}, {} ranks){}", passed, results.size(), c.backend(), c.size(),
                     failures);
}

}  // namespace troupe::runtime
