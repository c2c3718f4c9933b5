// runtime/communicator_mpi.cpp — see communicator_mpi.h. Collectives are direct
// exchanges of MPI_Isend/MPI_Irecv with a polling wait that knows which peer each
// request belongs to, so a timeout names the ranks that never delivered.
#include "runtime/communicator_mpi.h"

#include <cstdlib>

#include "runtime/error.h"

#ifdef TROUPE_HAVE_MPI
#define OMPI_SKIP_MPICXX 1
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "runtime/dtype.h"
#endif

namespace troupe::runtime {

bool mpi_session::launched_by_mpirun() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "PMI_FD"})
    if (std::getenv(v) != nullptr) return true;
  return false;
}

#ifndef TROUPE_HAVE_MPI

#define TROUPE_NO_MPI(what) \
  TROUPE_THROW(errc::unsupported, "{}: troupe was built without MPI; install Open MPI and reconfigure", what)

bool mpi_session::available() { return false; }
mpi_session::mpi_session() { TROUPE_NO_MPI("mpi_session"); }
mpi_session::~mpi_session() = default;
const char* mpi_session::thread_level() const { return "none"; }
std::unique_ptr<bootstrap> make_mpi_bootstrap(int) { TROUPE_NO_MPI("make_mpi_bootstrap"); }
std::unique_ptr<communicator> make_mpi_communicator(const communicator_options&) {
  TROUPE_NO_MPI("make_mpi_communicator");
}

std::unique_ptr<communicator> make_mpi_communicator_split(int, const communicator_options&) {
  TROUPE_NO_MPI("make_mpi_communicator_split");
}

#else

namespace {

std::string mpi_error_string(int rc) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, buf, &len) != MPI_SUCCESS) return fmt::format("MPI error {}", rc);
  return std::string(buf, static_cast<size_t>(len));
}

#define TROUPE_MPI_CHECK(call)                                                                         \
  do {                                                                                                 \
    const int troupe_mpi_rc_ = (call);                                                                 \
    TROUPE_CHECK(troupe_mpi_rc_ == MPI_SUCCESS, errc::io, "{} failed: {}", #call,                      \
                 mpi_error_string(troupe_mpi_rc_));                                                    \
  } while (0)

void require_initialized(const char* what) {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  TROUPE_CHECK(init && !fin, errc::invalid_argument,
               "{}: MPI is not initialized{}; create a runtime::mpi_session first (and keep it alive)", what,
               fin ? " (already finalized)" : "");
}

using clk = std::chrono::steady_clock;

// Polite polling: yield the core (ranks are often oversubscribed), and after a long
// quiet spell sleep a little so an idle rank does not burn a core.
void idle(clk::time_point since) {
  if (clk::now() - since < std::chrono::milliseconds(100)) std::this_thread::yield();
  else std::this_thread::sleep_for(std::chrono::microseconds(100));
}

std::string rank_list(const std::vector<int>& ranks) {
  std::string s;
  for (int r : ranks) s += (s.empty() ? "" : ", ") + std::to_string(r);
  return s;
}

// ---- bootstrap ----------------------------------------------------------------------

