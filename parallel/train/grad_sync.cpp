// parallel/train/grad_sync.cpp — bucketed, overlapped gradient all-reduce.
#include "parallel/train/grad_sync.h"

#include <chrono>
#include <cstring>
#include <string>

#include "runtime/error.h"

namespace troupe::parallel {

using runtime::errc;
using runtime::tensor;

namespace {

// The decoder's gradient groups (parallel/model/decoder.h, grad_group).
constexpr int64_t group_head = -1;
constexpr int64_t group_embedding = -2;

int64_t group_of(const std::string& name) {
  static const std::string layers = "model.layers.";
  if (name.rfind(layers, 0) == 0) return std::stoll(name.substr(layers.size()));
  if (name == "model.embed_tokens.weight") return group_embedding;
  return group_head;  // model.norm.weight, lm_head.weight
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

grad_sync::grad_sync(model_weights& grads, runtime::communicator* comm, size_t bucket_bytes,
                     std::function<bool(const std::string&)> local_only)
    : comm_(comm) {
  if (!active()) return;
  // Groups in the order backward finishes them.
  const int64_t L = static_cast<int64_t>(grads.layers.size());
  std::vector<int64_t> order{group_head};
  for (int64_t l = L - 1; l >= 0; --l) order.push_back(l);
  order.push_back(group_embedding);
  std::map<int64_t, std::vector<tensor>> by_group;
  for (auto& p : grads.parameters())
    if (!local_only || !local_only(p.name)) by_group[group_of(p.name)].push_back(p.value);
  bucket cur;
  for (int64_t g : order) {
    auto it = by_group.find(g);
    if (it == by_group.end()) continue;
    for (auto& t : it->second) {
      cur.numel += t.numel();
      cur.tensors.push_back(t);
    }
    cur.groups.push_back(g);
    if (static_cast<size_t>(cur.numel) * sizeof(float) >= bucket_bytes) {
      buckets_.push_back(std::move(cur));
      cur = bucket{};
    }
  }
  if (!cur.groups.empty()) buckets_.push_back(std::move(cur));
  for (size_t b = 0; b < buckets_.size(); ++b) {
    buckets_[b].flat = tensor::empty({buckets_[b].numel});
    for (int64_t g : buckets_[b].groups) bucket_of_group_[g] = b;
  }
  thread_ = std::thread([this] { loop(); });
}

grad_sync::~grad_sync() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void grad_sync::begin() {
  for (auto& b : buckets_) {
    b.groups_seen = 0;
    b.sent = false;
  }
}

void grad_sync::group_ready(int64_t group) {
  if (!active()) return;
  auto it = bucket_of_group_.find(group);
  if (it == bucket_of_group_.end()) return;
  bucket& b = buckets_[it->second];
  if (++b.groups_seen == b.groups.size()) send(it->second);
}

void grad_sync::send(size_t i) {
  bucket& b = buckets_[i];
  if (b.sent) return;
  b.sent = true;
  submit([this, i] { reduce_bucket(buckets_[i]); });
}

void grad_sync::reduce_bucket(bucket& b) {
  float* flat = b.flat.data<float>();
  int64_t off = 0;
  for (const auto& t : b.tensors) {
    std::memcpy(flat + off, t.data<float>(), static_cast<size_t>(t.numel()) * sizeof(float));
    off += t.numel();
  }
  comm_->all_reduce(b.flat, runtime::reduce_op::sum);
  off = 0;
  for (auto& t : b.tensors) {
    std::memcpy(t.data<float>(), flat + off, static_cast<size_t>(t.numel()) * sizeof(float));
    off += t.numel();
  }
}

void grad_sync::finish() {
  if (!active()) return;
  for (size_t i = 0; i < buckets_.size(); ++i) send(i);
  const double t0 = now_s();
  wait_idle();
  exposed_wait_s_ += now_s() - t0;
}

void grad_sync::all_reduce(tensor& t, runtime::reduce_op op) {
  if (!active()) return;
  submit([this, &t, op] { comm_->all_reduce(t, op); });
  wait_idle();
}

double grad_sync::comm_busy_s() const {
  std::lock_guard<std::mutex> lk(const_cast<std::mutex&>(mu_));
  return busy_s_;
}

void grad_sync::submit(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (error_) std::rethrow_exception(error_);
    queue_.push_back(std::move(task));
    ++submitted_;
  }
  cv_.notify_all();
}

void grad_sync::wait_idle() {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return done_ == submitted_; });
  if (error_) std::rethrow_exception(error_);
}

void grad_sync::loop() {
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stop_ and nothing left
    auto task = std::move(queue_.front());
    queue_.pop_front();
    const bool skip = error_ != nullptr;  // after an error the group is out of step
    lk.unlock();
    std::exception_ptr err;
    const double t0 = now_s();
    if (!skip) {
      try {
        task();
      } catch (...) {
        err = std::current_exception();
      }
    }
    const double dt = now_s() - t0;
    lk.lock();
    busy_s_ += dt;
    if (err && !error_) error_ = err;
    ++done_;
    cv_.notify_all();
  }
}

}  // namespace troupe::parallel
