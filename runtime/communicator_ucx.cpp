// runtime/communicator_ucx.cpp — see communicator_ucx.h. Every collective is one or two
// "exchanges": post every receive, post every send, progress the worker until all
// complete (or the deadline, an abort or a failed peer), then check the sizes.
#include "runtime/communicator_ucx.h"

#include "runtime/error.h"

#ifndef TROUPE_HAVE_UCX

namespace troupe::runtime {

std::unique_ptr<ucx_communicator> make_ucx_communicator(bootstrap&, const ucx_options&) {
  TROUPE_THROW(errc::unsupported,
               "make_ucx_communicator: troupe was built without UCX; install libucx-dev (pkg-config ucx) and "
               "reconfigure, or use another communicator backend");
}

std::unique_ptr<ucx_communicator> make_ucx_joining_communicator(int, const ucx_options&) {
  TROUPE_THROW(errc::unsupported, "make_ucx_joining_communicator: troupe was built without UCX");
}

}  // namespace troupe::runtime

#else

#include <ucp/api/ucp.h>

#include <poll.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "runtime/log.h"

namespace troupe::runtime {

namespace {

using steady = std::chrono::steady_clock;

// UCX statuses that mean "these transports cannot do this here", not "it broke".
errc ucx_errc(ucs_status_t s) {
  switch (s) {
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_NO_DEVICE:
    case UCS_ERR_UNSUPPORTED:
    case UCS_ERR_NO_ELEM: return errc::unsupported;
    case UCS_ERR_INVALID_PARAM: return errc::invalid_argument;
    default: return errc::io;
  }
}

#define TROUPE_UCX_CHECK(call, ...)                                                                      \
  do {                                                                                                   \
    const ucs_status_t st_ = (call);                                                                     \
    if (st_ != UCS_OK)                                                                                   \
      TROUPE_THROW(ucx_errc(st_), "{}: {} failed: {}", ::fmt::format(__VA_ARGS__), #call, ucs_status_string(st_)); \
  } while (0)

// --- tags ---------------------------------------------------------------------------
// [63:62] kind  [61:48] sender rank  then
//   p2p:        [47:24] user tag   [23:0] per (peer, tag) sequence
//   collective: [47:12] sequence   [11:8] op   [7:0] step
constexpr uint64_t kind_p2p = 1, kind_coll = 2;
constexpr int max_ranks = 1 << 14;
constexpr int max_user_tag = 1 << 24;
constexpr ucp_tag_t full_mask = ~ucp_tag_t{0};

uint64_t p2p_tag(int src, int user_tag, uint32_t seq) {
  return kind_p2p << 62 | static_cast<uint64_t>(src) << 48 | static_cast<uint64_t>(user_tag) << 24 | (seq & 0xFFFFFFu);
}

enum class coll : uint8_t { barrier = 1, all_reduce, reduce_scatter, all_gather, all_to_all_v, broadcast, regions };

uint64_t coll_tag(int src, uint64_t seq, coll op, int step) {
  return kind_coll << 62 | static_cast<uint64_t>(src) << 48 | (seq & ((uint64_t{1} << 36) - 1)) << 12 |
         static_cast<uint64_t>(op) << 8 | static_cast<uint64_t>(step & 0xFF);
}

// --- reductions (rank order, fp32 accumulation for bf16) ------------------------------
template <typename T>
T combine(T a, T b, reduce_op op) {
  return op == reduce_op::sum ? a + b : std::max(a, b);
}

// out[i] = src[0][i] (+) src[1][i] (+) ... ; out may be one of the sources.
template <typename T>
void reduce_typed(void* out, const std::vector<const void*>& src, int64_t n, reduce_op op) {
  T* o = static_cast<T*>(out);
  for (int64_t i = 0; i < n; ++i) {
    T acc = static_cast<const T*>(src[0])[i];
    for (size_t r = 1; r < src.size(); ++r) acc = combine(acc, static_cast<const T*>(src[r])[i], op);
    o[i] = acc;
  }
}

void reduce_into(void* out, dtype dt, const std::vector<const void*>& src, int64_t n, reduce_op op) {
  switch (dt) {
    case dtype::f32: return reduce_typed<float>(out, src, n, op);
    case dtype::i32: return reduce_typed<int32_t>(out, src, n, op);
    case dtype::i64: return reduce_typed<int64_t>(out, src, n, op);
    case dtype::bf16: {
      auto* o = static_cast<uint16_t*>(out);
      for (int64_t i = 0; i < n; ++i) {
        float acc = bf16_to_f32(static_cast<const uint16_t*>(src[0])[i]);
        for (size_t r = 1; r < src.size(); ++r) acc = combine(acc, bf16_to_f32(static_cast<const uint16_t*>(src[r])[i]), op);
        o[i] = f32_to_bf16(acc);
      }
      return;
    }
    default: TROUPE_THROW(errc::internal, "ucx reduction of {}", dtype_name(dt));
  }
}

void check_reducible(const char* op, dtype dt) {
  TROUPE_CHECK(dt == dtype::f32 || dt == dtype::bf16 || dt == dtype::i32 || dt == dtype::i64, errc::unsupported,
               "{}: ucx reduction of {} is not supported (f32, bf16, i32, i64)", op, dtype_name(dt));
}

void check_buffer(const char* op, const char* name, const tensor& t) {
  TROUPE_CHECK(t.defined() && t.device().is_cpu() && t.is_contiguous(), errc::invalid_argument,
               "{}: '{}' must be a contiguous cpu tensor, got {}", op, name, t.defined() ? t.describe() : "undefined");
}

char* bytes(const tensor& t) { return static_cast<char*>(t.data_ptr()); }

// --- UCP objects with owners -----------------------------------------------------------
struct ucx_context {
  ucp_context_h h = nullptr;
  ~ucx_context() {
    if (h) ucp_cleanup(h);
  }
};

struct region_mapping {
  std::shared_ptr<ucx_context> ctx;  // outlives the mapping
  ucp_mem_h mem = nullptr;
  tensor keep;  // the registered storage stays alive while mapped
  ~region_mapping() {
    if (mem) ucp_mem_unmap(ctx->h, mem);
  }
};

// One UCP operation in flight. The completion callbacks write here (from inside
// ucp_worker_progress, on the owning thread).
struct xfer {
  ucs_status_t status = UCS_INPROGRESS;
  size_t length = 0;  // bytes received
  size_t expect = 0;  // bytes a receive expects
  void* req = nullptr;
  int peer = -1;
  bool is_recv = false;  // a tag receive (cancellable); anything else needs its endpoint closed
};

void on_send(void*, ucs_status_t st, void* user) { static_cast<xfer*>(user)->status = st; }
void on_recv(void*, ucs_status_t st, const ucp_tag_recv_info_t* info, void* user) {
  auto* x = static_cast<xfer*>(user);
  x->length = info ? info->length : 0;
  x->status = st;
}

// Takes a ucs_status_ptr_t from an *_nbx call into x.
void track(xfer& x, ucs_status_ptr_t r) {
  if (r == nullptr) {
    x.status = UCS_OK;  // sends only: receives always complete through on_recv
  } else if (UCS_PTR_IS_ERR(r)) {
    x.status = UCS_PTR_STATUS(r);
  } else {
    x.req = r;
  }
}

struct span_out {
  int peer;
  const void* data;
  size_t n;
};
struct span_in {
  int peer;
  void* data;
  size_t n;
};

// UCX 1.13's shared-memory transports (posix, sysv) report a failed peer only with
// UCX_MM_ERROR_HANDLING=y (default n); without it UCP refuses them for endpoints in
// peer error mode. ucp_config_modify does not reach that transport setting, so it is
// set once as a process default, before the first worker reads it; a value already in
// the environment wins.
void enable_shm_peer_errors() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (!std::getenv("UCX_MM_ERROR_HANDLING") && !std::getenv("UCX_POSIX_ERROR_HANDLING") &&
        !std::getenv("UCX_SYSV_ERROR_HANDLING"))
      ::setenv("UCX_MM_ERROR_HANDLING", "y", 0);
  });
}

