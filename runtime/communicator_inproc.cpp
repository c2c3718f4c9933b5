// runtime/communicator_inproc.cpp — the in-process backend: ranks are threads sharing
// memory. Each collective is post → barrier → compute into a private buffer → barrier
// → write back, so no rank reads a buffer another rank is overwriting.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <tuple>

#include "runtime/communicator.h"

namespace troupe::runtime {

namespace {

struct posted {
  const char* op = nullptr;
  const void* data = nullptr;
  int64_t numel = 0;
  dtype dt = dtype::f32;
  const std::vector<int64_t>* counts = nullptr;
  int root = -1;
};

struct shared_state {
  int P;
  int timeout_ms;
  std::mutex mu;
  std::condition_variable cv;
  int64_t generation = 0;
  int arrived = 0;
  std::vector<bool> present;
  std::vector<posted> slots;
  std::string aborted;  // non-empty once abort() was called: every wait throws errc::aborted
  std::map<std::tuple<int, int, int>, std::deque<std::vector<char>>> mail;  // (src, dst, tag)
  shared_state(int p, int t) : P(p), timeout_ms(t), present(static_cast<size_t>(p)), slots(static_cast<size_t>(p)) {}
};

template <typename T>
T combine(T a, T b, reduce_op op) {
  return op == reduce_op::sum ? a + b : std::max(a, b);
}

// out[i] = reduce over r of src[r][offset + i], ranks in order 0..P-1.
template <typename T>
void reduce_typed(T* out, const std::vector<const void*>& src, int64_t offset, int64_t n, reduce_op op) {
  for (int64_t i = 0; i < n; ++i) {
    T acc = static_cast<const T*>(src[0])[offset + i];
    for (size_t r = 1; r < src.size(); ++r) acc = combine(acc, static_cast<const T*>(src[r])[offset + i], op);
    out[i] = acc;
  }
}

void reduce_any(void* out, dtype dt, const std::vector<const void*>& src, int64_t offset, int64_t n, reduce_op op) {
  switch (dt) {
    case dtype::f32: return reduce_typed(static_cast<float*>(out), src, offset, n, op);
    case dtype::i32: return reduce_typed(static_cast<int32_t*>(out), src, offset, n, op);
    case dtype::i64: return reduce_typed(static_cast<int64_t*>(out), src, offset, n, op);
    case dtype::bf16: {
      auto* o = static_cast<uint16_t*>(out);
      for (int64_t i = 0; i < n; ++i) {
        float acc = bf16_to_f32(static_cast<const uint16_t*>(src[0])[offset + i]);
        for (size_t r = 1; r < src.size(); ++r)
          acc = combine(acc, bf16_to_f32(static_cast<const uint16_t*>(src[r])[offset + i]), op);
        o[i] = f32_to_bf16(acc);
      }
      return;
    }
    default:
      TROUPE_THROW(errc::unsupported, "inproc reduction of {} is not supported (f32, bf16, i32, i64)", dtype_name(dt));
  }
}

void check_buffer(const char* op, const char* name, const tensor& t) {
  TROUPE_CHECK(t.defined() && t.device().is_cpu() && t.is_contiguous(), errc::invalid_argument,
               "{}: '{}' must be a contiguous cpu tensor, got {}", op, name, t.defined() ? t.describe() : "undefined");
}

class inproc_communicator final : public communicator {
 public:
  inproc_communicator(std::shared_ptr<shared_state> s, int rank) : s_(std::move(s)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return s_->P; }
  std::string backend() const override { return "inproc"; }

  void barrier() override {
    post({"barrier"});
    arrive("barrier", true);
    arrive("barrier", false);
  }

  void all_reduce(tensor& t, reduce_op op) override {
    check_buffer("all_reduce", "t", t);
    post({"all_reduce", t.data_ptr(), t.numel(), t.dtype()});
    arrive("all_reduce", true);
    check_same("all_reduce", t.numel(), t.dtype());
    std::vector<char> tmp(t.nbytes());
    reduce_any(tmp.data(), t.dtype(), datas(), 0, t.numel(), op);
    arrive("all_reduce", false);
    std::memcpy(t.data_ptr(), tmp.data(), tmp.size());
  }

  void reduce_scatter(tensor& out, const tensor& in, reduce_op op) override {
    check_buffer("reduce_scatter", "in", in);
    check_buffer("reduce_scatter", "out", out);
    const int64_t n = out.numel();
    TROUPE_CHECK(in.numel() == n * size() && in.dtype() == out.dtype(), errc::invalid_argument,
                 "reduce_scatter: in {} must hold {} x out {}", in.describe(), size(), out.describe());
    post({"reduce_scatter", in.data_ptr(), in.numel(), in.dtype()});
    arrive("reduce_scatter", true);
    check_same("reduce_scatter", in.numel(), in.dtype());
    std::vector<char> tmp(out.nbytes());
    reduce_any(tmp.data(), in.dtype(), datas(), n * rank_, n, op);
    arrive("reduce_scatter", false);
    std::memcpy(out.data_ptr(), tmp.data(), tmp.size());
  }

