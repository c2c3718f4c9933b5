// runtime/communicator_nccl.cpp — see communicator_nccl.h. Each operation enqueues NCCL
// work on the communicator's stream (non-blocking NCCL: calls may return ncclInProgress)
// and then waits in a polling loop that watches the stream, NCCL's async error, the
// deadline and the abort flag.
#include "runtime/communicator_nccl.h"

#include "runtime/error.h"

#ifndef TROUPE_HAVE_NCCL

namespace troupe::runtime {

std::unique_ptr<communicator> make_nccl_communicator(bootstrap&, int cuda_device, const communicator_options&) {
  TROUPE_THROW(errc::unsupported,
               "make_nccl_communicator (cuda:{}): troupe was built without NCCL; install NCCL (nccl.h, libnccl) "
               "next to the CUDA toolkit and reconfigure, or use another communicator backend",
               cuda_device);
}

}  // namespace troupe::runtime

#else

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "runtime/device.h"
#include "runtime/dtype.h"
#include "runtime/log.h"

namespace troupe::runtime {

namespace {

using steady = std::chrono::steady_clock;

// NCCL results that point at a peer or the network rather than at this process.
errc nccl_errc(ncclResult_t r) {
  switch (r) {
    case ncclRemoteError:
    case ncclSystemError: return errc::io;
    case ncclInvalidArgument:
    case ncclInvalidUsage: return errc::invalid_argument;
    default: return errc::cuda;
  }
}

#define TROUPE_CUDA_CHECK(call, ...)                                                                         \
  do {                                                                                                       \
    const cudaError_t e_ = (call);                                                                           \
    if (e_ != cudaSuccess)                                                                                   \
      TROUPE_THROW(errc::cuda, "{}: {} failed: {}", ::fmt::format(__VA_ARGS__), #call, cudaGetErrorString(e_)); \
  } while (0)

bool nccl_ok(ncclResult_t r) { return r == ncclSuccess || r == ncclInProgress; }

std::optional<ncclDataType_t> nccl_type(dtype dt) {
  switch (dt) {
    case dtype::f32: return ncclFloat32;
    case dtype::bf16: return ncclBfloat16;
    case dtype::f16: return ncclFloat16;
    case dtype::i32: return ncclInt32;
    case dtype::i64: return ncclInt64;
    case dtype::u8: return ncclUint8;
  }
  return std::nullopt;
}

// Why cuda:i cannot be used here, or "".
std::string gpu_problem(int cuda_device) {
  const cuda_state s = cuda_status();
  if (!s.available) return fmt::format("cuda:{} is not usable: no GPU answered ({})", cuda_device, s.reason);
  if (cuda_device < 0 || cuda_device >= s.device_count)
    return fmt::format("cuda:{} does not exist: {} GPU(s) visible", cuda_device, s.device_count);
  return "";
}

class nccl_communicator final : public communicator {
 public:
  nccl_communicator(int rank, int size, int cuda_device, const communicator_options& o)
      : rank_(rank), size_(size), dev_(cuda_device), options_(o) {}

  ~nccl_communicator() override {
    try {
      if (comm_) {
        select_device();
        if (failure_.empty() && !aborted_.load()) {
          // Flush, then destroy; a finalize that does not settle in time is aborted.
          ncclResult_t st = ncclCommFinalize(comm_);
          const auto deadline = steady::now() + std::chrono::milliseconds(options_.timeout_ms);
          while (st == ncclInProgress && steady::now() < deadline) {
            std::this_thread::sleep_for(std::chrono::microseconds(50));
            if (ncclCommGetAsyncError(comm_, &st) != ncclSuccess) break;
          }
          if (st == ncclSuccess) ncclCommDestroy(comm_);
          else ncclCommAbort(comm_);
        } else {
          ncclCommAbort(comm_);
        }
        comm_ = nullptr;
      }
      if (scratch_) cudaFree(scratch_);
      if (host_scratch_) cudaFreeHost(host_scratch_);
      if (stream_) cudaStreamDestroy(stream_);
    } catch (...) {
      // A destructor does not throw; the process may be going down already.
    }
  }

  // Set-up, collective: creates the stream and scratch, then joins the NCCL group.
  void init(const ncclUniqueId& id) {
    select_device();
    TROUPE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "nccl init on cuda:{}", dev_);
    TROUPE_CUDA_CHECK(cudaMalloc(&scratch_, scratch_bytes()), "nccl init on cuda:{}", dev_);
    TROUPE_CUDA_CHECK(cudaHostAlloc(&host_scratch_, scratch_bytes(), cudaHostAllocDefault), "nccl init on cuda:{}", dev_);
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;  // calls return ncclInProgress; init and waits can time out
    config.commName = "troupe";
    ncclComm_t c = nullptr;
    const ncclResult_t r = ncclCommInitRankConfig(&c, size_, id, rank_, &config);
    comm_ = c;
    if (!nccl_ok(r)) fail_now(nccl_errc(r), "ncclCommInitRankConfig", ncclGetErrorString(r));
    wait("ncclCommInitRankConfig", /*stream=*/false);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }

  void all_reduce(tensor& t, reduce_op op) override {
    const char* name = "all_reduce";
    begin(name);
    check_buffer(name, "t", t);
    const ncclDataType_t ty = reducible(name, t.dtype());
    enqueue(name, ncclAllReduce(t.data_ptr(), t.data_ptr(), static_cast<size_t>(t.numel()), ty, nccl_op(op), comm_, stream_));
    wait(name);
  }

  void reduce_scatter(tensor& out, const tensor& in, reduce_op op) override {
    const char* name = "reduce_scatter";
    begin(name);
    check_buffer(name, "out", out);
    check_buffer(name, "in", in);
    TROUPE_CHECK(in.dtype() == out.dtype(), errc::invalid_argument, "nccl {}: in is {} but out is {}", name,
                 dtype_name(in.dtype()), dtype_name(out.dtype()));
    TROUPE_CHECK(in.numel() == out.numel() * size_, errc::invalid_argument,
                 "nccl {}: in has {} elements, expected P*n = {}*{} for out of {}", name, in.numel(), size_, out.numel(),
                 out.numel());
    const ncclDataType_t ty = reducible(name, out.dtype());
    enqueue(name, ncclReduceScatter(in.data_ptr(), out.data_ptr(), static_cast<size_t>(out.numel()), ty, nccl_op(op), comm_,
                                    stream_));
    wait(name);
  }

  void all_gather(tensor& out, const tensor& in) override {
    const char* name = "all_gather";
    begin(name);
    check_buffer(name, "out", out);
    check_buffer(name, "in", in);
    TROUPE_CHECK(in.dtype() == out.dtype(), errc::invalid_argument, "nccl {}: in is {} but out is {}", name,
                 dtype_name(in.dtype()), dtype_name(out.dtype()));
    TROUPE_CHECK(out.numel() == in.numel() * size_, errc::invalid_argument,
                 "nccl {}: out has {} elements, expected P*n = {}*{}", name, out.numel(), size_, in.numel());
    enqueue(name, ncclAllGather(in.data_ptr(), out.data_ptr(), in.nbytes(), ncclUint8, comm_, stream_));
    wait(name);
  }

  void all_to_all_v(tensor& recv, const std::vector<int64_t>& recv_counts, const tensor& send,
                    const std::vector<int64_t>& send_counts) override {
    const char* name = "all_to_all_v";
    begin(name);
    check_buffer(name, "recv", recv);
    check_buffer(name, "send", send);
    TROUPE_CHECK(recv.dtype() == send.dtype(), errc::invalid_argument, "nccl {}: send is {} but recv is {}", name,
                 dtype_name(send.dtype()), dtype_name(recv.dtype()));
    const auto P = static_cast<size_t>(size_);
    TROUPE_CHECK(recv_counts.size() == P && send_counts.size() == P, errc::invalid_argument,
                 "nccl {}: {} send counts and {} recv counts for {} ranks", name, send_counts.size(), recv_counts.size(), P);
    int64_t st = 0, rt = 0;
    for (size_t r = 0; r < P; ++r) {
      TROUPE_CHECK(send_counts[r] >= 0 && recv_counts[r] >= 0, errc::invalid_argument,
                   "nccl {}: negative count for rank {}", name, r);
      st += send_counts[r];
      rt += recv_counts[r];
    }
    TROUPE_CHECK(st <= send.numel() && rt <= recv.numel(), errc::invalid_argument,
                 "nccl {}: counts need {} send / {} recv elements, buffers hold {} / {}", name, st, rt, send.numel(),
                 recv.numel());

    // Counts first, so a disagreement is an error on every rank rather than a hang: each
    // rank contributes (send_counts, recv_counts); all ranks check every pair alike and
    // stay in step. Rows of the gathered matrix: 2P int64 per rank.
    auto* host = static_cast<int64_t*>(host_scratch_);
    auto* dev = static_cast<int64_t*>(scratch_);
    for (size_t r = 0; r < P; ++r) host[r] = send_counts[r], host[P + r] = recv_counts[r];
    TROUPE_CUDA_CHECK(cudaMemcpyAsync(dev, host, 2 * P * sizeof(int64_t), cudaMemcpyHostToDevice, stream_), "nccl {}", name);
    enqueue(name, ncclAllGather(dev, dev + 2 * P, 2 * P, ncclInt64, comm_, stream_));
    TROUPE_CUDA_CHECK(cudaMemcpyAsync(host + 2 * P, dev + 2 * P, 2 * P * P * sizeof(int64_t), cudaMemcpyDeviceToHost, stream_),
                      "nccl {}", name);
    wait(name);
    const int64_t* rows = host + 2 * P;
    for (size_t s = 0; s < P; ++s)
      for (size_t d = 0; d < P; ++d) {
        const int64_t sent = rows[s * 2 * P + d], expected = rows[d * 2 * P + P + s];
        TROUPE_CHECK(sent == expected, errc::invalid_argument,
                     "nccl {} on rank {}: rank {} sends {} elements to rank {}, but rank {} expects {} (its recv_counts[{}])",
                     name, rank_, s, sent, d, d, expected, s);
      }

    const size_t esize = dtype_size(send.dtype());
    const char* s = static_cast<const char*>(send.data_ptr());
    char* d = static_cast<char*>(recv.data_ptr());
    enqueue(name, ncclGroupStart(), /*in_group=*/true);
    for (size_t r = 0; r < P; ++r) {
      const auto sn = static_cast<size_t>(send_counts[r]) * esize, rn = static_cast<size_t>(recv_counts[r]) * esize;
      if (sn) enqueue(name, ncclSend(s, sn, ncclUint8, static_cast<int>(r), comm_, stream_), /*in_group=*/true);
      if (rn) enqueue(name, ncclRecv(d, rn, ncclUint8, static_cast<int>(r), comm_, stream_), /*in_group=*/true);
      s += sn;
      d += rn;
    }
    enqueue(name, ncclGroupEnd());
    wait(name);
  }

  void broadcast(tensor& t, int root) override {
    const char* name = "broadcast";
    begin(name);
    check_buffer(name, "t", t);
    check_peer(name, "root", root);
    enqueue(name, ncclBroadcast(t.data_ptr(), t.data_ptr(), t.nbytes(), ncclUint8, root, comm_, stream_));
    wait(name);
  }

  void send(const tensor& t, int peer, int /*tag*/) override {
    const char* name = "send";
    begin(name);
    check_buffer(name, "t", t);
    check_peer(name, "peer", peer);
    TROUPE_CHECK(peer != rank_, errc::invalid_argument, "nccl send: rank {} cannot send to itself", rank_);
    enqueue(name, ncclSend(t.data_ptr(), t.nbytes(), ncclUint8, peer, comm_, stream_), false, peer);
    wait(name, true, peer);
  }

  void recv(tensor& t, int peer, int /*tag*/) override {
    const char* name = "recv";
    begin(name);
    check_buffer(name, "t", t);
    check_peer(name, "peer", peer);
    TROUPE_CHECK(peer != rank_, errc::invalid_argument, "nccl recv: rank {} cannot receive from itself", rank_);
    enqueue(name, ncclRecv(t.data_ptr(), t.nbytes(), ncclUint8, peer, comm_, stream_), false, peer);
    wait(name, true, peer);
  }

  void barrier() override {
    const char* name = "barrier";
    begin(name);
    enqueue(name, ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, stream_));
    wait(name);
  }