struct peer_slot {
  int peer = -1;
  ucp_ep_h ep = nullptr;
  ucs_status_t failed = UCS_OK;  // set by the endpoint error handler
  std::string closed;            // why this side closed the endpoint, if it did
  bool resolved = true;          // false: a rank that joined later, not met yet (invariant 9)
};

void on_ep_error(void* arg, ucp_ep_h, ucs_status_t status) {
  auto* s = static_cast<peer_slot*>(arg);
  if (s->failed == UCS_OK) s->failed = status;
  // Also how an orderly close of the peer looks; an operation that needed the peer
  // reports it as an error.
  log::debug("ucx: endpoint to rank {} failed: {}", s->peer, ucs_status_string(status));
}

class ucx_comm final : public ucx_communicator {
 public:
  ucx_comm(int rank, int size, const ucx_options& o) : rank_(rank), size_(size), options_(o) {
    TROUPE_CHECK(size_ >= 1 && size_ <= max_ranks && rank_ >= 0 && rank_ < size_, errc::invalid_argument,
                 "ucx communicator: rank {} of {} ranks (1..{})", rank_, size_, max_ranks);
    TROUPE_CHECK(o.timeout_ms > 0, errc::invalid_argument, "ucx communicator: timeout_ms {} must be > 0", o.timeout_ms);
    slots_.resize(static_cast<size_t>(size_));
    for (int r = 0; r < size_; ++r) slots_[static_cast<size_t>(r)].peer = r;
  }

  // Everything that can fail after the object exists, so the destructor cleans up.
  void init(bootstrap& boot) {
    start_worker();
    const std::vector<std::string> addrs = boot.all_gather(address_);
    TROUPE_CHECK(static_cast<int>(addrs.size()) == size_, errc::internal, "{}: bootstrap returned {} addresses",
                 label(), addrs.size());
    for (int r = 0; r < size_; ++r)
      if (r != rank_) connect(slot(r), addrs[static_cast<size_t>(r)]);
    barrier();  // every endpoint carries a message once before anyone relies on it
    log::debug("ucx: rank {} of {} connected (UCX_TLS '{}')", rank_, size_, options_.transports);
  }

  // Invariant 9: a rank joining a group that exists; its peers are met when first used.
  void init_joining() {
    TROUPE_CHECK(options_.resolve_peer != nullptr, errc::invalid_argument,
                 "ucx communicator: rank {} joins a group that exists, so it needs ucx_options::resolve_peer", rank_);
    start_worker();
    grown_ = true;
    for (int r = 0; r < rank_; ++r) slot(r).resolved = false;
    log::debug("ucx: rank {} joined (UCX_TLS '{}')", rank_, options_.transports);
  }

  std::string label() const {
    return fmt::format("ucx communicator rank {} of {} (UCX_TLS '{}')", rank_, size_,
                       options_.transports.empty() ? "default" : options_.transports);
  }

