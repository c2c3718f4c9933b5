// bench/timeline_svg.h — a serving run over time as one SVG: output tokens per second, each
// request's TTFT at its arrival and TPOT at its first token, failed requests, and marked moments
// (a scale event, a restart). bench/loadgen --timeline writes it.
//
//   std::vector<timeline_request> rs = ...;          // seconds since the run's start
//   std::ofstream("run.svg") << timeline_svg(rs, {{12.5, "scale 1 -> 2"}}, "elastic", 1.0);
//
// Invariants:
//   1. Throughput counts each request's tokens at its chunk times (evenly over them), or evenly
//      between its first token and its end when it has none, in buckets of bucket_s seconds.
//   2. A failed request is a red cross at its arrival on the TTFT panel, whatever it got.
//   3. The x axis is shared by the panels: 0 to the last end or mark; numbers are printed as measured.
#pragma once
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace troupe::bench {

struct timeline_request {
  double arrival = 0, first = -1, finish = -1;
  int64_t tokens = 0;
  std::vector<double> chunks;  // when text arrived
  bool failed = false;
};

struct timeline_mark {
  double t = 0;
  std::string label;
};

inline std::string svg_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '&') out += "&amp;";
    else out += c;
  }
  return out;
}

inline std::string timeline_svg(const std::vector<timeline_request>& rs, const std::vector<timeline_mark>& marks,
                                const std::string& title, double bucket_s = 1.0) {
  double T = 1;
  for (const auto& r : rs) T = std::max({T, r.finish, r.arrival});
  for (const auto& m : marks) T = std::max(T, m.t);
  const int nb = std::max(1, static_cast<int>(std::ceil(T / bucket_s)));
  std::vector<double> tps(static_cast<size_t>(nb), 0.0);
  auto add = [&](double t, double n) {
    const int b = std::clamp(static_cast<int>(t / bucket_s), 0, nb - 1);
    tps[static_cast<size_t>(b)] += n / bucket_s;
  };
  double ttft_max = 0.001, tpot_max = 0.001;
  int failed = 0;
  for (const auto& r : rs) {
    if (r.failed) ++failed;
    if (r.tokens > 0 && !r.chunks.empty()) {
      for (double t : r.chunks) add(t, static_cast<double>(r.tokens) / static_cast<double>(r.chunks.size()));
    } else if (r.tokens > 0 && r.first >= 0 && r.finish >= r.first) {
      for (int64_t k = 0; k < r.tokens; ++k)
        add(r.first + (r.finish - r.first) * (static_cast<double>(k) + 0.5) / static_cast<double>(r.tokens), 1.0);
    }
    if (!r.failed && r.first >= 0) ttft_max = std::max(ttft_max, r.first - r.arrival);
    if (!r.failed && r.tokens >= 2 && r.first >= 0)
      tpot_max = std::max(tpot_max, (r.finish - r.first) / static_cast<double>(r.tokens - 1));
  }
  double tps_max = 1;
  for (double v : tps) tps_max = std::max(tps_max, v);
  const double W = 960, left = 70, right = 20, ph = 150, gap = 40, top = 50;
  const double pw = W - left - right;
  const double H = top + 3 * ph + 2 * gap + 50;
  auto X = [&](double t) { return left + pw * t / T; };
  std::string s = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\" font-family=\"sans-serif\" "
      "font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{:.0f}\" y=\"22\" font-size=\"15\">{} — {} requests, {} failed</text>\n",
      W, H, left, svg_escape(title), rs.size(), failed);
  const char* names[3] = {"output tokens / s", "TTFT (s), by arrival", "TPOT (ms), by first token"};
  const double maxes[3] = {tps_max * 1.1, ttft_max * 1.1, tpot_max * 1000 * 1.1};
  for (int p = 0; p < 3; ++p) {
    const double y0 = top + p * (ph + gap);
    s += fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"none\" stroke=\"#888\"/>\n",
                     left, y0, pw, ph);
    s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\">{}</text>\n", left + 4, y0 - 6, names[p]);
    for (int k = 0; k <= 2; ++k) {
      const double v = maxes[p] * k / 2, y = y0 + ph - ph * k / 2;
      s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"end\">{:.3g}</text>\n", left - 6, y + 4, v);
    }
  }
  const int xt = 10;
  for (int k = 0; k <= xt; ++k) {
    const double t = T * k / xt, x = X(t), y = top + 3 * ph + 2 * gap;
    s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{:.3g}</text>\n", x, y + 16, t);
  }
  s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">seconds</text>\n", left + pw / 2,
                   top + 3 * ph + 2 * gap + 34);
  // Panel 1: throughput.
  std::string pts;
  for (int b = 0; b < nb; ++b)
    pts += fmt::format("{:.1f},{:.1f} ", X((b + 0.5) * bucket_s), top + ph - ph * tps[static_cast<size_t>(b)] / maxes[0]);
  s += fmt::format("<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{}\"/>\n", pts);
  // Panels 2 and 3: per request.
  const double y2 = top + ph + gap, y3 = top + 2 * (ph + gap);
  for (const auto& r : rs) {
    if (r.failed) {
      const double x = X(r.arrival), y = y2 + 6;
      s += fmt::format("<path d=\"M{:.1f},{:.1f}l8,8m0,-8l-8,8\" stroke=\"#d62728\" stroke-width=\"2\"/>\n", x - 4,
                       y - 4);
      continue;
    }
    if (r.first >= 0)
      s += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"2\" fill=\"#2ca02c\"/>\n", X(r.arrival),
                       y2 + ph - ph * (r.first - r.arrival) / maxes[1]);
    if (r.tokens >= 2 && r.first >= 0)
      s += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"2\" fill=\"#9467bd\"/>\n", X(r.first),
                       y3 + ph - ph * 1000 * (r.finish - r.first) / static_cast<double>(r.tokens - 1) / maxes[2]);
  }
  for (const auto& m : marks) {
    const double x = X(m.t);
    s += fmt::format("<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#ff7f0e\" "
                     "stroke-dasharray=\"4,3\"/>\n<text x=\"{:.1f}\" y=\"{:.1f}\" fill=\"#ff7f0e\">{}</text>\n",
                     x, top, x, top + 3 * ph + 2 * gap, x + 3, top + 12, svg_escape(m.label));
  }
  return s + "</svg>\n";
}

}  // namespace troupe::bench