  void all_gather(tensor& out, const tensor& in) override {
    check_buffer("all_gather", "in", in);
    check_buffer("all_gather", "out", out);
    TROUPE_CHECK(out.numel() == in.numel() * size() && in.dtype() == out.dtype(), errc::invalid_argument,
                 "all_gather: out {} must hold {} x in {}", out.describe(), size(), in.describe());
    post({"all_gather", in.data_ptr(), in.numel(), in.dtype()});
    arrive("all_gather", true);
    check_same("all_gather", in.numel(), in.dtype());
    std::vector<char> tmp(out.nbytes());
    const size_t block = in.nbytes();
    for (int r = 0; r < size(); ++r) std::memcpy(tmp.data() + block * r, slot(r).data, block);
    arrive("all_gather", false);
    std::memcpy(out.data_ptr(), tmp.data(), tmp.size());
  }

  void all_to_all_v(tensor& recv, const std::vector<int64_t>& recv_counts, const tensor& send,
                    const std::vector<int64_t>& send_counts) override {
    const char* op = "all_to_all_v";
    check_buffer(op, "send", send);
    check_buffer(op, "recv", recv);
    const size_t P = static_cast<size_t>(size());
    TROUPE_CHECK(send_counts.size() == P && recv_counts.size() == P, errc::invalid_argument,
                 "{}: need {} send and recv counts, got {} and {}", op, P, send_counts.size(), recv_counts.size());
    int64_t send_total = 0, recv_total = 0;
    for (size_t r = 0; r < P; ++r) {
      TROUPE_CHECK(send_counts[r] >= 0 && recv_counts[r] >= 0, errc::invalid_argument, "{}: negative count", op);
      send_total += send_counts[r];
      recv_total += recv_counts[r];
    }
    TROUPE_CHECK(send.numel() >= send_total && recv.numel() >= recv_total && send.dtype() == recv.dtype(),
                 errc::invalid_argument, "{}: send {} / recv {} too small for {} / {} elements", op, send.describe(),
                 recv.describe(), send_total, recv_total);
    posted p{op, send.data_ptr(), send.numel(), send.dtype()};
    p.counts = &send_counts;
    post(p);
    arrive(op, true);
    const size_t es = dtype_size(send.dtype());
    std::vector<char> tmp(static_cast<size_t>(recv_total) * es);
    int64_t at = 0;
    for (size_t r = 0; r < P; ++r) {
      const posted& other = slot(static_cast<int>(r));
      TROUPE_CHECK(other.dt == send.dtype(), errc::invalid_argument, "{}: rank {} sends {} but rank {} {}", op, r,
                   dtype_name(other.dt), rank_, dtype_name(send.dtype()));
      const auto& oc = *other.counts;
      TROUPE_CHECK(oc[static_cast<size_t>(rank_)] == recv_counts[r], errc::invalid_argument,
                   "{}: rank {} sends {} elements to rank {}, which expects recv_counts[{}] = {}", op, r,
                   oc[static_cast<size_t>(rank_)], rank_, r, recv_counts[r]);
      int64_t off = 0;
      for (int j = 0; j < rank_; ++j) off += oc[static_cast<size_t>(j)];
      std::memcpy(tmp.data() + at * static_cast<int64_t>(es), static_cast<const char*>(other.data) + off * es,
                  static_cast<size_t>(recv_counts[r]) * es);
      at += recv_counts[r];
    }
    arrive(op, false);
    std::memcpy(recv.data_ptr(), tmp.data(), tmp.size());
  }

  void broadcast(tensor& t, int root) override {
    check_buffer("broadcast", "t", t);
    TROUPE_CHECK(root >= 0 && root < size(), errc::invalid_argument, "broadcast: root {} not in [0, {})", root, size());
    posted p{"broadcast", t.data_ptr(), t.numel(), t.dtype()};
    p.root = root;
    post(p);
    arrive("broadcast", true);
    check_same("broadcast", t.numel(), t.dtype());
    for (int r = 0; r < size(); ++r)
      TROUPE_CHECK(slot(r).root == root, errc::invalid_argument, "broadcast: rank {} uses root {}, rank {} root {}",
                   r, slot(r).root, rank_, root);
    std::vector<char> tmp(t.nbytes());
    std::memcpy(tmp.data(), slot(root).data, tmp.size());
    arrive("broadcast", false);
    if (rank_ != root) std::memcpy(t.data_ptr(), tmp.data(), tmp.size());
  }

  void send(const tensor& t, int peer, int tag) override {
    check_buffer("send", "t", t);
    TROUPE_CHECK(peer >= 0 && peer < size() && peer != rank_, errc::invalid_argument, "send: bad peer {}", peer);
    std::vector<char> bytes(t.nbytes());
    std::memcpy(bytes.data(), t.data_ptr(), bytes.size());
    std::lock_guard<std::mutex> g(s_->mu);
    s_->mail[{rank_, peer, tag}].push_back(std::move(bytes));
    s_->cv.notify_all();
  }

