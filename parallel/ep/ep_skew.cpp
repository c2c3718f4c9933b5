// parallel/ep/ep_skew.cpp — see ep_skew.h.
#include "parallel/ep/ep_skew.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>

#include <fmt/format.h>

#include "runtime/error.h"

namespace troupe::parallel::ep {

using runtime::errc;

namespace {

std::string case_name(double f, int64_t h) {
  if (h == 0 && f == 0) return "balanced";
  return fmt::format("{:g}%-{}", f * 100.0, h);
}

// Uniform in [0, n), unbiased (rejection of the top partial block), n >= 1.
uint64_t below(std::mt19937_64& g, uint64_t n) {
  const uint64_t limit = UINT64_MAX - UINT64_MAX % n;
  uint64_t v = g();
  while (v >= limit) v = g();
  return v % n;
}

// Uniform in [0, 1) with 53 random bits.
double unit(std::mt19937_64& g) { return static_cast<double>(g() >> 11) * 0x1.0p-53; }

// k distinct members of `pool` (Floyd's algorithm: exactly k draws), shuffled, appended to out.
void pick_distinct(std::mt19937_64& g, const std::vector<int>& pool, int64_t k, int32_t* out) {
  const int64_t n = static_cast<int64_t>(pool.size());
  int64_t got = 0;
  for (int64_t j = n - k; j < n; ++j) {
    const int64_t t = static_cast<int64_t>(below(g, static_cast<uint64_t>(j + 1)));
    const int32_t cand = pool[static_cast<size_t>(t)];
    const bool seen = std::find(out, out + got, cand) != out + got;
    out[got++] = seen ? pool[static_cast<size_t>(j)] : cand;
  }
  for (int64_t i = k - 1; i > 0; --i) std::swap(out[i], out[below(g, static_cast<uint64_t>(i + 1))]);
}

void check_case(const skew_case& c, int64_t K, int64_t E, const char* who) {
  TROUPE_CHECK(E >= 1 && K >= 1 && K <= E, errc::invalid_argument, "{}: need 1 <= top-k {} <= experts {}", who, K, E);
  TROUPE_CHECK(c.hot_fraction >= 0 && c.hot_fraction <= 1, errc::invalid_argument,
               "{} '{}': hot fraction {} is outside [0, 1]", who, c.name, c.hot_fraction);
  TROUPE_CHECK(c.hot_experts >= 0 && c.hot_experts <= E, errc::invalid_argument,
               "{} '{}': {} hot experts is outside [0, {}]", who, c.name, c.hot_experts, E);
  TROUPE_CHECK(c.hot_fraction == 0 || c.hot_experts > 0, errc::invalid_argument,
               "{} '{}': a hot fraction {} needs at least one hot expert", who, c.name, c.hot_fraction);
  const int64_t h = c.hot_experts, cold = E - h;
  if (c.hot_fraction > 0)
    TROUPE_CHECK(K - std::min(K, h) <= cold, errc::invalid_argument,
                 "{} '{}': a hot token needs {} cold experts but only {} of {} are cold", who, c.name,
                 K - std::min(K, h), cold, E);
  if (c.hot_fraction < 1)
    TROUPE_CHECK(K <= cold, errc::invalid_argument,
                 "{} '{}': a cold token needs top-k {} cold experts but only {} of {} are cold; use fewer hot experts",
                 who, c.name, K, cold, E);
}

}  // namespace

skew_case skew_case_from(const std::string& name) {
  if (name == "balanced") return {"balanced", 0.0, 0};
  const size_t pct = name.find('%');
  bool ok = pct != std::string::npos && pct > 0 && pct + 2 < name.size() && name[pct + 1] == '-';
  double f = 0;
  int64_t h = 0;
  if (ok) {
    const std::string a = name.substr(0, pct), b = name.substr(pct + 2);
    char* end = nullptr;
    f = std::strtod(a.c_str(), &end) / 100.0;
    ok = end == a.c_str() + a.size() && std::isfinite(f);
    h = std::strtoll(b.c_str(), &end, 10);
    ok = ok && end == b.c_str() + b.size() && b.find_first_not_of("0123456789") == std::string::npos;
  }
  TROUPE_CHECK(ok, errc::invalid_argument,
               "skew case '{}': expected 'balanced' or '<percent>%-<hot experts>', e.g. '30%-16' or '95%-1'", name);
  TROUPE_CHECK(f >= 0 && f <= 1 && h >= 0 && (f == 0 || h > 0), errc::invalid_argument,
               "skew case '{}': percent must be in [0, 100] and a positive percent needs hot experts > 0", name);
  return {case_name(f, h), f, h};
}

std::vector<skew_case> skew_cases_standard() {
  std::vector<skew_case> out;
  for (const char* n : {"balanced", "30%-16", "50%-4", "80%-4", "95%-1"}) out.push_back(skew_case_from(n));
  return out;
}

std::vector<int> skew_hot_set(const skew_case& c, int64_t experts, const skew_options& o) {
  TROUPE_CHECK(c.hot_experts >= 0 && c.hot_experts <= experts, errc::invalid_argument,
               "skew case '{}': {} hot experts is outside [0, {}]", c.name, c.hot_experts, experts);
  std::vector<int> hot;
  if (o.placement == skew_hot_placement::first) {
    for (int64_t j = 0; j < c.hot_experts; ++j) hot.push_back(static_cast<int>(j));
    return hot;
  }
  TROUPE_CHECK(o.ranks >= 1 && experts % o.ranks == 0, errc::invalid_argument,
               "skew case '{}': spread placement needs the {} experts to divide over {} ranks", c.name, experts,
               o.ranks);
  const int64_t per = experts / o.ranks;
  for (int64_t j = 0; j < c.hot_experts; ++j) hot.push_back(static_cast<int>((j % o.ranks) * per + j / o.ranks));
  std::sort(hot.begin(), hot.end());
  return hot;
}

std::vector<int32_t> skew_routing(const skew_case& c, int64_t N, int64_t K, int64_t experts, const skew_options& o) {
  check_case(c, K, experts, "skew routing");
  TROUPE_CHECK(N >= 0, errc::invalid_argument, "skew routing: negative token count {}", N);
  const std::vector<int> hot = skew_hot_set(c, experts, o);
  std::vector<char> is_hot(static_cast<size_t>(experts), 0);
  for (int e : hot) is_hot[static_cast<size_t>(e)] = 1;
  std::vector<int> cold;
  for (int64_t e = 0; e < experts; ++e)
    if (!is_hot[static_cast<size_t>(e)]) cold.push_back(static_cast<int>(e));
  const int64_t kh = std::min<int64_t>(K, c.hot_experts);
  std::mt19937_64 g(o.seed);
  std::vector<int32_t> topk(static_cast<size_t>(N * K));
  for (int64_t n = 0; n < N; ++n) {
    int32_t* row = topk.data() + n * K;
    // f = 1 needs no draw; f = 0 draws and never matches (unit < 0 is false), keeping one stream shape.
    const bool token_hot = c.hot_fraction >= 1 || unit(g) < c.hot_fraction;
    if (token_hot) {
      pick_distinct(g, hot, kh, row);
      if (K > kh) pick_distinct(g, cold, K - kh, row + kh);
    } else {
      pick_distinct(g, cold, K, row);
    }
  }
  return topk;
}

std::vector<int64_t> loads_from_routing(const int32_t* topk, int64_t N, int64_t K, int64_t experts) {
  std::vector<int64_t> loads(static_cast<size_t>(experts), 0);
  for (int64_t i = 0; i < N * K; ++i) {
    const int32_t e = topk[i];
    TROUPE_CHECK(e >= 0 && e < experts, errc::out_of_range, "routing: token {} slot {} names expert {} outside [0, {})",
                 i / K, i % K, e, experts);
    ++loads[static_cast<size_t>(e)];
  }
  return loads;
}

std::vector<double> skew_expected_loads(const skew_case& c, int64_t N, int64_t K, int64_t experts,
                                        const skew_options& o) {
  check_case(c, K, experts, "skew expected loads");
  const int64_t h = c.hot_experts, kh = std::min(K, h);
  const double f = c.hot_fraction, n = static_cast<double>(N);
  const double hot_load = h > 0 ? n * f * static_cast<double>(kh) / static_cast<double>(h) : 0.0;
  const double cold_load =
      experts > h ? n * (f * static_cast<double>(K - kh) + (1 - f) * static_cast<double>(K)) /
                        static_cast<double>(experts - h)
                  : 0.0;
  std::vector<double> out(static_cast<size_t>(experts), cold_load);
  for (int e : skew_hot_set(c, experts, o)) out[static_cast<size_t>(e)] = hot_load;
  return out;
}

}  // namespace troupe::parallel::ep