  void abort(const std::string& reason) override {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (aborted_.load()) return;
      reason_ = reason;
    }
    aborted_.store(true);
  }

 private:
  // all_to_all_v's counts: my 2P, then the gathered 2P x P; the barrier uses the first float.
  size_t scratch_bytes() const { return 2 * static_cast<size_t>(size_) * static_cast<size_t>(size_ + 1) * sizeof(int64_t); }

  void select_device() const { TROUPE_CUDA_CHECK(cudaSetDevice(dev_), "nccl rank {}", rank_); }

  std::string abort_reason() {
    std::lock_guard<std::mutex> g(mu_);
    return reason_;
  }

  // Refuses the op when the group was aborted or has failed; otherwise selects the GPU.
  void begin(const char* op) {
    if (aborted_.load()) {
      kill_comm();
      TROUPE_THROW(errc::aborted, "nccl {} on rank {}: communicator aborted: {}", op, rank_, abort_reason());
    }
    TROUPE_CHECK(failure_.empty(), failure_code_, "nccl {} on rank {}: communicator failed earlier ({}); rebuild the group",
                 op, rank_, failure_);
    select_device();
  }

  // NCCL state no longer trustworthy: abort it (kernels in flight are stopped) and remember why.
  [[noreturn]] void fail_now(errc code, const char* op, const std::string& what) {
    const std::string msg = fmt::format("nccl {} on rank {} (cuda:{}): {}", op, rank_, dev_, what);
    if (failure_.empty()) failure_ = msg, failure_code_ = code;
    kill_comm();
    throw error(code, msg, __FILE__, __LINE__);
  }