class mpi_bootstrap final : public bootstrap {
 public:
  explicit mpi_bootstrap(int timeout_ms) : timeout_ms_(timeout_ms) {
    TROUPE_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &comm_));
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~mpi_bootstrap() override {
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  std::vector<std::string> all_gather(const std::string& mine) override {
    TROUPE_CHECK(mine.size() <= INT_MAX, errc::unsupported, "mpi bootstrap: blob of {} bytes exceeds 2 GiB",
                 mine.size());
    const size_t P = static_cast<size_t>(size_);
    std::vector<int> sizes(P), displs(P);
    int my_size = static_cast<int>(mine.size());
    MPI_Request req;
    TROUPE_MPI_CHECK(MPI_Iallgather(&my_size, 1, MPI_INT, sizes.data(), 1, MPI_INT, comm_, &req));
    wait(req, "sizes");
    int64_t total = 0;
    for (size_t r = 0; r < P; ++r) {
      TROUPE_CHECK(total + sizes[r] <= INT_MAX, errc::unsupported, "mpi bootstrap: blobs exceed 2 GiB in all");
      displs[r] = static_cast<int>(total);
      total += sizes[r];
    }
    std::vector<char> all(static_cast<size_t>(std::max<int64_t>(total, 1)));
    TROUPE_MPI_CHECK(MPI_Iallgatherv(mine.data(), my_size, MPI_BYTE, all.data(), sizes.data(), displs.data(),
                                     MPI_BYTE, comm_, &req));
    wait(req, "blobs");
    std::vector<std::string> out(P);
    for (size_t r = 0; r < P; ++r) out[r].assign(all.data() + displs[r], static_cast<size_t>(sizes[r]));
    return out;
  }

 private:
  // MPI's collectives do not say who is late, so a timeout names the whole group.
  void wait(MPI_Request& req, const char* phase) {
    const auto t0 = clk::now();
    const auto deadline = t0 + std::chrono::milliseconds(timeout_ms_);
    for (;;) {
      int done = 0;
      TROUPE_MPI_CHECK(MPI_Test(&req, &done, MPI_STATUS_IGNORE));
      if (done) return;
      if (clk::now() > deadline) {
        // A collective cannot be cancelled; leave the request to MPI_Finalize.
        MPI_Request_free(&req);
        TROUPE_THROW(errc::io,
                     "mpi bootstrap all_gather ({}): rank {} waited {} ms; one or more of the {} ranks never "
                     "arrived (dead or stuck)",
                     phase, rank_, timeout_ms_, size_);
      }
      idle(t0);
    }
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  int timeout_ms_;
};

// ---- reductions -----------------------------------------------------------------------

// out[i] = reduce over r of blocks[r][i], ranks in order 0..P-1 (fp32 for bf16), so
// acc = ((b0 op b1) op b2) ... exactly as the in-process backend. Tiled so the
// accumulator stays in cache and the inner loops vectorize. `out` may alias a block.
template <typename T, typename Acc, typename Load, typename Store>
void reduce_tiled(void* out, const std::vector<const void*>& blocks, int64_t n, reduce_op op, Load load,
                  Store store) {
  constexpr int64_t tile = 2048;
  Acc acc[tile];
  for (int64_t at = 0; at < n; at += tile) {
    const int64_t m = std::min(tile, n - at);
    const T* b0 = static_cast<const T*>(blocks[0]) + at;
    for (int64_t i = 0; i < m; ++i) acc[i] = load(b0[i]);
    for (size_t r = 1; r < blocks.size(); ++r) {
      const T* b = static_cast<const T*>(blocks[r]) + at;
      if (op == reduce_op::sum) {
        for (int64_t i = 0; i < m; ++i) acc[i] = acc[i] + load(b[i]);
      } else {
        for (int64_t i = 0; i < m; ++i) acc[i] = std::max(acc[i], load(b[i]));
      }
    }
    T* o = static_cast<T*>(out) + at;
    for (int64_t i = 0; i < m; ++i) o[i] = store(acc[i]);
  }
}

template <typename T>
void reduce_typed(void* out, const std::vector<const void*>& blocks, int64_t n, reduce_op op) {
  auto same = [](T x) { return x; };
  reduce_tiled<T, T>(out, blocks, n, op, same, same);
}

void reduce_blocks(void* out, dtype dt, const std::vector<const void*>& blocks, int64_t n, reduce_op op) {
  switch (dt) {
    case dtype::f32: return reduce_typed<float>(out, blocks, n, op);
    case dtype::i32: return reduce_typed<int32_t>(out, blocks, n, op);
    case dtype::i64: return reduce_typed<int64_t>(out, blocks, n, op);
    case dtype::bf16:
      return reduce_tiled<uint16_t, float>(out, blocks, n, op, [](uint16_t x) { return bf16_to_f32(x); },
                                           [](float x) { return f32_to_bf16(x); });
    default:
      TROUPE_THROW(errc::unsupported, "mpi reduction of {} is not supported (f32, bf16, i32, i64)", dtype_name(dt));
  }
}

void check_buffer(const char* op, const char* name, const tensor& t) {
  TROUPE_CHECK(t.defined() && t.device().is_cpu() && t.is_contiguous(), errc::invalid_argument,
               "{}: '{}' must be a contiguous cpu tensor, got {}", op, name, t.defined() ? t.describe() : "undefined");
}

// ---- communicator -------------------------------------------------------------------

// One outstanding request of an operation, with the peer it waits on.
struct mpi_req {
  MPI_Request req = MPI_REQUEST_NULL;
  int peer = -1;
  bool is_recv = false;
  size_t expect = 0;  // bytes a receive must get
  bool done = false;
};

// Collective op codes inside the tag (tag = seq * 16 + code).
enum coll_code : int {
  c_all_reduce_scatter = 1,
  c_all_reduce_gather,
  c_reduce_scatter,
  c_all_gather,
  c_all_to_all_v,
  c_broadcast,
  c_barrier,
  c_all_reduce_direct,
};

// all_reduce sends whole tensors in one round up to this size.
constexpr size_t direct_all_reduce_bytes = 32 << 10;

class mpi_communicator final : public communicator {
 public:
  // color < 0: all of MPI_COMM_WORLD; else the ranks that passed the same color (MPI_Comm_split).
  mpi_communicator(const communicator_options& o, int color) : timeout_ms_(o.timeout_ms) {
    MPI_Comm base = MPI_COMM_WORLD;
    MPI_Comm split = MPI_COMM_NULL;
    if (color >= 0) {
      int world_rank = 0;
      MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
      TROUPE_MPI_CHECK(MPI_Comm_split(MPI_COMM_WORLD, color, world_rank, &split));
      base = split;
    }
    TROUPE_MPI_CHECK(MPI_Comm_dup(base, &coll_));
    TROUPE_MPI_CHECK(MPI_Comm_dup(base, &p2p_));
    if (split != MPI_COMM_NULL) MPI_Comm_free(&split);
    MPI_Comm_set_errhandler(coll_, MPI_ERRORS_RETURN);
    MPI_Comm_set_errhandler(p2p_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(coll_, &rank_);
    MPI_Comm_size(coll_, &size_);
    void* ub = nullptr;
    int flag = 0;
    MPI_Comm_get_attr(coll_, MPI_TAG_UB, &ub, &flag);
    tag_ub_ = flag ? *static_cast<int*>(ub) : 32767;
  }

  ~mpi_communicator() override {
    int fin = 0;
    MPI_Finalized(&fin);
    if (fin) return;
    // Requests left by a failed op: let MPI forget them. Their buffers are leaked on
    // purpose — MPI may still write into them after we are gone.
    for (auto& r : stranded_)
      if (r.req != MPI_REQUEST_NULL) MPI_Request_free(&r.req);
    if (!stranded_keep_.empty()) (void)new std::vector<std::shared_ptr<void>>(std::move(stranded_keep_));
    // After a failed collective, messages of it may still be in flight. Freeing the
    // communicators would let MPI hand their context id to the next group, where those
    // stale messages would match (or, in ob1, block by sequence number) its messages.
    // Keep them allocated: a few bytes per failure.
    if (!broken_.empty() || !stranded_.empty()) return;
    MPI_Comm_free(&coll_);
    MPI_Comm_free(&p2p_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }

  void abort(const std::string& reason) override {
    std::lock_guard<std::mutex> g(abort_mu_);
    if (!aborted_.load()) {
      abort_reason_ = reason.empty() ? "aborted" : reason;
      aborted_.store(true);
    }
  }

  void barrier() override {
    const char* op = "barrier";
    begin(op);
    const int tag = next_tag(c_barrier);
    std::vector<mpi_req> reqs;
    std::vector<char> sink(static_cast<size_t>(size_));
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      post_recv(reqs, sink.data() + r, 0, r, tag);
      post_send(reqs, sink.data() + r, 0, r, tag);
    }
    wait_all(op, reqs, {});
  }

  void all_reduce(tensor& t, reduce_op op_) override {
    const char* op = "all_reduce";
    check_buffer(op, "t", t);
    begin(op);
    const size_t es = dtype_size(t.dtype());
    const int64_t n = t.numel();
    char* base = static_cast<char*>(t.data_ptr());
    if (t.nbytes() <= direct_all_reduce_bytes) return all_reduce_direct(t, op_);
    // Phase 1: chunk r of every rank's t goes to rank r, which reduces it in rank order.
    const int64_t my_n = chunk_size(n, rank_), my_off = chunk_offset(n, rank_);
    auto blocks = scratch(static_cast<size_t>(my_n * size_) * es);
    const int tag1 = next_tag(c_all_reduce_scatter);
    std::vector<mpi_req> reqs;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;  // reduced in place from t
      char* slot = blocks->data() + static_cast<size_t>(my_n * r) * es;
      post_recv(reqs, slot, static_cast<size_t>(my_n) * es, r, tag1);
      post_send(reqs, base + static_cast<size_t>(chunk_offset(n, r)) * es, static_cast<size_t>(chunk_size(n, r)) * es,
                r, tag1);
    }
    wait_all(op, reqs, {blocks, t.storage_handle()});
    std::vector<const void*> ptrs;
    char* mine = base + static_cast<size_t>(my_off) * es;
    for (int r = 0; r < size_; ++r)
      ptrs.push_back(r == rank_ ? mine : blocks->data() + static_cast<size_t>(my_n * r) * es);
    reduce_blocks(mine, t.dtype(), ptrs, my_n, op_);
    // Phase 2: every rank's reduced chunk to everyone.
    const int tag2 = next_tag(c_all_reduce_gather);
    reqs.clear();
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      post_recv(reqs, base + static_cast<size_t>(chunk_offset(n, r)) * es, static_cast<size_t>(chunk_size(n, r)) * es,
                r, tag2);
      post_send(reqs, base + static_cast<size_t>(my_off) * es, static_cast<size_t>(my_n) * es, r, tag2);
    }
    wait_all(op, reqs, {t.storage_handle()});
  }

  // One round: every rank sends all of t to every rank and reduces the P copies in rank
  // order itself. Same order, same inputs, so the same bits as the two-phase path. Sends
  // (P-1)n instead of 2(P-1)n/P elements and reduces P times the work, so only for small
  // tensors, where the saved round matters more. (For P = 2 and 1-16 MiB it measured
  // 0.8x of the two-phase path, so it is not used there.)
  void all_reduce_direct(tensor& t, reduce_op op_) {
    const char* op = "all_reduce";
    const size_t bytes = t.nbytes();
    char* base = static_cast<char*>(t.data_ptr());
    auto blocks = scratch(bytes * static_cast<size_t>(size_));
    const int tag = next_tag(c_all_reduce_direct);
    std::vector<mpi_req> reqs;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      post_recv(reqs, blocks->data() + bytes * static_cast<size_t>(r), bytes, r, tag);
      post_send(reqs, base, bytes, r, tag);
    }
    wait_all(op, reqs, {blocks, t.storage_handle()}, dtype_size(t.dtype()));
    std::vector<const void*> ptrs;
    for (int r = 0; r < size_; ++r)
      ptrs.push_back(r == rank_ ? base : blocks->data() + bytes * static_cast<size_t>(r));
    reduce_blocks(base, t.dtype(), ptrs, t.numel(), op_);
  }

  void reduce_scatter(tensor& out, const tensor& in, reduce_op op_) override {
    const char* op = "reduce_scatter";
    check_buffer(op, "in", in);
    check_buffer(op, "out", out);
    const int64_t n = out.numel();
    TROUPE_CHECK(in.numel() == n * size_ && in.dtype() == out.dtype(), errc::invalid_argument,
                 "reduce_scatter: in {} must hold {} x out {}", in.describe(), size_, out.describe());
    begin(op);
    const size_t es = dtype_size(in.dtype());
    const size_t block = static_cast<size_t>(n) * es;
    const char* src = static_cast<const char*>(in.data_ptr());
    auto blocks = scratch(block * static_cast<size_t>(size_));
    const int tag = next_tag(c_reduce_scatter);
    std::vector<mpi_req> reqs;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;  // read in place from `in`
      post_recv(reqs, blocks->data() + block * static_cast<size_t>(r), block, r, tag);
      post_send(reqs, src + block * static_cast<size_t>(r), block, r, tag);
    }
    wait_all(op, reqs, {blocks, in.storage_handle()});
    std::vector<const void*> ptrs;
    for (int r = 0; r < size_; ++r)
      ptrs.push_back(r == rank_ ? src + block * static_cast<size_t>(rank_) : blocks->data() + block * static_cast<size_t>(r));
    reduce_blocks(out.data_ptr(), out.dtype(), ptrs, n, op_);
  }

  void all_gather(tensor& out, const tensor& in) override {
    const char* op = "all_gather";
    check_buffer(op, "in", in);
    check_buffer(op, "out", out);
    TROUPE_CHECK(out.numel() == in.numel() * size_ && in.dtype() == out.dtype(), errc::invalid_argument,
                 "all_gather: out {} must hold {} x in {}", out.describe(), size_, in.describe());
    begin(op);
    const size_t block = in.nbytes();
    char* dst = static_cast<char*>(out.data_ptr());
    const int tag = next_tag(c_all_gather);
    std::vector<mpi_req> reqs;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      post_recv(reqs, dst + block * static_cast<size_t>(r), block, r, tag);
      post_send(reqs, in.data_ptr(), block, r, tag);
    }
    std::memmove(dst + block * static_cast<size_t>(rank_), in.data_ptr(), block);
    wait_all(op, reqs, {out.storage_handle(), in.storage_handle()});
  }

  void all_to_all_v(tensor& recv, const std::vector<int64_t>& recv_counts, const tensor& send,
                    const std::vector<int64_t>& send_counts) override {
    const char* op = "all_to_all_v";
    check_buffer(op, "send", send);
    check_buffer(op, "recv", recv);
    const size_t P = static_cast<size_t>(size_);
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
    begin(op);
    const size_t es = dtype_size(send.dtype());
    const char* src = static_cast<const char*>(send.data_ptr());
    char* dst = static_cast<char*>(recv.data_ptr());
    const int tag = next_tag(c_all_to_all_v);
    std::vector<mpi_req> reqs;
    int64_t soff = 0, roff = 0;
    for (size_t r = 0; r < P; ++r) {
      const int peer = static_cast<int>(r);
      if (peer == rank_) {
        TROUPE_CHECK(send_counts[r] == recv_counts[r], errc::invalid_argument,
                     "{}: rank {} sends {} elements to itself but expects recv_counts[{}] = {}", op, rank_,
                     send_counts[r], r, recv_counts[r]);
        std::memmove(dst + static_cast<size_t>(roff) * es, src + static_cast<size_t>(soff) * es,
                     static_cast<size_t>(send_counts[r]) * es);
      } else {
        post_recv(reqs, dst + static_cast<size_t>(roff) * es, static_cast<size_t>(recv_counts[r]) * es, peer, tag);
        post_send(reqs, src + static_cast<size_t>(soff) * es, static_cast<size_t>(send_counts[r]) * es, peer, tag);
      }
      soff += send_counts[r];
      roff += recv_counts[r];
    }
    wait_all(op, reqs, {recv.storage_handle(), send.storage_handle()}, es);
  }

  void broadcast(tensor& t, int root) override {
    const char* op = "broadcast";
    check_buffer(op, "t", t);
    TROUPE_CHECK(root >= 0 && root < size_, errc::invalid_argument, "broadcast: root {} not in [0, {})", root, size_);
    begin(op);
    const int tag = next_tag(c_broadcast);
    std::vector<mpi_req> reqs;
    if (rank_ == root) {
      for (int r = 0; r < size_; ++r)
        if (r != rank_) post_send(reqs, t.data_ptr(), t.nbytes(), r, tag);
    } else {
      post_recv(reqs, t.data_ptr(), t.nbytes(), root, tag);
    }
    wait_all(op, reqs, {t.storage_handle()});
  }

  void send(const tensor& t, int peer, int tag) override {
    const char* op = "send";
    check_buffer(op, "t", t);
    check_p2p(op, peer, tag);
    begin(op);
    std::vector<mpi_req> reqs;
    post(reqs, const_cast<void*>(t.data_ptr()), t.nbytes(), peer, tag, p2p_, false);
    wait_all(op, reqs, {t.storage_handle()}, 1, tag);
  }

  void recv(tensor& t, int peer, int tag) override {
    const char* op = "recv";
    check_buffer(op, "t", t);
    check_p2p(op, peer, tag);
    begin(op);
    // Probe first: a message of the wrong size is consumed and reported, never truncated.
    MPI_Message msg = MPI_MESSAGE_NULL;
    MPI_Status st;
    const auto t0 = clk::now();
    for (;;) {
      int found = 0;
      TROUPE_MPI_CHECK(MPI_Improbe(peer, tag, p2p_, &found, &msg, &st));
      if (found) break;
      throw_if_aborted(op);
      TROUPE_CHECK(clk::now() - t0 < std::chrono::milliseconds(timeout_ms_), errc::io,
                   "recv: rank {} waited {} ms for a message from rank {} (tag {}); is rank {} alive?", rank_,
                   timeout_ms_, peer, tag, peer);
      idle(t0);
    }
    int count = 0;
    MPI_Get_count(&st, MPI_BYTE, &count);
    const bool size_ok = static_cast<size_t>(count) == t.nbytes();
    std::shared_ptr<std::vector<char>> scratch;
    void* into = t.data_ptr();
    if (!size_ok) {
      scratch = std::make_shared<std::vector<char>>(static_cast<size_t>(count) + 1);
      into = scratch->data();
    }
    std::vector<mpi_req> reqs(1);
    reqs[0].peer = peer;
    reqs[0].is_recv = true;
    reqs[0].expect = static_cast<size_t>(count);
    TROUPE_MPI_CHECK(MPI_Imrecv(into, count, MPI_BYTE, &msg, &reqs[0].req));
    wait_all(op, reqs, {t.storage_handle(), scratch}, 1, tag);
    TROUPE_CHECK(size_ok, errc::invalid_argument, "recv: rank {} sent {} bytes (tag {}) but rank {} expects {} ({})",
                 peer, count, tag, rank_, t.nbytes(), t.describe());
  }

 private:
  static int64_t chunk_size(int64_t n, int64_t P, int r) { return n / P + (r < n % P ? 1 : 0); }
  int64_t chunk_size(int64_t n, int r) const { return chunk_size(n, size_, r); }
  int64_t chunk_offset(int64_t n, int r) const {
    const int64_t P = size_;
    return r * (n / P) + std::min<int64_t>(r, n % P);
  }

  // The receive buffer of the reductions, reused across calls (no allocation, warm
  // pages). A copy still held by stranded requests is left to them.
  std::shared_ptr<std::vector<char>> scratch(size_t bytes) {
    if (!scratch_ || scratch_.use_count() > 1) scratch_ = std::make_shared<std::vector<char>>();
    if (scratch_->size() < bytes + 1) scratch_->resize(bytes + 1);
    return scratch_;
  }

  int next_tag(int code) {
    const int64_t slots = std::max<int64_t>(tag_ub_ / 16, 1);
    return static_cast<int>((seq_++ % slots) * 16 + code);
  }

  void check_p2p(const char* op, int peer, int tag) const {
    TROUPE_CHECK(peer >= 0 && peer < size_ && peer != rank_, errc::invalid_argument,
                 "{}: bad peer {} (rank {} of {})", op, peer, rank_, size_);
    TROUPE_CHECK(tag >= 0 && tag <= tag_ub_, errc::invalid_argument, "{}: tag {} outside [0, {}] (MPI_TAG_UB)", op,
                 tag, tag_ub_);
  }

  void begin(const char* op) {
    throw_if_aborted(op);
    TROUPE_CHECK(broken_.empty(), errc::io,
                 "{}: rank {}: this MPI communicator is out of step after an earlier failure ({}); rebuild the group",
                 op, rank_, broken_);
  }

  void throw_if_aborted(const char* op) {
    if (!aborted_.load(std::memory_order_acquire)) return;
    std::string reason;
    {
      std::lock_guard<std::mutex> g(abort_mu_);
      reason = abort_reason_;
    }
    TROUPE_THROW(errc::aborted, "{}: rank {}: group aborted: {}", op, rank_, reason);
  }

  void post(std::vector<mpi_req>& reqs, void* buf, size_t bytes, int peer, int tag, MPI_Comm comm, bool is_recv) {
    TROUPE_CHECK(bytes <= static_cast<size_t>(INT_MAX), errc::unsupported,
                 "mpi: one message of {} bytes to/from rank {} exceeds 2 GiB; split the tensor", bytes, peer);
    mpi_req r;
    r.peer = peer;
    r.is_recv = is_recv;
    r.expect = bytes;
    const int count = static_cast<int>(bytes);
    const int rc = is_recv ? MPI_Irecv(buf, count, MPI_BYTE, peer, tag, comm, &r.req)
                           : MPI_Isend(buf, count, MPI_BYTE, peer, tag, comm, &r.req);
    if (rc != MPI_SUCCESS) {
      // Leave the already-posted requests in a defined state before reporting.
      fail_pending(reqs, {});
      TROUPE_THROW(errc::io, "mpi: posting {} of {} bytes {} rank {} failed: {}", is_recv ? "a receive" : "a send",
                   bytes, is_recv ? "from" : "to", peer, mpi_error_string(rc));
    }
    reqs.push_back(r);
  }
  void post_recv(std::vector<mpi_req>& reqs, void* buf, size_t bytes, int peer, int tag) {
    post(reqs, buf, bytes, peer, tag, coll_, true);
  }
  void post_send(std::vector<mpi_req>& reqs, const void* buf, size_t bytes, int peer, int tag) {
    post(reqs, const_cast<void*>(buf), bytes, peer, tag, coll_, false);
  }

  // After a timeout or abort: cancel what can be cancelled; what is still pending is
  // kept (with its buffers) until the communicator dies, and the group is out of step.
  void fail_pending(std::vector<mpi_req>& reqs, std::vector<std::shared_ptr<void>> keep) {
    bool stranded = false;
    for (auto& r : reqs) {
      if (r.done || r.req == MPI_REQUEST_NULL) continue;
      MPI_Cancel(&r.req);
      int flag = 0;
      MPI_Test(&r.req, &flag, MPI_STATUS_IGNORE);
      if (!flag) {
        stranded_.push_back(r);
        stranded = true;
      }
      r.done = true;
    }
    if (stranded)
      for (auto& k : keep)
        if (k) stranded_keep_.push_back(std::move(k));
  }

  // Waits for every request. es: element size, for messages in elements; user_tag >= 0
  // for point-to-point (messages name the tag).
  void wait_all(const char* op, std::vector<mpi_req>& reqs, std::vector<std::shared_ptr<void>> keep, size_t es = 1,
                int user_tag = -1) {
    const auto t0 = clk::now();
    auto last_progress = t0;
    size_t left = reqs.size();
    std::string size_error;  // the first size mismatch; reported once every request is done
    while (left > 0) {
      bool progressed = false;
      for (auto& r : reqs) {
        if (r.done) continue;
        int flag = 0;
        MPI_Status st;
        const int rc = MPI_Test(&r.req, &flag, &st);
        if (rc != MPI_SUCCESS) {
          int cls = 0;
          MPI_Error_class(rc, &cls);
          if (cls == MPI_ERR_TRUNCATE) {
            // The request is complete (truncated); report it as a size mismatch.
            r.done = true;
            --left;
            progressed = true;
            if (size_error.empty())
              size_error = fmt::format("{}: rank {} sent more than the {} elements rank {} expects", op, r.peer,
                                       r.expect / es, rank_);
            continue;
          }
          r.done = true;
          --left;
          fail_pending(reqs, keep);
          broken_ = fmt::format("{} failed", op);
          TROUPE_THROW(errc::io, "{}: rank {}: MPI reports a failure on the request {} rank {}: {}", op, rank_,
                       r.is_recv ? "from" : "to", r.peer, mpi_error_string(rc));
        }
        if (!flag) continue;
        r.done = true;
        --left;
        progressed = true;
        if (r.is_recv) {
          int count = 0;
          MPI_Get_count(&st, MPI_BYTE, &count);
          if (static_cast<size_t>(count) != r.expect && size_error.empty())
            size_error = fmt::format("{}: rank {} sent {} elements but rank {} expects {}", op, r.peer,
                                     static_cast<size_t>(count) / es, rank_, r.expect / es);
        }
      }
      if (left == 0) break;
      const auto now = clk::now();
      if (progressed) last_progress = now;
      if (aborted_.load(std::memory_order_acquire)) {
        fail_pending(reqs, keep);
        if (user_tag < 0) broken_ = "aborted";
        throw_if_aborted(op);
      }
      if (now - last_progress > std::chrono::milliseconds(timeout_ms_)) {
        std::vector<int> no_data, not_taken;
        for (const auto& r : reqs)
          if (!r.done) (r.is_recv ? no_data : not_taken).push_back(r.peer);
        fail_pending(reqs, keep);
        if (user_tag >= 0)  // a send to a receiver that never posted it
          TROUPE_THROW(errc::io, "{}: rank {} waited {} ms; rank {} never received the message (tag {}); is it alive?",
                       op, rank_, timeout_ms_, rank_list(not_taken), user_tag);
        broken_ = fmt::format("{} timed out", op);
        if (!no_data.empty())
          TROUPE_THROW(errc::io,
                       "{}: rank {} waited {} ms; no data from rank(s) {} (dead, stuck, or in a different collective)",
                       op, rank_, timeout_ms_, rank_list(no_data));
        TROUPE_THROW(errc::io, "{}: rank {} waited {} ms; rank(s) {} never took this rank's data (dead or stuck)", op,
                     rank_, timeout_ms_, rank_list(not_taken));
      }
      idle(last_progress);
    }
    TROUPE_CHECK(size_error.empty(), errc::invalid_argument, "{} (shapes or counts differ between ranks)", size_error);
  }

  MPI_Comm coll_ = MPI_COMM_NULL;
  MPI_Comm p2p_ = MPI_COMM_NULL;
  int rank_ = 0, size_ = 1;
  int tag_ub_ = 32767;
  int timeout_ms_;
  int64_t seq_ = 0;
  std::string broken_;  // non-empty: out of step after a failed collective
  std::atomic<bool> aborted_{false};
  std::mutex abort_mu_;
  std::string abort_reason_;
  std::vector<mpi_req> stranded_;
  std::vector<std::shared_ptr<void>> stranded_keep_;
  std::shared_ptr<std::vector<char>> scratch_;
};

}  // namespace