  // The UCP context and worker, and this worker's address.
  void start_worker() {
    const std::string where = label();
    const std::string& tls = options_.transports;
    if (tls.empty() || tls.find("posix") != std::string::npos || tls.find("sysv") != std::string::npos ||
        tls.find("sm") != std::string::npos || tls.find("mm") != std::string::npos || tls.find("all") != std::string::npos)
      enable_shm_peer_errors();
    ucp_config_t* cfg = nullptr;
    TROUPE_UCX_CHECK(ucp_config_read(nullptr, nullptr, &cfg), "{}", where);
    std::shared_ptr<ucp_config_t> cfg_owner(cfg, ucp_config_release);
    if (!options_.transports.empty())
      TROUPE_UCX_CHECK(ucp_config_modify(cfg, "TLS", options_.transports.c_str()), "{}: transports '{}'", where,
                       options_.transports);
    // Keepalive is how a peer process that died without closing its endpoints (shared
    // memory; a host that vanished) is noticed: check well within the timeout.
    if (!std::getenv("UCX_KEEPALIVE_INTERVAL")) {
      const int keepalive_ms = std::clamp(options_.timeout_ms / 3, 200, 20000);
      TROUPE_UCX_CHECK(ucp_config_modify(cfg, "KEEPALIVE_INTERVAL", fmt::format("{}ms", keepalive_ms).c_str()), "{}",
                       where);
    }
    if (!options_.net_devices.empty())
      TROUPE_UCX_CHECK(ucp_config_modify(cfg, "NET_DEVICES", options_.net_devices.c_str()), "{}: net devices '{}'",
                       where, options_.net_devices);
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_ESTIMATED_NUM_EPS;
    // WAKEUP (options_.sleep_when_idle): a long wait sleeps on the worker's event fd instead of spinning.
    params.features = UCP_FEATURE_TAG | UCP_FEATURE_RMA | (options_.sleep_when_idle ? UCP_FEATURE_WAKEUP : 0);
    params.estimated_num_eps = static_cast<size_t>(size_);
    ctx_ = std::make_shared<ucx_context>();
    TROUPE_UCX_CHECK(ucp_init(&params, cfg, &ctx_->h), "{}", where);

    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    TROUPE_UCX_CHECK(ucp_worker_create(ctx_->h, &wp, &worker_), "{}", where);
    if ((params.features & UCP_FEATURE_WAKEUP) == 0 || ucp_worker_get_efd(worker_, &efd_) != UCS_OK) efd_ = -1;

    ucp_address_t* addr = nullptr;
    size_t addr_len = 0;
    TROUPE_UCX_CHECK(ucp_worker_get_address(worker_, &addr, &addr_len), "{}", where);
    address_.assign(reinterpret_cast<const char*>(addr), addr_len);
    ucp_worker_release_address(worker_, addr);
  }

  // The endpoint to s.peer at its worker address.
  void connect(peer_slot& s, const std::string& address) {
    const int r = s.peer;
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.address = reinterpret_cast<const ucp_address_t*>(address.data());
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = on_ep_error;
    ep.err_handler.arg = &s;
    ucs_status_t st = UCS_ERR_UNREACHABLE;
    if (peer_errors_) st = ucp_ep_create(worker_, &ep, &s.ep);
    if (st == UCS_ERR_UNREACHABLE) {
      // These transports cannot report a failed peer (e.g. shared memory with
      // UCX_MM_ERROR_HANDLING=n), so UCP refuses them in peer error mode. Connect
      // without it: a dead peer then surfaces as a timeout, never as a hang.
      if (peer_errors_)
        log::warn("ucx: rank {}: transports '{}' cannot detect a failed peer; a dead peer shows only as a "
                  "{} ms timeout",
                  rank_, options_.transports.empty() ? "default" : options_.transports, options_.timeout_ms);
      peer_errors_ = false;
      ep.field_mask &= ~static_cast<uint64_t>(UCP_EP_PARAM_FIELD_ERR_HANDLER);
      ep.err_mode = UCP_ERR_HANDLING_MODE_NONE;
      st = ucp_ep_create(worker_, &ep, &s.ep);
    }
    if (st != UCS_OK)
      TROUPE_THROW(ucx_errc(st), "{}: ucp_ep_create to rank {} failed: {}", label(), r, ucs_status_string(st));
    s.resolved = true;
  }