  void kill_comm() {
    if (!comm_) return;
    ncclCommAbort(comm_);
    comm_ = nullptr;
    // The aborted kernels leave the stream; wait for that (bounded) so the caller may
    // free its buffers once the op has thrown.
    const auto deadline = steady::now() + std::chrono::milliseconds(options_.timeout_ms);
    while (cudaStreamQuery(stream_) == cudaErrorNotReady && steady::now() < deadline)
      std::this_thread::sleep_for(std::chrono::microseconds(50));
  }

  // Takes an NCCL call's result. Outside a group, ncclInProgress (non-blocking NCCL still
  // enqueueing, e.g. connecting to peers) is settled before anything else goes on the
  // stream, so later stream work (copies) is ordered after the NCCL kernel. Inside a
  // group, the calls only record; ncclGroupEnd is the call that settles.
  void enqueue(const char* op, ncclResult_t r, bool in_group = false, int peer = -1) {
    if (r == ncclInProgress && !in_group) return wait(op, /*stream=*/false, peer);
    if (nccl_ok(r)) return;
    const char* last = comm_ ? ncclGetLastError(comm_) : "";
    fail_now(nccl_errc(r), op, fmt::format("{}{}{}", ncclGetErrorString(r), last && *last ? ": " : "", last ? last : ""));
  }