bool mpi_session::available() { return true; }

mpi_session::mpi_session() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  TROUPE_CHECK(!fin, errc::invalid_argument,
               "mpi_session: MPI was already finalized in this process and cannot be started again; keep one "
               "mpi_session for the life of the process");
  if (!init) {
    TROUPE_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided_) == MPI_SUCCESS, errc::io,
                 "mpi_session: MPI_Init_thread failed (started by mpirun? {})", launched_by_mpirun());
    owns_ = true;
  } else {
    MPI_Query_thread(&provided_);
  }
  if (provided_ < MPI_THREAD_SERIALIZED) {
    if (owns_) MPI_Finalize();
    owns_ = false;
    TROUPE_THROW(errc::unsupported,
                 "mpi_session: this MPI provides thread level {} but troupe needs MPI_THREAD_SERIALIZED or better; use "
                 "an MPI built with thread support",
                 provided_);
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &size_);
}

mpi_session::~mpi_session() {
  if (!owns_) return;
  int fin = 0;
  MPI_Finalized(&fin);
  if (!fin) MPI_Finalize();
}

const char* mpi_session::thread_level() const {
  return provided_ >= MPI_THREAD_MULTIPLE ? "MPI_THREAD_MULTIPLE" : "MPI_THREAD_SERIALIZED";
}

std::unique_ptr<bootstrap> make_mpi_bootstrap(int timeout_ms) {
  require_initialized("make_mpi_bootstrap");
  return std::make_unique<mpi_bootstrap>(timeout_ms);
}

std::unique_ptr<communicator> make_mpi_communicator(const communicator_options& options) {
  require_initialized("make_mpi_communicator");
  TROUPE_CHECK(options.timeout_ms > 0, errc::invalid_argument, "make_mpi_communicator: timeout_ms {} must be > 0",
               options.timeout_ms);
  return std::make_unique<mpi_communicator>(options, -1);
}

std::unique_ptr<communicator> make_mpi_communicator_split(int color, const communicator_options& options) {
  require_initialized("make_mpi_communicator_split");
  TROUPE_CHECK(color >= 0, errc::invalid_argument, "make_mpi_communicator_split: color {} must be >= 0", color);
  TROUPE_CHECK(options.timeout_ms > 0, errc::invalid_argument,
               "make_mpi_communicator_split: timeout_ms {} must be > 0", options.timeout_ms);
  return std::make_unique<mpi_communicator>(options, color);
}

#endif  // TROUPE_HAVE_MPI

}  // namespace troupe::runtime