  ~ucx_comm() override {
    for (auto& [key, rk] : rkeys_) ucp_rkey_destroy(rk);
    rkeys_.clear();
    const bool force = aborted_.load() || !broken_.empty();
    for (auto& s : slots_)
      if (s.ep) close_ep(s, force || s.failed != UCS_OK ? "" : nullptr);
    const auto deadline = steady::now() + std::chrono::milliseconds(std::min(options_.timeout_ms, 10000));
    while (!closing_.empty() && steady::now() < deadline) {
      ucp_worker_progress(worker_);
      std::erase_if(closing_, [](void* r) {
        if (ucp_request_check_status(r) == UCS_INPROGRESS) return false;
        ucp_request_free(r);
        return true;
      });
      if (!closing_.empty()) std::this_thread::yield();
    }
    if (!closing_.empty()) log::warn("ucx: rank {}: {} endpoint(s) did not close in time", rank_, closing_.size());
    if (worker_) ucp_worker_destroy(worker_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "ucx"; }
  std::string address() const override { return address_; }

  void abort(const std::string& reason) override {
    {
      std::lock_guard<std::mutex> g(abort_mu_);
      if (abort_reason_.empty()) abort_reason_ = reason.empty() ? "aborted" : reason;
    }
    aborted_.store(true, std::memory_order_release);
  }

  // --- point to point ---------------------------------------------------------------
  void send(const tensor& t, int peer, int tag) override {
    enter("send");
    check_buffer("send", "t", t);
    check_p2p("send", peer, tag, true);
    uint32_t& seq = send_seq_[p2p_key(peer, tag)];
    std::vector<xfer> xs(1);
    post_send(xs[0], peer, t.data_ptr(), t.nbytes(), p2p_tag(rank_, tag, seq));
    wait("send", xs, false, fmt::format(" (tag {})", tag));
    ++seq;
  }

  void recv(tensor& t, int peer, int tag) override {
    enter("recv");
    check_buffer("recv", "t", t);
    check_p2p("recv", peer, tag, false);
    uint32_t& seq = recv_seq_[p2p_key(peer, tag)];
    std::vector<xfer> xs(1);
    post_recv(xs[0], peer, t.data_ptr(), t.nbytes(), p2p_tag(peer, tag, seq));
    wait("recv", xs, false, fmt::format(" (tag {})", tag));
    ++seq;  // the message is consumed even when its size is wrong
    const xfer& x = xs[0];
    TROUPE_CHECK(x.status == UCS_OK && x.length == t.nbytes(), errc::invalid_argument,
                 "recv: rank {} sent {} bytes (tag {}) but rank {} expects {} ({})", peer,
                 x.status == UCS_OK ? fmt::format("{}", x.length) : "more than " + std::to_string(t.nbytes()), tag,
                 rank_, t.nbytes(), t.describe());
  }

  // --- collectives ------------------------------------------------------------------
  void barrier() override {
    enter_collective("barrier");
    const uint64_t seq = coll_seq_++;
    // Dissemination: in round k, signal rank + 2^k and hear from rank - 2^k.
    char dummy = 0;
    int step = 0;
    for (int k = 1; k < size_; k *= 2, ++step) {
      const int to = (rank_ + k) % size_, from = (rank_ - k + size_) % size_;
      exchange("barrier", seq, coll::barrier, step, {{from, &dummy, 0}}, {{to, &dummy, 0}}, 1, dtype::u8);
    }
  }

  void all_reduce(tensor& t, reduce_op op) override {
    const char* name = "all_reduce";
    enter_collective(name);
    check_buffer(name, "t", t);
    check_reducible(name, t.dtype());
    const uint64_t seq = coll_seq_++;
    const int64_t n = t.numel();
    const size_t es = dtype_size(t.dtype());
    const int P = size_, me = rank_;
    auto lo = [&](int b) { return n * b / P; };
    const int64_t mine = lo(me + 1) - lo(me);
    // 1. Block r of every rank goes to rank r, which reduces it in rank order.
    std::vector<char> staging(static_cast<size_t>(P * mine) * es);
    std::vector<span_in> in;
    std::vector<span_out> out;
    for (int r = 0; r < P; ++r) {
      if (r == me) continue;
      in.push_back({r, staging.data() + static_cast<size_t>(r * mine) * es, static_cast<size_t>(mine) * es});
      out.push_back({r, bytes(t) + static_cast<size_t>(lo(r)) * es, static_cast<size_t>(lo(r + 1) - lo(r)) * es});
    }
    exchange(name, seq, coll::all_reduce, 0, in, out, es, t.dtype());
    char* my_block = bytes(t) + static_cast<size_t>(lo(me)) * es;
    std::vector<const void*> src(static_cast<size_t>(P));
    for (int r = 0; r < P; ++r)
      src[static_cast<size_t>(r)] = r == me ? my_block : staging.data() + static_cast<size_t>(r * mine) * es;
    reduce_into(my_block, t.dtype(), src, mine, op);
    // 2. Every rank's reduced block goes to everyone.
    in.clear();
    out.clear();
    for (int r = 0; r < P; ++r) {
      if (r == me) continue;
      in.push_back({r, bytes(t) + static_cast<size_t>(lo(r)) * es, static_cast<size_t>(lo(r + 1) - lo(r)) * es});
      out.push_back({r, my_block, static_cast<size_t>(mine) * es});
    }
    exchange(name, seq, coll::all_reduce, 1, in, out, es, t.dtype());
  }

  void reduce_scatter(tensor& out_t, const tensor& in_t, reduce_op op) override {
    const char* name = "reduce_scatter";
    enter_collective(name);
    check_buffer(name, "in", in_t);
    check_buffer(name, "out", out_t);
    const int64_t n = out_t.numel();
    TROUPE_CHECK(in_t.numel() == n * size_ && in_t.dtype() == out_t.dtype(), errc::invalid_argument,
                 "{}: in {} must hold {} x out {}", name, in_t.describe(), size_, out_t.describe());
    check_reducible(name, in_t.dtype());
    const uint64_t seq = coll_seq_++;
    const size_t es = dtype_size(in_t.dtype()), block = static_cast<size_t>(n) * es;
    std::vector<char> staging(block * static_cast<size_t>(size_));
    std::vector<span_in> in;
    std::vector<span_out> out;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      in.push_back({r, staging.data() + block * static_cast<size_t>(r), block});
      out.push_back({r, bytes(in_t) + block * static_cast<size_t>(r), block});
    }
    exchange(name, seq, coll::reduce_scatter, 0, in, out, es, in_t.dtype());
    std::vector<const void*> src(static_cast<size_t>(size_));
    for (int r = 0; r < size_; ++r)
      src[static_cast<size_t>(r)] = (r == rank_ ? bytes(in_t) : staging.data()) + block * static_cast<size_t>(r);
    reduce_into(out_t.data_ptr(), in_t.dtype(), src, n, op);
  }

  void all_gather(tensor& out_t, const tensor& in_t) override {
    const char* name = "all_gather";
    enter_collective(name);
    check_buffer(name, "in", in_t);
    check_buffer(name, "out", out_t);
    TROUPE_CHECK(out_t.numel() == in_t.numel() * size_ && in_t.dtype() == out_t.dtype(), errc::invalid_argument,
                 "{}: out {} must hold {} x in {}", name, out_t.describe(), size_, in_t.describe());
    const uint64_t seq = coll_seq_++;
    const size_t block = in_t.nbytes();
    std::vector<span_in> in;
    std::vector<span_out> out;
    for (int r = 0; r < size_; ++r) {
      if (r == rank_) continue;
      in.push_back({r, bytes(out_t) + block * static_cast<size_t>(r), block});
      out.push_back({r, in_t.data_ptr(), block});
    }
    exchange(name, seq, coll::all_gather, 0, in, out, dtype_size(in_t.dtype()), in_t.dtype());
    std::memmove(bytes(out_t) + block * static_cast<size_t>(rank_), in_t.data_ptr(), block);
  }