  // Polls until NCCL has settled and (stream) the stream is idle; see invariants 3 and 4.
  void wait(const char* op, bool stream = true, int peer = -1) {
    const auto deadline = steady::now() + std::chrono::milliseconds(options_.timeout_ms);
    for (int spins = 0;; ++spins) {
      if (aborted_.load()) {
        const std::string why = abort_reason();
        if (failure_.empty()) failure_ = fmt::format("aborted: {}", why), failure_code_ = errc::aborted;
        kill_comm();
        TROUPE_THROW(errc::aborted, "nccl {} on rank {}: aborted while pending: {}", op, rank_, why);
      }
      ncclResult_t async = ncclSuccess;
      const ncclResult_t q = ncclCommGetAsyncError(comm_, &async);
      if (q != ncclSuccess) fail_now(nccl_errc(q), op, fmt::format("ncclCommGetAsyncError: {}", ncclGetErrorString(q)));
      if (async != ncclSuccess && async != ncclInProgress)
        fail_now(nccl_errc(async), op, fmt::format("{}: {}", ncclGetErrorString(async), ncclGetLastError(comm_)));
      if (async == ncclSuccess) {
        if (!stream) return;
        const cudaError_t e = cudaStreamQuery(stream_);
        if (e == cudaSuccess) return;
        if (e != cudaErrorNotReady) fail_now(errc::cuda, op, fmt::format("cudaStreamQuery: {}", cudaGetErrorString(e)));
      }
      if (steady::now() >= deadline)
        fail_now(errc::io, op,
                 fmt::format("not complete after {} ms: {} did not take part in time; the NCCL communicator was aborted",
                             options_.timeout_ms, peer >= 0 ? fmt::format("rank {}", peer) : std::string("a rank of the group")));
      if (spins < 100) std::this_thread::yield();
      else std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  void check_buffer(const char* op, const char* name, const tensor& t) const {
    TROUPE_CHECK(t.defined() && t.device() == device::cuda(dev_) && t.is_contiguous(), errc::invalid_argument,
                 "nccl {} on rank {}: '{}' must be a contiguous tensor on cuda:{} (this communicator's GPU), got {}", op,
                 rank_, name, dev_, t.defined() ? t.describe() : "undefined");
  }

  void check_peer(const char* op, const char* what, int r) const {
    TROUPE_CHECK(r >= 0 && r < size_, errc::invalid_argument, "nccl {}: {} {} is not a rank of this group of {}", op, what,
                 r, size_);
  }

  static ncclDataType_t reducible(const char* op, dtype dt) {
    const auto ty = nccl_type(dt);
    TROUPE_CHECK(ty && dt != dtype::u8, errc::unsupported, "nccl {}: reduction of {} is not supported (f32, bf16, f16, i32, i64)",
                 op, dtype_name(dt));
    return *ty;
  }

  static ncclRedOp_t nccl_op(reduce_op op) { return op == reduce_op::sum ? ncclSum : ncclMax; }

  const int rank_, size_, dev_;
  const communicator_options options_;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  void* scratch_ = nullptr;       // device, scratch_bytes()
  void* host_scratch_ = nullptr;  // pinned host mirror of scratch_
  std::string failure_;           // set once the group is out of step
  errc failure_code_ = errc::io;
  std::mutex mu_;                 // guards reason_
  std::string reason_;
  std::atomic<bool> aborted_{false};
};

}  // namespace

std::unique_ptr<communicator> make_nccl_communicator(bootstrap& boot, int cuda_device, const communicator_options& options) {
  const int rank = boot.rank(), size = boot.size();
  // Every rank says whether it can take part ("+" and, on rank 0, the unique id) or why
  // not ("-" and the reason), so a rank without a GPU does not leave the others waiting.
  std::string mine;
  std::string problem = gpu_problem(cuda_device);
  if (problem.empty() && rank == 0) {
    (void)cudaSetDevice(cuda_device);  // ncclGetUniqueId may touch the current device
    ncclUniqueId id;
    const ncclResult_t r = ncclGetUniqueId(&id);
    if (r == ncclSuccess) mine = "+" + std::string(id.internal, sizeof(id.internal));
    else problem = fmt::format("ncclGetUniqueId failed: {}", ncclGetErrorString(r));
  } else if (problem.empty()) {
    mine = "+";
  }
  if (!problem.empty()) mine = "-" + problem;
  const std::vector<std::string> all = boot.all_gather(mine);
  TROUPE_CHECK(static_cast<int>(all.size()) == size, errc::internal, "make_nccl_communicator: bootstrap returned {} blobs for {} ranks",
               all.size(), size);
  std::string failures;
  for (int r = 0; r < size; ++r) {
    const std::string& b = all[static_cast<size_t>(r)];
    if (b.empty() || b[0] != '+') failures += fmt::format("{}rank {}: {}", failures.empty() ? "" : "; ", r, b.empty() ? "?" : b.substr(1));
  }
  TROUPE_CHECK(failures.empty(), errc::unsupported, "make_nccl_communicator: cannot form an NCCL group of {} on this machine: {}",
               size, failures);
  ncclUniqueId id;
  TROUPE_CHECK(all[0].size() == 1 + sizeof(id.internal), errc::format,
               "make_nccl_communicator: rank 0's NCCL unique id has {} bytes, expected {}", all[0].size() - 1,
               sizeof(id.internal));
  std::memcpy(id.internal, all[0].data() + 1, sizeof(id.internal));
  auto c = std::make_unique<nccl_communicator>(rank, size, cuda_device, options);
  c->init(id);
  log::debug("nccl communicator: rank {} of {} on cuda:{}", rank, size, cuda_device);
  return c;
}

}  // namespace troupe::runtime

#endif  // TROUPE_HAVE_NCCL
