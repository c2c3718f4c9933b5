// runtime/bootstrap_subgroup.cpp — a bootstrap over a subset of another's ranks.
#include <algorithm>

#include "runtime/bootstrap.h"
#include "runtime/error.h"

namespace troupe::runtime {

namespace {

class subgroup_bootstrap final : public bootstrap {
 public:
  subgroup_bootstrap(bootstrap& world, std::vector<int> members) : world_(world), members_(std::move(members)) {
    for (int m : members_)
      TROUPE_CHECK(m >= 0 && m < world_.size(), errc::invalid_argument,
                   "subgroup bootstrap: member {} is not a rank of the {}-rank world", m, world_.size());
    auto it = std::find(members_.begin(), members_.end(), world_.rank());
    rank_ = it == members_.end() ? -1 : static_cast<int>(it - members_.begin());
  }
  int rank() const override { return rank_; }
  int size() const override { return static_cast<int>(members_.size()); }
  std::vector<std::string> all_gather(const std::string& mine) override {
    const auto all = world_.all_gather(mine);
    if (rank_ < 0) return {};
    std::vector<std::string> out;
    out.reserve(members_.size());
    for (int m : members_) out.push_back(all[static_cast<size_t>(m)]);
    return out;
  }

 private:
  bootstrap& world_;
  std::vector<int> members_;
  int rank_ = -1;
};

}  // namespace

std::unique_ptr<bootstrap> make_subgroup_bootstrap(bootstrap& world, std::vector<int> members) {
  return std::make_unique<subgroup_bootstrap>(world, std::move(members));
}

}  // namespace troupe::runtime