  void recv(tensor& t, int peer, int tag) override {
    check_buffer("recv", "t", t);
    TROUPE_CHECK(peer >= 0 && peer < size() && peer != rank_, errc::invalid_argument, "recv: bad peer {}", peer);
    std::unique_lock<std::mutex> lock(s_->mu);
    auto key = std::make_tuple(peer, rank_, tag);
    const bool got = s_->cv.wait_for(lock, std::chrono::milliseconds(s_->timeout_ms),
                                     [&] { return !s_->mail[key].empty() || !s_->aborted.empty(); });
    throw_if_aborted("recv");
    TROUPE_CHECK(got, errc::io, "recv: rank {} waited {} ms for a message from rank {} (tag {}); is rank {} alive?",
                 rank_, s_->timeout_ms, peer, tag, peer);
    std::vector<char> bytes = std::move(s_->mail[key].front());
    s_->mail[key].pop_front();
    TROUPE_CHECK(bytes.size() == t.nbytes(), errc::invalid_argument,
                 "recv: rank {} sent {} bytes (tag {}) but rank {} expects {} ({})", peer, bytes.size(), tag, rank_,
                 t.nbytes(), t.describe());
    std::memcpy(t.data_ptr(), bytes.data(), bytes.size());
  }

  void abort(const std::string& reason) override {
    std::lock_guard<std::mutex> g(s_->mu);
    if (s_->aborted.empty()) s_->aborted = reason.empty() ? "aborted" : reason;
    s_->cv.notify_all();
  }

 private:
  const posted& slot(int r) const { return s_->slots[static_cast<size_t>(r)]; }
  std::vector<const void*> datas() const {
    std::vector<const void*> d;
    for (const auto& p : s_->slots) d.push_back(p.data);
    return d;
  }
  void post(const posted& p) {
    std::lock_guard<std::mutex> g(s_->mu);
    s_->slots[static_cast<size_t>(rank_)] = p;
  }
  void check_same(const char* op, int64_t numel, dtype dt) const {
    for (int r = 0; r < size(); ++r)
      TROUPE_CHECK(slot(r).numel == numel && slot(r).dt == dt, errc::invalid_argument,
                   "{}: rank {} passes {} elements of {} but rank {} passes {} of {}", op, r, slot(r).numel,
                   dtype_name(slot(r).dt), rank_, numel, dtype_name(dt));
  }
  // A generation barrier with a timeout; also checks that every rank is in the same op.
  void arrive(const char* op, bool check_op) {
    std::unique_lock<std::mutex> lock(s_->mu);
    throw_if_aborted(op);
    const int64_t gen = s_->generation;
    s_->present[static_cast<size_t>(rank_)] = true;
    if (++s_->arrived == s_->P) {
      s_->arrived = 0;
      std::fill(s_->present.begin(), s_->present.end(), false);
      ++s_->generation;
      s_->cv.notify_all();
    } else {
      const bool ok = s_->cv.wait_for(lock, std::chrono::milliseconds(s_->timeout_ms),
                                      [&] { return s_->generation != gen || !s_->aborted.empty(); });
      throw_if_aborted(op);
      if (!ok) {
        std::string missing;
        for (int r = 0; r < s_->P; ++r)
          if (!s_->present[static_cast<size_t>(r)]) missing += (missing.empty() ? "" : ", ") + std::to_string(r);
        TROUPE_THROW(errc::io, "{}: rank {} waited {} ms; rank(s) {} never arrived (dead or stuck)", op, rank_,
                     s_->timeout_ms, missing);
      }
    }
    // Only right after posting: once a rank passes the second barrier it may post its
    // next operation, so the slots are stable only between the two barriers.
    for (int r = 0; check_op && r < s_->P; ++r) {
      const char* other = s_->slots[static_cast<size_t>(r)].op;
      TROUPE_CHECK(other != nullptr && std::strcmp(other, op) == 0, errc::invalid_argument,
                   "collective mismatch: rank {} is in {} while rank {} is in {}", rank_, op, r,
                   other ? other : "nothing");
    }
  }

  void throw_if_aborted(const char* op) const {  // with s_->mu held
    if (!s_->aborted.empty()) TROUPE_THROW(errc::aborted, "{}: rank {}: group aborted: {}", op, rank_, s_->aborted);
  }

  std::shared_ptr<shared_state> s_;
  int rank_;
};

}  // namespace

std::vector<std::unique_ptr<communicator>> make_inproc_group(int size, int timeout_ms) {
  TROUPE_CHECK(size >= 1, errc::invalid_argument, "make_inproc_group: size {} must be >= 1", size);
  auto state = std::make_shared<shared_state>(size, timeout_ms);
  std::vector<std::unique_ptr<communicator>> out;
  for (int r = 0; r < size; ++r) out.push_back(std::make_unique<inproc_communicator>(state, r));
  return out;
}

}  // namespace troupe::runtime