  void all_to_all_v(tensor& recv_t, const std::vector<int64_t>& recv_counts, const tensor& send_t,
                    const std::vector<int64_t>& send_counts) override {
    const char* name = "all_to_all_v";
    enter_collective(name);
    check_buffer(name, "send", send_t);
    check_buffer(name, "recv", recv_t);
    const size_t P = static_cast<size_t>(size_);
    TROUPE_CHECK(send_counts.size() == P && recv_counts.size() == P, errc::invalid_argument,
                 "{}: need {} send and recv counts, got {} and {}", name, P, send_counts.size(), recv_counts.size());
    std::vector<int64_t> soff(P + 1, 0), roff(P + 1, 0);
    for (size_t r = 0; r < P; ++r) {
      TROUPE_CHECK(send_counts[r] >= 0 && recv_counts[r] >= 0, errc::invalid_argument, "{}: negative count for rank {}",
                   name, r);
      soff[r + 1] = soff[r] + send_counts[r];
      roff[r + 1] = roff[r] + recv_counts[r];
    }
    TROUPE_CHECK(send_t.numel() >= soff[P] && recv_t.numel() >= roff[P] && send_t.dtype() == recv_t.dtype(),
                 errc::invalid_argument, "{}: send {} / recv {} too small for {} / {} elements", name,
                 send_t.describe(), recv_t.describe(), soff[P], roff[P]);
    const size_t me = static_cast<size_t>(rank_);
    TROUPE_CHECK(send_counts[me] == recv_counts[me], errc::invalid_argument,
                 "{}: rank {} sends itself {} elements but expects recv_counts[{}] = {}", name, rank_, send_counts[me],
                 rank_, recv_counts[me]);
    const uint64_t seq = coll_seq_++;
    const size_t es = dtype_size(send_t.dtype());
    std::vector<span_in> in;
    std::vector<span_out> out;
    for (size_t r = 0; r < P; ++r) {
      if (r == me) continue;
      in.push_back({static_cast<int>(r), bytes(recv_t) + static_cast<size_t>(roff[r]) * es,
                    static_cast<size_t>(recv_counts[r]) * es});
      out.push_back({static_cast<int>(r), bytes(send_t) + static_cast<size_t>(soff[r]) * es,
                     static_cast<size_t>(send_counts[r]) * es});
    }
    exchange(name, seq, coll::all_to_all_v, 0, in, out, es, send_t.dtype());
    std::memmove(bytes(recv_t) + static_cast<size_t>(roff[me]) * es, bytes(send_t) + static_cast<size_t>(soff[me]) * es,
                 static_cast<size_t>(send_counts[me]) * es);
  }

  void broadcast(tensor& t, int root) override {
    const char* name = "broadcast";
    enter_collective(name);
    check_buffer(name, "t", t);
    TROUPE_CHECK(root >= 0 && root < size_, errc::invalid_argument, "{}: root {} not in [0, {})", name, root, size_);
    const uint64_t seq = coll_seq_++;
    std::vector<span_in> in;
    std::vector<span_out> out;
    if (rank_ == root) {
      for (int r = 0; r < size_; ++r)
        if (r != root) out.push_back({r, t.data_ptr(), t.nbytes()});
    } else {
      in.push_back({root, t.data_ptr(), t.nbytes()});
    }
    exchange(name, seq, coll::broadcast, root & 0xFF, in, out, dtype_size(t.dtype()), t.dtype());
  }

  // --- one-sided --------------------------------------------------------------------
  memory_region register_memory(tensor& t) override {
    enter("register_memory");
    check_buffer("register_memory", "t", t);
    TROUPE_CHECK(t.nbytes() > 0, errc::invalid_argument, "register_memory: {} holds no bytes", t.describe());
    auto m = std::make_shared<region_mapping>();
    m->ctx = ctx_;
    m->keep = t;
    ucp_mem_map_params_t mp{};
    mp.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH;
    mp.address = t.data_ptr();
    mp.length = t.nbytes();
    TROUPE_UCX_CHECK(ucp_mem_map(ctx_->h, &mp, &m->mem), "register_memory: rank {}: {}", rank_, t.describe());
    void* packed = nullptr;
    size_t packed_len = 0;
    TROUPE_UCX_CHECK(ucp_rkey_pack(ctx_->h, m->mem, &packed, &packed_len), "register_memory: rank {}", rank_);
    std::string rkey(static_cast<const char*>(packed), packed_len);
    ucp_rkey_buffer_release(packed);
    return memory_region(t.data_ptr(), t.nbytes(), std::move(rkey), std::move(m));
  }

  std::vector<remote_region> exchange_regions(const memory_region& mine) override {
    const char* name = "exchange_regions";
    enter_collective(name);
    const uint64_t seq = coll_seq_++;
    // Blob: address (8) | nbytes (8) | packed rkey.
    std::string blob(16, '\0');
    const uint64_t addr = reinterpret_cast<uintptr_t>(mine.data()), nb = mine.valid() ? mine.nbytes() : 0;
    std::memcpy(blob.data(), &addr, 8);
    std::memcpy(blob.data() + 8, &nb, 8);
    if (mine.valid()) blob += mine.packed_rkey();
    // 1. Every blob's length; 2. the blobs.
    const size_t P = static_cast<size_t>(size_);
    std::vector<uint64_t> lens(P, 0);
    lens[static_cast<size_t>(rank_)] = blob.size();
    std::vector<span_in> in;
    std::vector<span_out> out;
    for (size_t r = 0; r < P; ++r) {
      if (static_cast<int>(r) == rank_) continue;
      in.push_back({static_cast<int>(r), &lens[r], 8});
      out.push_back({static_cast<int>(r), &lens[static_cast<size_t>(rank_)], 8});
    }
    exchange(name, seq, coll::regions, 0, in, out, 8, dtype::i64);
    std::vector<std::string> blobs(P);
    in.clear();
    out.clear();
    for (size_t r = 0; r < P; ++r) {
      if (static_cast<int>(r) == rank_) {
        blobs[r] = blob;
        continue;
      }
      TROUPE_CHECK(lens[r] >= 16 && lens[r] < (1u << 20), errc::format, "{}: rank {} announced a {}-byte region blob",
                   name, r, lens[r]);
      blobs[r].resize(lens[r]);
      in.push_back({static_cast<int>(r), blobs[r].data(), lens[r]});
      out.push_back({static_cast<int>(r), blob.data(), blob.size()});
    }
    exchange(name, seq, coll::regions, 1, in, out, 1, dtype::u8);
    std::vector<remote_region> regions(P);
    for (size_t r = 0; r < P; ++r) {
      remote_region& g = regions[r];
      g.rank = static_cast<int>(r);
      uint64_t a = 0, b = 0;
      std::memcpy(&a, blobs[r].data(), 8);
      std::memcpy(&b, blobs[r].data() + 8, 8);
      g.address = a;
      g.nbytes = static_cast<size_t>(b);
      g.packed_rkey = blobs[r].substr(16);
    }
    return regions;
  }

