// tests/unit/dense_test_util.h — helpers for the dense CPU kernel tests: random data,
// a relative error measure, and central finite differences of double-precision references.
//
//   auto x = dense_test::randn(64, /*seed=*/1);
//   auto g = dense_test::fd_grad([&](const std::vector<double>& p) { return loss(p); }, to_double(x));
//   EXPECT_LT(dense_test::rel_err(kernel_grad, g), 1e-4);
#pragma once
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <vector>

namespace dense_test {

inline std::vector<float> randn(int64_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = dist(rng);
  return v;
}

inline std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

// max |a - b| / max |b|  (b is the reference)
template <typename A, typename B>
double rel_err(const A& a, const B& b) {
  double num = 0.0, den = 1e-30;
  for (size_t i = 0; i < b.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    den = std::max(den, std::fabs(static_cast<double>(b[i])));
  }
  return num / den;
}

// d f / d x by central differences, f evaluated in double.
inline std::vector<double> fd_grad(const std::function<double(const std::vector<double>&)>& f,
                                   std::vector<double> x, double h = 1e-6) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double fp = f(x);
    x[i] = x0 - h;
    const double fm = f(x);
    x[i] = x0;
    g[i] = (fp - fm) / (2.0 * h);
  }
  return g;
}

inline double dot(const std::vector<double>& a, const std::vector<float>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Runs fn with the OpenMP thread count set to n, then restores it.
template <typename F>
void with_threads(int n, F&& fn) {
  const int old = omp_get_max_threads();
  omp_set_num_threads(n);
  fn();
  omp_set_num_threads(old);
}

}  // namespace dense_test
