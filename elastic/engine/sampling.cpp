// elastic/engine/sampling.cpp — logit processors, greedy / temperature / min-p / top-k / top-p
// sampling, logprobs and stop strings.
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
  const int64_t min_max = p.prompt_logprobs >= 0 ? 0 : 1;  // the prompt's logprobs alone need no token
  if (p.max_tokens < min_max)
    return err("max_tokens", fmt::format("{} is less than the minimum of {}", p.max_tokens, min_max));
  if (p.min_tokens < 0 || p.min_tokens > p.max_tokens)
    return err("min_tokens", fmt::format("{} is not in [0, max_tokens = {}]", p.min_tokens, p.max_tokens));
  if (!(p.min_p >= 0 && p.min_p <= 1)) return err("min_p", fmt::format("{} is not in [0, 1]", p.min_p));
  if (!(p.presence_penalty >= -2 && p.presence_penalty <= 2))
    return err("presence_penalty", fmt::format("{} is not in [-2, 2]", p.presence_penalty));
  if (!(p.frequency_penalty >= -2 && p.frequency_penalty <= 2))
    return err("frequency_penalty", fmt::format("{} is not in [-2, 2]", p.frequency_penalty));
  if (!(p.repetition_penalty > 0 && p.repetition_penalty <= 2))
    return err("repetition_penalty", fmt::format("{} is not in (0, 2]", p.repetition_penalty));
  for (const auto& [id, b] : p.logit_bias) {
    if (id < 0) return err("logit_bias", fmt::format("token id {} is negative", id));
    if (!(b >= -100 && b <= 100)) return err("logit_bias", fmt::format("bias {} of token {} is not in [-100, 100]", b, id));
  }
  if (p.logprobs < -1) return err("logprobs", fmt::format("{} is less than the minimum of -1 (none)", p.logprobs));
  if (p.prompt_logprobs < -1)
    return err("prompt_logprobs", fmt::format("{} is less than the minimum of -1 (none)", p.prompt_logprobs));
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
    if (prob[i] < p.min_p) prob[i] = 0.0;  // min_p x the largest probability, which is 1 here
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

void sampler::set_prompt(std::span<const int32_t> prompt) {
  if (params_.repetition_penalty == 1) return;
  prompt_ids_.assign(prompt.begin(), prompt.end());
  std::sort(prompt_ids_.begin(), prompt_ids_.end());
  prompt_ids_.erase(std::unique(prompt_ids_.begin(), prompt_ids_.end()), prompt_ids_.end());
}

void sampler::accept(int32_t token) {
  if (params_.presence_penalty == 0 && params_.frequency_penalty == 0 && params_.repetition_penalty == 1) return;
  auto it = std::lower_bound(counts_.begin(), counts_.end(), std::make_pair(token, int32_t{0}));
  if (it != counts_.end() && it->first == token) ++it->second;
  else counts_.insert(it, {token, 1});
}

bool sampler::processes(const uint8_t* allowed, std::span<const int32_t> blocked) const {
  return allowed || !blocked.empty() || !params_.logit_bias.empty() ||
         (!counts_.empty() && (params_.presence_penalty != 0 || params_.frequency_penalty != 0)) ||
         (params_.repetition_penalty != 1 && (!counts_.empty() || !prompt_ids_.empty()));
}

int32_t sampler::sample(const float* logits, int64_t V, const uint8_t* allowed, std::span<const int32_t> blocked) {
  TROUPE_CHECK(V >= 1, errc::invalid_argument, "sampler: vocabulary size {} must be >= 1", V);
  const float* l = logits;
  if (processes(allowed, blocked)) {  // invariant 2, on a copy
    work_.assign(logits, logits + V);
    float* w = work_.data();
    for (const auto& [id, b] : params_.logit_bias)
      if (id < V) w[id] += b;
    if (allowed)
      for (int64_t i = 0; i < V; ++i)
        if (!allowed[i]) w[i] = -INFINITY;
    for (int32_t id : blocked)
      if (id >= 0 && id < V) w[id] = -INFINITY;
    if (params_.repetition_penalty != 1) {
      const auto rp = static_cast<float>(params_.repetition_penalty);
      auto penalise = [&](int32_t id) {
        if (id >= V) return;
        w[id] = w[id] > 0 ? w[id] / rp : w[id] * rp;
      };
      // Each id once, whether it is in the prompt, the output or both.
      auto c = counts_.begin();
      for (int32_t id : prompt_ids_) {
        for (; c != counts_.end() && c->first < id; ++c) penalise(c->first);
        if (c != counts_.end() && c->first == id) ++c;
        penalise(id);
      }
      for (; c != counts_.end(); ++c) penalise(c->first);
    }
    for (const auto& [id, n] : counts_)
      if (id < V)
        w[id] -= static_cast<float>(params_.frequency_penalty * n + params_.presence_penalty * (n > 0 ? 1.0 : 0.0));
    l = w;
  }
  if (params_.temperature == 0) {
    const int32_t best = parallel::argmax_token(l, V);
    TROUPE_CHECK(std::isfinite(l[best]), errc::invalid_argument,
                 "sampler: no token is left to choose (every logit is -inf or NaN after the masks)");
    return best;
  }
  const int64_t kept = filter_candidates(l, V, params_, order_, prob_);
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

token_logprob logprob_of(const float* logits, int64_t V, int32_t token, int64_t k) {
  TROUPE_CHECK(V >= 1 && token >= 0 && token < V, errc::invalid_argument,
               "logprob_of: token {} outside a vocabulary of {}", token, V);
  double m = -INFINITY;
  for (int64_t i = 0; i < V; ++i) m = std::max(m, static_cast<double>(logits[i]));
  double sum = 0;
  for (int64_t i = 0; i < V; ++i) sum += std::exp(static_cast<double>(logits[i]) - m);
  const double lse = m + std::log(sum);
  token_logprob out;
  out.id = token;
  out.logprob = static_cast<float>(static_cast<double>(logits[token]) - lse);
  if (k > 0) {
    k = std::min(k, V);
    std::vector<int32_t> ids(static_cast<size_t>(V));
    std::iota(ids.begin(), ids.end(), 0);
    std::partial_sort(ids.begin(), ids.begin() + k, ids.end(), [logits](int32_t a, int32_t b) {
      return logits[a] != logits[b] ? logits[a] > logits[b] : a < b;
    });
    for (int64_t j = 0; j < k; ++j) {
      const int32_t id = ids[static_cast<size_t>(j)];
      out.top.emplace_back(id, static_cast<float>(static_cast<double>(logits[id]) - lse));
    }
  }
  return out;
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