  void put(const tensor& src, int peer, const remote_region& dst, size_t offset) override {
    enter("put");
    check_buffer("put", "src", src);
    check_remote("put", peer, dst, offset, src.nbytes());
    if (src.nbytes() == 0) return;
    if (peer == rank_) {  // our own memory
      std::memmove(reinterpret_cast<void*>(static_cast<uintptr_t>(dst.address + offset)), src.data_ptr(), src.nbytes());
      return;
    }
    ucp_rkey_h rk = rkey("put", peer, dst);
    std::vector<xfer> xs(1);
    xs[0].peer = peer;
    ucp_request_param_t p = send_param(xs[0]);
    track(xs[0], ucp_put_nbx(slot(peer).ep, src.data_ptr(), src.nbytes(), dst.address + offset, rk, &p));
    wait("put", xs, false, fmt::format(" ({} bytes at offset {})", src.nbytes(), offset));
    check_done("put", xs);
  }

  void get(tensor& dst, int peer, const remote_region& src, size_t offset) override {
    enter("get");
    check_buffer("get", "dst", dst);
    check_remote("get", peer, src, offset, dst.nbytes());
    if (dst.nbytes() == 0) return;
    if (peer == rank_) {
      std::memmove(dst.data_ptr(), reinterpret_cast<const void*>(static_cast<uintptr_t>(src.address + offset)),
                   dst.nbytes());
      return;
    }
    ucp_rkey_h rk = rkey("get", peer, src);
    std::vector<xfer> xs(1);
    xs[0].peer = peer;
    ucp_request_param_t p = send_param(xs[0]);
    track(xs[0], ucp_get_nbx(slot(peer).ep, dst.data_ptr(), dst.nbytes(), src.address + offset, rk, &p));
    wait("get", xs, false, fmt::format(" ({} bytes at offset {})", dst.nbytes(), offset));
    check_done("get", xs);
  }

  void flush(int peer) override {
    enter("flush");
    TROUPE_CHECK(peer >= 0 && peer < size_, errc::invalid_argument, "flush: peer {} not in [0, {})", peer, size_);
    if (peer == rank_) return;
    check_alive("flush", peer);
    std::vector<xfer> xs(1);
    xs[0].peer = peer;
    ucp_request_param_t p = send_param(xs[0]);
    track(xs[0], ucp_ep_flush_nbx(slot(peer).ep, &p));
    wait("flush", xs, false, "");
    check_done("flush", xs);
  }

 private:
  peer_slot& slot(int r) { return slots_[static_cast<size_t>(r)]; }
  static uint64_t p2p_key(int peer, int tag) { return static_cast<uint64_t>(peer) << 32 | static_cast<uint32_t>(tag); }

  std::string abort_reason() {
    std::lock_guard<std::mutex> g(abort_mu_);
    return abort_reason_;
  }

  // Every op starts here: an aborted or broken communicator refuses work.
  void enter(const char* op) {
    if (aborted_.load(std::memory_order_acquire))
      TROUPE_THROW(errc::aborted, "{}: rank {}: group aborted: {}", op, rank_, abort_reason());
    if (!broken_.empty())
      TROUPE_THROW(broken_code_, "{}: rank {}: communicator unusable after an earlier failure ({}); rebuild the group",
                   op, rank_, broken_);
  }

  // Invariant 9: a rank that joined later, met here. Slots up to it; when `connect_now`, its endpoint
  // first (a rank whose address never comes leaves the group as it was).
  void meet(int peer, bool connect_now) {
    if (peer < size_) return;
    std::string addr;
    if (connect_now) addr = resolve(peer);
    grown_ = true;
    while (size_ <= peer) {
      slots_.emplace_back();
      slots_.back().peer = size_;
      slots_.back().resolved = false;
      ++size_;
    }
    if (connect_now) connect(slot(peer), addr);
  }
  std::string resolve(int peer) {
    std::string addr = options_.resolve_peer(peer);
    TROUPE_CHECK(!addr.empty(), errc::io, "ucx: rank {}: no worker address for rank {}", rank_, peer);
    return addr;
  }
  bool may_grow_to(int peer) const { return options_.resolve_peer != nullptr && peer >= 0 && peer < max_ranks; }

  // Invariant 9: a group that grew is not the same on every rank, so it runs no collective.
  void enter_collective(const char* op) {
    enter(op);
    TROUPE_CHECK(!grown_, errc::invalid_argument,
                 "{}: rank {}: this communicator grows as ranks join (it has met {} so far, maybe not the same as "
                 "the others): it does point-to-point only",
                 op, rank_, size_);
  }

  void check_alive(const char* op, int peer) {
    peer_slot& s = slot(peer);
    if (!s.resolved) connect(s, resolve(peer));
    if (s.failed != UCS_OK)
      TROUPE_THROW(errc::io, "{}: rank {}: peer rank {} failed earlier ({}); is rank {} alive?", op, rank_, peer,
                   ucs_status_string(s.failed), peer);
    TROUPE_CHECK(s.ep != nullptr, errc::io, "{}: rank {}: endpoint to rank {} was closed ({})", op, rank_, peer,
                 s.closed);
  }

  void check_p2p(const char* op, int peer, int tag, bool sending) {
    TROUPE_CHECK(((peer >= 0 && peer < size_) || may_grow_to(peer)) && peer != rank_, errc::invalid_argument,
                 "{}: bad peer {} (rank {} of {})", op, peer, rank_, size_);
    meet(peer, sending);
    TROUPE_CHECK(tag >= 0 && tag < max_user_tag, errc::invalid_argument, "{}: tag {} not in [0, {})", op, tag,
                 max_user_tag);
    if (sending) check_alive(op, peer);
  }

