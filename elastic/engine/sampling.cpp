// elastic/engine/sampling.cpp — greedy / temperature / top-k / top-p sampling and stop strings.
#include "elastic/engine/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "parallel/model/generate.h"
#include "runtime/error.h"

namespace troupe::elastic {

using runtime::errc;

std::optional<sampling_param_error> check_sampling_params(const sampling_params& p) {
  auto err = [](const char* field, std::string what) {
    return sampling_param_error{field, fmt::format("{} - '{}'", what, field)};
  };
  if (std::isnan(p.temperature)) return err("temperature", "nan is not a valid number");
  if (p.temperature < 0) return err("temperature", fmt::format("{} is less than the minimum of 0", p.temperature));
  if (p.temperature > 2)
    return err("temperature", fmt::format("{} is greater than the maximum of 2", p.temperature));
  if (p.top_k < 0) return err("top_k", fmt::format("{} is less than the minimum of 0", p.top_k));
  if (std::isnan(p.top_p)) return err("top_p", "nan is not a valid number");
  if (p.top_p <= 0)
    return err("top_p", fmt::format("{} is less than or equal to the exclusive minimum of 0", p.top_p));
  if (p.top_p > 1) return err("top_p", fmt::format("{} is greater than the maximum of 1", p.top_p));
  if (p.max_tokens < 1) return err("max_tokens", fmt::format("{} is less than the minimum of 1", p.max_tokens));
  for (const auto& s : p.stop)
    if (s.empty()) return err("stop", "'' is too short: a stop string must not be empty");
  for (int32_t t : p.stop_token_ids)
    if (t < 0) return err("stop_token_ids", fmt::format("{} is less than the minimum of 0", t));
  return std::nullopt;
}

void validate_sampling_params(const sampling_params& p) {
  if (auto e = check_sampling_params(p)) TROUPE_THROW(errc::invalid_argument, "{}", e->message);
}

namespace {

// Fills prob (by id, unnormalised) and order (the kept ids, in draw order); returns the
// number kept. Draw order is id order without a filter, probability order with one.
int64_t filter_candidates(const float* logits, int64_t V, const sampling_params& p, std::vector<int32_t>& order,
                          std::vector<double>& prob) {
  TROUPE_CHECK(V >= 1, errc::invalid_argument, "sampler: vocabulary size {} must be >= 1", V);
  float m = -INFINITY;
  for (int64_t i = 0; i < V; ++i)
    if (logits[i] > m) m = logits[i];  // NaN never compares greater
  TROUPE_CHECK(std::isfinite(m), errc::invalid_argument,
               "sampler: the {} logits have no finite maximum (max {}); the model produced inf/NaN", V, m);
  const auto n = static_cast<size_t>(V);
  prob.resize(n);
  order.resize(n);
  const double inv_t = 1.0 / p.temperature;
  for (size_t i = 0; i < n; ++i) {
    const double l = logits[i];
    prob[i] = std::isnan(l) ? 0.0 : std::exp((l - double(m)) * inv_t);  // exp(-inf) = 0
  }
  std::iota(order.begin(), order.end(), 0);
  auto by_prob = [&prob](int32_t a, int32_t b) {
    const double pa = prob[static_cast<size_t>(a)], pb = prob[static_cast<size_t>(b)];
    return pa != pb ? pa > pb : a < b;
  };
  int64_t kept = V;
  if (p.top_k > 0 && p.top_k < V) {
    kept = p.top_k;
    std::partial_sort(order.begin(), order.begin() + kept, order.end(), by_prob);
  } else if (p.top_p < 1.0) {
    // The nucleus is usually a short head of the vocabulary: sort a growing head (64, 256, ...)
    // until it holds top_p of the mass instead of all V ids (128k for Llama-3). The head of a
    // partial sort is the head of the full sort (ties broken by id), so the result is the same.
    double all = 0;
    for (size_t i = 0; i < n; ++i) all += prob[i];
    const double target = p.top_p * all;
    for (int64_t head = std::min<int64_t>(V, 64);; head = std::min(V, head * 4)) {
      std::partial_sort(order.begin(), order.begin() + head, order.end(), by_prob);
      double cum = 0;
      int64_t j = 0;
      while (j < head && cum < target) cum += prob[static_cast<size_t>(order[static_cast<size_t>(j++)])];
      if (cum >= target || head == V) return j;
    }
  }
  if (p.top_p < 1.0) {  // after top-k: the nucleus of the k kept
    double total = 0;
    for (int64_t j = 0; j < kept; ++j) total += prob[static_cast<size_t>(order[static_cast<size_t>(j)])];
    const double target = p.top_p * total;
    double cum = 0;
    int64_t j = 0;
    while (j < kept) {
      cum += prob[static_cast<size_t>(order[static_cast<size_t>(j++)])];
      if (cum >= target) break;
    }
    kept = j;
  }
  return kept;
}

}  // namespace

std::vector<double> sampling_probs(const float* logits, int64_t V, const sampling_params& p) {
  validate_sampling_params(p);
  std::vector<double> out(static_cast<size_t>(std::max<int64_t>(V, 0)), 0.0);
  if (p.temperature == 0) {
    TROUPE_CHECK(V >= 1, errc::invalid_argument, "sampler: vocabulary size {} must be >= 1", V);
    out[static_cast<size_t>(parallel::argmax_token(logits, V))] = 1.0;
    return out;
  }
  std::vector<int32_t> order;
  std::vector<double> prob;
  const int64_t kept = filter_candidates(logits, V, p, order, prob);
  double total = 0;
  for (int64_t j = 0; j < kept; ++j) total += prob[static_cast<size_t>(order[static_cast<size_t>(j)])];
  for (int64_t j = 0; j < kept; ++j) {
    const auto id = static_cast<size_t>(order[static_cast<size_t>(j)]);
    out[id] = prob[id] / total;
  }
  return out;
}

sampler::sampler(const sampling_params& p) : params_(p), rng_(p.seed) { validate_sampling_params(p); }

int32_t sampler::sample(const float* logits, int64_t V) {
  if (params_.temperature == 0) {
    TROUPE_CHECK(V >= 1, errc::invalid_argument, "sampler: vocabulary size {} must be >= 1", V);
    return parallel::argmax_token(logits, V);
  }
  const int64_t kept = filter_candidates(logits, V, params_, order_, prob_);
  double total = 0;
  for (int64_t j = 0; j < kept; ++j) total += prob_[static_cast<size_t>(order_[static_cast<size_t>(j)])];
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53;  // [0, 1), library independent
  const double target = u * total;
  double cum = 0;
  int32_t last = order_[0];
  for (int64_t j = 0; j < kept; ++j) {
    const int32_t id = order_[static_cast<size_t>(j)];
    const double q = prob_[static_cast<size_t>(id)];
    if (q <= 0) continue;
    cum += q;
    last = id;
    if (cum > target) return id;
  }
  return last;  // rounding left target at the very top
}

const char* finish_reason_name(finish_reason r) {
  switch (r) {
    case finish_reason::stop:
      return "stop";
    case finish_reason::length:
      return "length";
    case finish_reason::none:
      break;
  }
  return "";
}

finish_reason token_finish_reason(const sampling_params& p, int32_t token, int64_t num_generated,
                                  int64_t eos_token_id) {
  if (!p.ignore_eos && eos_token_id >= 0 && token == eos_token_id) return finish_reason::stop;
  if (std::find(p.stop_token_ids.begin(), p.stop_token_ids.end(), token) != p.stop_token_ids.end())
    return finish_reason::stop;
  if (num_generated >= p.max_tokens) return finish_reason::length;
  return finish_reason::none;
}

stop_checker::stop_checker(std::vector<std::string> stops) {
  for (auto& s : stops)
    if (!s.empty()) stops_.push_back(std::move(s));
}

stop_chunk stop_checker::push(std::string_view text) {
  stop_chunk out;
  if (stopped_) {
    out.stopped = true;
    return out;
  }
  pending_.append(text);
  // Every stop occurrence starts inside pending_: the text streamed before it ended with
  // no proper prefix of a stop string (that much would have been held back).
  size_t best = std::string::npos;
  const std::string* which = nullptr;
  for (const auto& s : stops_) {
    const size_t pos = pending_.find(s);
    if (pos < best) {
      best = pos;
      which = &s;
    }
  }
  if (which) {
    out.text = pending_.substr(0, best);
    out.stopped = true;
    out.stop = *which;
    stopped_ = true;
    pending_.clear();
    return out;
  }
  size_t hold = 0;  // the longest suffix of pending_ that is a proper prefix of a stop string
  for (const auto& s : stops_)
    for (size_t h = std::min(s.size() - 1, pending_.size()); h > hold; --h)
      if (pending_.compare(pending_.size() - h, h, s, 0, h) == 0) {
        hold = h;
        break;
      }
  out.text = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  return out;
}

std::string stop_checker::flush() {
  std::string out;
  if (!stopped_) out.swap(pending_);
  pending_.clear();
  return out;
}

}  // namespace troupe::elastic
