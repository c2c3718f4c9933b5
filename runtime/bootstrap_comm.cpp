// runtime/bootstrap_comm.cpp — a bootstrap over a communicator's point-to-point messages (bootstrap.h).
#include <algorithm>
#include <cstring>

#include "runtime/bootstrap.h"
#include "runtime/communicator.h"
#include "runtime/error.h"

namespace troupe::runtime {

namespace {

tensor blob_tensor(const std::string& s) {
  tensor t = tensor::empty({std::max<int64_t>(static_cast<int64_t>(s.size()), 1)}, dtype::u8);
  if (!s.empty()) std::memcpy(t.data_ptr(), s.data(), s.size());
  return t;
}

class comm_bootstrap final : public bootstrap {
 public:
  comm_bootstrap(communicator& comm, std::vector<int> members, int tag)
      : comm_(comm), members_(std::move(members)), tag_(tag) {
    // A member past comm's size is allowed: a communicator that grows meets it on first use
    // (communicator_ucx.h invariant 9); one that cannot says so at the first message.
    for (int m : members_)
      TROUPE_CHECK(m >= 0, errc::invalid_argument, "communicator bootstrap: member {} is not a rank", m);
    auto it = std::find(members_.begin(), members_.end(), comm_.rank());
    TROUPE_CHECK(it != members_.end(), errc::invalid_argument,
                 "communicator bootstrap: rank {} is not one of its members", comm_.rank());
    rank_ = static_cast<int>(it - members_.begin());
  }
  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(members_.size()); }
  std::vector<std::string> all_gather(const std::string& mine) override {
    const int root = members_[0];
    std::vector<std::string> out(members_.size());
    if (rank_ == 0) {
      out[0] = mine;
      for (size_t i = 1; i < members_.size(); ++i) out[i] = recv_blob(members_[i]);
      for (size_t i = 1; i < members_.size(); ++i)
        for (const auto& b : out) send_blob(b, members_[i]);
    } else {
      send_blob(mine, root);
      for (auto& b : out) b = recv_blob(root);
    }
    return out;
  }

 private:
  void send_blob(const std::string& s, int peer) {
    tensor len = tensor::from_vector(std::vector<int64_t>{static_cast<int64_t>(s.size())}, {1});
    comm_.send(len, peer, tag_);
    if (!s.empty()) comm_.send(blob_tensor(s), peer, tag_);
  }
  std::string recv_blob(int peer) {
    tensor len = tensor::zeros({1}, dtype::i64);
    comm_.recv(len, peer, tag_);
    const int64_t n = len.data<int64_t>()[0];
    TROUPE_CHECK(n >= 0 && n < (int64_t{1} << 30), errc::io, "communicator bootstrap: rank {} sent a blob of {} bytes",
                 peer, n);
    if (n == 0) return {};
    tensor b = tensor::empty({n}, dtype::u8);
    comm_.recv(b, peer, tag_);
    return std::string(static_cast<const char*>(b.data_ptr()), static_cast<size_t>(n));
  }
  communicator& comm_;
  std::vector<int> members_;
  int tag_;
  int rank_ = 0;
};

}  // namespace

std::unique_ptr<bootstrap> make_comm_bootstrap(communicator& comm, std::vector<int> members, int tag) {
  return std::make_unique<comm_bootstrap>(comm, std::move(members), tag);
}

}  // namespace troupe::runtime