  void check_remote(const char* op, int peer, const remote_region& r, size_t offset, size_t n) {
    TROUPE_CHECK((peer >= 0 && peer < size_) || may_grow_to(peer), errc::invalid_argument, "{}: peer {} not in [0, {})",
                 op, peer, size_);
    meet(peer, peer != rank_);
    TROUPE_CHECK(r.rank == peer, errc::invalid_argument, "{}: the region belongs to rank {}, not peer {}", op, r.rank,
                 peer);
    TROUPE_CHECK(offset <= r.nbytes && n <= r.nbytes - offset, errc::out_of_range,
                 "{}: {} bytes at offset {} overrun rank {}'s {}-byte region", op, n, offset, peer, r.nbytes);
    if (peer != rank_) check_alive(op, peer);
  }

  ucp_rkey_h rkey(const char* op, int peer, const remote_region& r) {
    auto key = std::make_pair(peer, r.packed_rkey);
    if (auto it = rkeys_.find(key); it != rkeys_.end()) return it->second;
    ucp_rkey_h rk = nullptr;
    TROUPE_UCX_CHECK(ucp_ep_rkey_unpack(slot(peer).ep, r.packed_rkey.data(), &rk), "{}: rank {}: rkey of rank {}", op,
                     rank_, peer);
    rkeys_.emplace(std::move(key), rk);
    return rk;
  }

  static ucp_request_param_t send_param(xfer& x) {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE;
    p.cb.send = on_send;
    p.user_data = &x;
    p.datatype = ucp_dt_make_contig(1);
    return p;
  }

  void post_send(xfer& x, int peer, const void* data, size_t n, uint64_t tag) {
    x.peer = peer;
    ucp_request_param_t p = send_param(x);
    static const char nothing = 0;
    track(x, ucp_tag_send_nbx(slot(peer).ep, n ? data : &nothing, n, tag, &p));
  }

  void post_recv(xfer& x, int peer, void* data, size_t n, uint64_t tag) {
    x.peer = peer;
    x.is_recv = true;
    x.expect = n;
    ucp_request_param_t p{};
    // Always through the callback: UCX 1.13 leaves recv_info unset when a receive
    // matches an already-arrived message at once, so its length would be unknown.
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE |
                     UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    p.cb.recv = on_recv;
    p.user_data = &x;
    p.datatype = ucp_dt_make_contig(1);
    static char nothing = 0;  // a zero-byte receive writes nothing, but wants a buffer
    track(x, ucp_tag_recv_nbx(worker_, n ? data : &nothing, n, tag, full_mask, &p));
  }

  // One step of a collective: receive `in`, send `out`, wait, check sizes.
  void exchange(const char* op, uint64_t seq, coll code, int step, const std::vector<span_in>& in,
                const std::vector<span_out>& out, size_t es, dtype dt) {
    // Only senders need a live peer: a receive may still match what a peer sent before
    // it left; the wait loop notices a failed peer for what is still pending.
    for (const auto& s : out) check_alive(op, s.peer);
    std::vector<xfer> xs(in.size() + out.size());
    for (size_t i = 0; i < in.size(); ++i) post_recv(xs[i], in[i].peer, in[i].data, in[i].n, coll_tag(in[i].peer, seq, code, step));
    for (size_t i = 0; i < out.size(); ++i)
      post_send(xs[in.size() + i], out[i].peer, out[i].data, out[i].n, coll_tag(rank_, seq, code, step));
    wait(op, xs, true, "");
    for (const xfer& x : xs) {
      if (!x.is_recv) continue;
      TROUPE_CHECK(x.status == UCS_OK && x.length == x.expect, errc::invalid_argument,
                   "{}: rank {} sent {} bytes but rank {} expects {} ({} x {}); do all ranks pass matching shapes, "
                   "dtypes and counts?",
                   op, x.peer, x.status == UCS_OK ? fmt::format("{}", x.length) : "more than " + std::to_string(x.expect),
                   rank_, x.expect, x.expect / std::max<size_t>(es, 1), dtype_name(dt));
    }
  }

  // For non-receive operations, a completion status other than OK names the peer.
  void check_done(const char* op, const std::vector<xfer>& xs) {
    for (const xfer& x : xs)
      TROUPE_CHECK(x.status == UCS_OK, errc::io, "{}: rank {}: transfer with rank {} failed: {}", op, rank_, x.peer,
                   ucs_status_string(x.status));
  }

  static bool all_done(const std::vector<xfer>& xs) {
    return std::all_of(xs.begin(), xs.end(), [](const xfer& x) { return x.status != UCS_INPROGRESS; });
  }

  void release(std::vector<xfer>& xs) {
    for (xfer& x : xs)
      if (x.req && x.status != UCS_INPROGRESS) {
        ucp_request_free(x.req);
        x.req = nullptr;
      }
  }

  // Progresses until every xfer completed. On abort, a failed peer or the deadline it
  // cancels what is in flight and throws; a transfer that completed with an error
  // (other than a receive's size) throws errc::io naming the peer.
  void wait(const char* op, std::vector<xfer>& xs, bool collective, const std::string& what) {
    const auto deadline = steady::now() + std::chrono::milliseconds(options_.timeout_ms);
    auto quiet_since = steady::now();  // the last time progress did something
    while (!all_done(xs)) {
      if (aborted_.load(std::memory_order_acquire))
        fail(xs, errc::aborted, fmt::format("{}: rank {}: group aborted: {}", op, rank_, abort_reason()));
      for (const xfer& x : xs)
        if (x.status == UCS_INPROGRESS && slot(x.peer).failed != UCS_OK)
          fail(xs, errc::io,
               fmt::format("{}{}: rank {}: peer rank {} failed ({}); is rank {} alive?", op, what, rank_, x.peer,
                           ucs_status_string(slot(x.peer).failed), x.peer),
               collective);
      if (steady::now() > deadline) {
        std::map<int, std::string> pending;  // peer -> "receive, send"
        for (const xfer& x : xs)
          if (x.status == UCS_INPROGRESS) {
            std::string& p = pending[x.peer];
            p += (p.empty() ? "" : ", ") + std::string(x.is_recv ? "receive" : "send");
          }
        std::string peers;
        for (const auto& [peer, what_pending] : pending)
          peers += fmt::format("{}rank {} ({})", peers.empty() ? "" : ", ", peer, what_pending);
        const std::string msg = fmt::format(
            "{}{}: rank {} waited {} ms on {}; dead, stuck, or in a different operation?", op, what, rank_,
            options_.timeout_ms, peers);
        if (!fail(xs, errc::io, msg, collective, /*may_recover=*/true)) break;
      }
      if (ucp_worker_progress(worker_) != 0) {
        quiet_since = steady::now();
      } else if (efd_ >= 0 && steady::now() - quiet_since > std::chrono::milliseconds(2)) {
        // Nothing for 2 ms: sleep until UCX has an event, waking every 5 ms for abort() and the deadline.
        if (ucp_worker_arm(worker_) == UCS_OK) {
          pollfd p{efd_, POLLIN, 0};
          ::poll(&p, 1, 5);
        }
      } else {
        std::this_thread::yield();
      }
    }
    release(xs);
    for (const xfer& x : xs)
      if (x.status != UCS_OK && !(x.is_recv && x.status == UCS_ERR_MESSAGE_TRUNCATED)) {
        if (collective) break_group(errc::io, fmt::format("{} with rank {} failed", op, x.peer));
        TROUPE_THROW(errc::io, "{}{}: rank {}: transfer with rank {} failed: {}", op, what, rank_, x.peer,
                     ucs_status_string(x.status));
      }
  }

  // Cancels what is in flight (receives directly, anything else by force-closing its
  // endpoint) so UCX no longer touches the caller's buffers, then throws. With
  // may_recover, returns false instead when everything had in fact completed.
  bool fail(std::vector<xfer>& xs, errc code, const std::string& msg, bool collective = true, bool may_recover = false) {
    bool unfinished = false;
    for (xfer& x : xs) {
      if (x.status != UCS_INPROGRESS) continue;
      if (x.is_recv) {
        ucp_request_cancel(worker_, x.req);
      } else {
        unfinished = true;
        if (slot(x.peer).ep) close_ep(slot(x.peer), msg.c_str());
      }
    }
    // After an abort the communicator is done for: what a dead peer left matched (a rendezvous
    // receive, which cannot be cancelled) is given up quickly, its endpoint closed.
    const auto patience = code == errc::aborted ? std::chrono::milliseconds(50) : std::chrono::milliseconds(1000);
    auto drain = [&] {
      const auto until = steady::now() + patience;
      while (!all_done(xs) && steady::now() < until) ucp_worker_progress(worker_);
    };
    drain();
    // A receive already matched to a rendezvous cannot be cancelled: close its endpoint.
    for (xfer& x : xs)
      if (x.status == UCS_INPROGRESS) {
        unfinished = true;
        if (slot(x.peer).ep) close_ep(slot(x.peer), msg.c_str());
      }
    drain();
    const bool done = all_done(xs);
    release(xs);
    if (!done) {
      // Their callbacks still point into xs: keep its storage (a moved vector keeps its
      // buffer) until the worker is gone.
      log::warn("ucx: rank {}: operations still in flight after cancelling ({})", rank_, msg);
      orphans_.push_back(std::move(xs));
      xs.clear();
    }
    if (may_recover && done && !unfinished &&
        std::all_of(xs.begin(), xs.end(), [](const xfer& x) { return x.status == UCS_OK; }))
      return false;
    if (collective || unfinished) break_group(code, msg);
    TROUPE_THROW(code, "{}", msg);
  }

  void break_group(errc code, const std::string& why) {
    if (broken_.empty()) {
      broken_ = why;
      broken_code_ = code;
    }
  }

  // why == nullptr: flush-close (orderly); otherwise force-close, recording why.
  void close_ep(peer_slot& s, const char* why) {
    ucp_request_param_t p{};
    if (why) {
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_EP_CLOSE_FLAG_FORCE;
      s.closed = why;
    }
    ucs_status_ptr_t r = ucp_ep_close_nbx(s.ep, &p);
    s.ep = nullptr;
    if (r != nullptr && !UCS_PTR_IS_ERR(r)) closing_.push_back(r);
  }

  const int rank_;
  int size_;  // grows as later ranks are met (invariant 9)
  bool grown_ = false;  // joined alone, or met a later rank: no collectives (invariant 9)
  const ucx_options options_;
  std::string address_;  // this worker's
  std::shared_ptr<ucx_context> ctx_;
  ucp_worker_h worker_ = nullptr;
  int efd_ = -1;  // the worker's event fd (UCP_FEATURE_WAKEUP), -1 when it has none
  std::deque<peer_slot> slots_;  // grows only at the back: endpoint error handlers point into it
  std::vector<void*> closing_;
  std::vector<std::vector<xfer>> orphans_;  // transfers that outlived their op (see fail)
  bool peer_errors_ = true;  // endpoints report a failed peer (UCP_ERR_HANDLING_MODE_PEER)
  std::map<std::pair<int, std::string>, ucp_rkey_h> rkeys_;
  std::unordered_map<uint64_t, uint32_t> send_seq_, recv_seq_;
  uint64_t coll_seq_ = 0;
  std::atomic<bool> aborted_{false};
  std::mutex abort_mu_;
  std::string abort_reason_;
  std::string broken_;
  errc broken_code_ = errc::io;
};

}  // namespace

std::unique_ptr<ucx_communicator> make_ucx_communicator(bootstrap& boot, const ucx_options& options) {
  auto c = std::make_unique<ucx_comm>(boot.rank(), boot.size(), options);
  c->init(boot);
  return c;
}

std::unique_ptr<ucx_communicator> make_ucx_joining_communicator(int rank, const ucx_options& options) {
  auto c = std::make_unique<ucx_comm>(rank, rank + 1, options);
  c->init_joining();
  return c;
}

}  // namespace troupe::runtime

#endif  // TROUPE_HAVE_UCX
