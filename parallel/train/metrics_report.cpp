// parallel/train/metrics_report.cpp — `troupe report`: the text paragraph and the SVG (three
// panels sharing the step axis: loss, memory per tier in MiB, tokens/s), built as a string.
#include "parallel/train/metrics.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <iterator>
#include <limits>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace troupe::parallel {

using json = nlohmann::json;

namespace {

// ---- reading records ------------------------------------------------------------------------

const json* field(const json& obj, const char* key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  return it == obj.end() ? nullptr : &*it;
}

// A finite number field, else false (NaN is stored as null; strings and missing keys count as absent).
bool finite_number(const json& obj, const char* key, double& out) {
  const json* f = field(obj, key);
  if (f == nullptr || !f->is_number()) return false;
  out = f->get<double>();
  return std::isfinite(out);
}

struct step_record {
  double step;
  const json* rec;
};

// The records by kind, in file order, with re-logged steps of a resumed run superseding the
// earlier ones (invariant 4).
struct run_view {
  const json* start = nullptr;
  const json* summary = nullptr;
  std::vector<step_record> train, val;
  int64_t superseded = 0;
  int64_t without_step = 0;
};

run_view view_of(const std::vector<json>& records) {
  run_view v;
  for (const json& r : records) {
    const json* k = field(r, "kind");
    if (k == nullptr || !k->is_string()) continue;
    const std::string& kind = k->get_ref<const std::string&>();
    if (kind == "start") v.start = &r;
    if (kind == "summary") v.summary = &r;
    if (kind != "train" && kind != "val") continue;
    double step = 0;
    if (!finite_number(r, "step", step)) {
      ++v.without_step;
      continue;
    }
    auto& list = kind == "train" ? v.train : v.val;
    while (!list.empty() && list.back().step >= step) {
      list.pop_back();
      ++v.superseded;
    }
    list.push_back({step, &r});
  }
  return v;
}

int tier_rank(const std::string& tier) {
  static const char* const order[] = {"host", "pinned", "device", "cxl"};
  for (int i = 0; i < 4; ++i)
    if (tier == order[i]) return i;
  return 4;
}

// Tier names over all train records' "mem" and "mem_peak", host/pinned/device/cxl first.
std::vector<std::string> memory_tiers(const run_view& v) {
  std::set<std::string> names;
  for (const auto& t : v.train)
    for (const char* key : {"mem", "mem_peak"})
      if (const json* m = field(*t.rec, key); m != nullptr && m->is_object())
        for (auto it = m->begin(); it != m->end(); ++it) names.insert(it.key());
  std::vector<std::string> out(names.begin(), names.end());
  std::stable_sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return tier_rank(a) < tier_rank(b); });
  return out;
}

double tier_value(const json& rec, const char* key, const std::string& tier) {
  const json* m = field(rec, key);
  double v = 0;
  if (m != nullptr && m->is_object() && finite_number(*m, tier.c_str(), v)) return v;
  return std::nan("");
}

// Max over "mem_peak" and "mem" of one tier (NaN when the tier never has a value).
double tier_peak(const run_view& v, const std::string& tier) {
  double peak = std::nan("");
  for (const auto& t : v.train)
    for (const char* key : {"mem_peak", "mem"}) {
      const double b = tier_value(*t.rec, key, tier);
      if (std::isfinite(b) && !(b <= peak)) peak = b;
    }
  return peak;
}

std::string xml_escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20 && c != '\t') out += ' ';  // not allowed in XML 1.0
        else out += c;
    }
  }
  return out;
}

// ---- axes -----------------------------------------------------------------------------------

struct axis {
  double lo, hi, step;
};

// Heckbert's "nice numbers": 1, 2, 5 x 10^k.
double nice_num(double x, bool round) {
  const double e = std::floor(std::log10(x));
  const double f = x / std::pow(10.0, e);
  double nf;
  if (round) nf = f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10;
  else nf = f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10;
  return nf * std::pow(10.0, e);
}

axis nice_axis(double lo, double hi, bool integer, bool from_zero) {
  if (from_zero && lo >= 0) lo = 0;
  if (!(hi > lo)) {  // one point or constant values
    const double pad = std::max(integer ? 1.0 : 0.0, lo == 0 ? 1.0 : std::abs(lo) * 0.05);
    const bool non_negative = lo >= 0;
    lo -= pad;
    hi += pad;
    if (non_negative && lo < 0) lo = 0;
  }
  double step = nice_num(nice_num(hi - lo, false) / 5.0, true);
  if (integer) step = std::max(step, 1.0);
  if (!(step > 0) || !std::isfinite(step)) return {lo, hi, hi - lo};
  return {std::floor(lo / step) * step, std::ceil(hi / step) * step, step};
}

std::string tick_label(double v, double step) {
  if (std::abs(v) < step * 1e-9) v = 0;
  if (std::abs(v) >= 1e4 && step >= 1) {
    static const std::pair<double, const char*> units[] = {{1e12, "T"}, {1e9, "G"}, {1e6, "M"}, {1e3, "k"}};
    for (const auto& [scale, suffix] : units)
      if (std::abs(v) >= scale) return fmt::format("{:g}{}", v / scale, suffix);
  }
  const int decimals = step >= 1 ? 0 : std::min(6, static_cast<int>(std::ceil(-std::log10(step) - 1e-9)));
  return fmt::format("{:.{}f}", v, decimals);
}

// ---- drawing --------------------------------------------------------------------------------

struct series {
  std::string name;
  std::string legend;
  const char* color;
  std::vector<std::pair<double, double>> pts;  // (step, value), steps increasing
  bool markers = false;
};

struct panel {
  std::string title;
  std::string y_label;
  bool y_from_zero = false;
  std::vector<series> lines;
  std::string legend_note;  // grey line under the legend ("no val records")
};

constexpr const char* palette[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                                   "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};
constexpr double width = 960, plot_x0 = 90, plot_x1 = 760, legend_x = 780;
constexpr double panel_pitch = 260, plot_top = 30, plot_height = 180;

void draw_panel(std::string& out, const panel& p, double top, const axis& xa) {
  auto o = std::back_inserter(out);
  const double y0 = top + plot_top, y1 = y0 + plot_height;
  fmt::format_to(o, "<g class=\"panel\">\n");
  fmt::format_to(o, "<text x=\"{}\" y=\"{:.1f}\" font-size=\"14\" font-weight=\"bold\">{}</text>\n", plot_x0, top + 18,
                 xml_escape(p.title));
  fmt::format_to(o, "<rect x=\"{}\" y=\"{:.1f}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#444\"/>\n", plot_x0,
                 y0, plot_x1 - plot_x0, plot_height);

  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  for (const auto& s : p.lines)
    for (const auto& [x, y] : s.pts) {
      lo = std::min(lo, y);
      hi = std::max(hi, y);
    }
  const bool has_data = lo <= hi;
  auto px = [&](double x) { return plot_x0 + (x - xa.lo) / (xa.hi - xa.lo) * (plot_x1 - plot_x0); };

  // x ticks (shared step axis)
  for (int i = 0; i <= 50; ++i) {
    const double x = xa.lo + i * xa.step;
    if (x > xa.hi + xa.step * 1e-6) break;
    fmt::format_to(o, "<line x1=\"{0:.2f}\" y1=\"{1:.1f}\" x2=\"{0:.2f}\" y2=\"{2:.1f}\" stroke=\"#444\"/>\n", px(x),
                   y1, y1 + 4);
    fmt::format_to(o, "<text x=\"{:.2f}\" y=\"{:.1f}\" font-size=\"11\" text-anchor=\"middle\">{}</text>\n", px(x),
                   y1 + 16, tick_label(x, xa.step));
  }
  fmt::format_to(o, "<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"12\" text-anchor=\"middle\">step</text>\n",
                 (plot_x0 + plot_x1) / 2, y1 + 32);
  fmt::format_to(o,
                 "<text x=\"{0:.1f}\" y=\"{1:.1f}\" font-size=\"12\" text-anchor=\"middle\" "
                 "transform=\"rotate(-90 {0:.1f} {1:.1f})\">{2}</text>\n",
                 plot_x0 - 62, (y0 + y1) / 2, xml_escape(p.y_label));

  if (!has_data) {
    fmt::format_to(o, "<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"13\" fill=\"#888\" text-anchor=\"middle\">"
                      "no data</text>\n", (plot_x0 + plot_x1) / 2, (y0 + y1) / 2);
  } else {
    const axis ya = nice_axis(lo, hi, false, p.y_from_zero);
    auto py = [&](double y) { return y1 - (y - ya.lo) / (ya.hi - ya.lo) * plot_height; };
    for (int i = 0; i <= 50; ++i) {
      const double y = ya.lo + i * ya.step;
      if (y > ya.hi + ya.step * 1e-6) break;
      fmt::format_to(o, "<line x1=\"{0}\" y1=\"{1:.2f}\" x2=\"{2}\" y2=\"{1:.2f}\" stroke=\"#e4e4e4\"/>\n", plot_x0,
                     py(y), plot_x1);
      fmt::format_to(o, "<line x1=\"{0}\" y1=\"{1:.2f}\" x2=\"{2}\" y2=\"{1:.2f}\" stroke=\"#444\"/>\n", plot_x0 - 4,
                     py(y), plot_x0);
      fmt::format_to(o, "<text x=\"{}\" y=\"{:.2f}\" font-size=\"11\" text-anchor=\"end\">{}</text>\n", plot_x0 - 7,
                     py(y) + 4, tick_label(y, ya.step));
    }
    for (const auto& s : p.lines) {
      if (s.pts.empty()) continue;
      fmt::format_to(o, "<polyline data-series=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"",
                     xml_escape(s.name), s.color);
      for (size_t i = 0; i < s.pts.size(); ++i)
        fmt::format_to(o, "{}{:.2f},{:.2f}", i ? " " : "", px(s.pts[i].first), py(s.pts[i].second));
      fmt::format_to(o, "\"/>\n");
      if (s.markers || s.pts.size() == 1)
        for (const auto& [x, y] : s.pts)
          fmt::format_to(o, "<circle cx=\"{:.2f}\" cy=\"{:.2f}\" r=\"3\" fill=\"{}\"/>\n", px(x), py(y), s.color);
    }
  }

  // legend
  double ly = y0 + 10;
  for (const auto& s : p.lines) {
    fmt::format_to(o, "<line x1=\"{}\" y1=\"{:.1f}\" x2=\"{}\" y2=\"{:.1f}\" stroke=\"{}\" stroke-width=\"2\"/>\n",
                   legend_x, ly, legend_x + 18, ly, s.color);
    if (s.markers)
      fmt::format_to(o, "<circle cx=\"{}\" cy=\"{:.1f}\" r=\"3\" fill=\"{}\"/>\n", legend_x + 9, ly, s.color);
    fmt::format_to(o, "<text x=\"{}\" y=\"{:.1f}\" font-size=\"12\">{}</text>\n", legend_x + 24, ly + 4,
                   xml_escape(s.legend));
    ly += 18;
  }
  if (!p.legend_note.empty())
    fmt::format_to(o, "<text x=\"{}\" y=\"{:.1f}\" font-size=\"11\" fill=\"#888\">{}</text>\n", legend_x, ly + 4,
                   xml_escape(p.legend_note));
  fmt::format_to(o, "</g>\n");
}

// Points (step, value) of one field over records; counts the records without a finite value.
series series_of(const std::vector<step_record>& recs, const char* key, std::string name, const char* color,
                 int64_t* missing = nullptr, double* first_missing_step = nullptr) {
  series s{name, name, color, {}, false};
  for (const auto& r : recs) {
    double v = 0;
    if (finite_number(*r.rec, key, v)) {
      s.pts.emplace_back(r.step, v);
    } else if (missing != nullptr) {
      if ((*missing)++ == 0 && first_missing_step != nullptr) *first_missing_step = r.step;
    }
  }
  return s;
}

std::string run_line(const run_view& v) {
  std::vector<std::string> parts;
  double x = 0, dp = 0, cp = 0;
  if (v.start != nullptr) {
    if (const json* t = field(*v.start, "time"); t != nullptr && t->is_string())
      parts.push_back("started " + t->get<std::string>());
    if (finite_number(*v.start, "world_size", x)) {
      std::string r = fmt::format("{} ranks", std::llround(x));
      if (finite_number(*v.start, "dp", dp) && finite_number(*v.start, "cp", cp))
        r += fmt::format(" (dp {}, cp {})", std::llround(dp), std::llround(cp));
      parts.push_back(r);
    }
    if (finite_number(*v.start, "params", x)) parts.push_back(format_rate(x) + " params");
    if (finite_number(*v.start, "seq_len", x)) parts.push_back(fmt::format("seq_len {}", std::llround(x)));
    if (finite_number(*v.start, "global_batch_tokens", x))
      parts.push_back(fmt::format("{} tokens/step", std::llround(x)));
  }
  if (v.summary != nullptr && finite_number(*v.summary, "steps", x)) {
    double el = 0;
    parts.push_back(finite_number(*v.summary, "elapsed_s", el)
                        ? fmt::format("finished {} steps in {}", std::llround(x), format_duration(el))
                        : fmt::format("finished {} steps", std::llround(x)));
  }
  std::string s;
  for (const auto& p : parts) s += (s.empty() ? "" : "  |  ") + p;
  return s;
}

}  // namespace

std::string format_report_text(const std::vector<json>& records) {
  const run_view v = view_of(records);
  std::vector<std::string> parts;
  if (v.train.empty()) {
    parts.push_back("no train records");
  } else {
    parts.push_back(fmt::format("{} train records (steps {}..{})", v.train.size(), std::llround(v.train.front().step),
                                std::llround(v.train.back().step)));
    const series loss = series_of(v.train, "loss", "loss", palette[0]);
    if (loss.pts.empty()) parts.push_back("no finite train loss");
    else
      parts.push_back(fmt::format("train loss {:.4f} at step {} -> {:.4f} at step {}", loss.pts.front().second,
                                  std::llround(loss.pts.front().first), loss.pts.back().second,
                                  std::llround(loss.pts.back().first)));
  }
  const series val = series_of(v.val, "val_loss", "val", palette[1]);
  if (val.pts.empty()) {
    parts.push_back("no val loss");
  } else {
    auto best = std::min_element(val.pts.begin(), val.pts.end(),
                                 [](const auto& a, const auto& b) { return a.second < b.second; });
    parts.push_back(fmt::format("best val loss {:.4f} at step {}", best->second, std::llround(best->first)));
  }
  double x = 0;
  if (!v.train.empty() && finite_number(*v.train.back().rec, "tokens_per_s", x)) {
    std::string t = format_rate(x) + " tok/s";
    if (finite_number(*v.train.back().rec, "mfu", x) && x > 0) t += fmt::format(", MFU {:.1f}%", x * 100);
    parts.push_back(t + " at the last step");
  }
  std::string mem;
  for (const auto& tier : memory_tiers(v)) {
    const double peak = tier_peak(v, tier);
    if (std::isfinite(peak))
      mem += fmt::format("{}{} {}", mem.empty() ? "" : ", ", tier, format_bytes(static_cast<int64_t>(peak)));
  }
  if (!mem.empty()) parts.push_back("peak memory " + mem);
  if (v.summary != nullptr && finite_number(*v.summary, "steps", x)) {
    double el = 0;
    parts.push_back(finite_number(*v.summary, "elapsed_s", el)
                        ? fmt::format("finished {} steps in {}", std::llround(x), format_duration(el))
                        : fmt::format("finished {} steps", std::llround(x)));
  }
  std::string s;
  for (const auto& p : parts) s += (s.empty() ? "" : "; ") + p;
  return s + ".";
}

std::string render_report_svg(const std::vector<json>& records, const std::string& title) {
  const run_view v = view_of(records);
  std::vector<std::string> notes;

  // Panel 1: loss.
  panel loss{"Loss", "loss", false, {}, {}};
  int64_t bad_train = 0, bad_val = 0;
  double bad_train_step = 0, bad_val_step = 0;
  loss.lines.push_back(series_of(v.train, "loss", "train loss", palette[0], &bad_train, &bad_train_step));
  if (!v.val.empty()) {
    series val = series_of(v.val, "val_loss", "val loss", palette[1], &bad_val, &bad_val_step);
    val.markers = true;
    loss.lines.push_back(std::move(val));
  } else {
    loss.legend_note = "(no val records)";
  }
  if (bad_train > 0)
    notes.push_back(fmt::format("note: {} train record(s) without a finite loss (NaN/inf/missing) are not drawn; "
                                "first at step {}", bad_train, std::llround(bad_train_step)));
  if (bad_val > 0)
    notes.push_back(fmt::format("note: {} val record(s) without a finite val_loss are not drawn; first at step {}",
                                bad_val, std::llround(bad_val_step)));
  if (v.superseded > 0)
    notes.push_back(
        fmt::format("note: {} record(s) re-logged by a resumed run: the later ones are drawn", v.superseded));
  if (v.without_step > 0) notes.push_back(fmt::format("note: {} record(s) without a step are ignored", v.without_step));

  // Panel 2: memory per tier (MiB).
  panel mem{"Memory per tier", "MiB", true, {}, {}};
  const std::vector<std::string> tiers = memory_tiers(v);
  for (size_t i = 0; i < tiers.size(); ++i) {
    series s{tiers[i], tiers[i], palette[i % std::size(palette)], {}, false};
    for (const auto& r : v.train) {
      const double b = tier_value(*r.rec, "mem", tiers[i]);
      if (std::isfinite(b)) s.pts.emplace_back(r.step, b / (1024.0 * 1024.0));
    }
    const double peak = tier_peak(v, tiers[i]);
    if (std::isfinite(peak)) s.legend += " (peak " + format_bytes(static_cast<int64_t>(peak)) + ")";
    mem.lines.push_back(std::move(s));
  }
  if (tiers.empty()) mem.legend_note = "(no mem records)";

  // Panel 3: throughput.
  panel tput{"Throughput", "tokens/s", true, {}, {}};
  tput.lines.push_back(series_of(v.train, "tokens_per_s", "tokens/s", palette[2]));

  // Shared step axis over every drawn record.
  double xlo = std::numeric_limits<double>::infinity(), xhi = -xlo;
  for (const auto* list : {&v.train, &v.val})
    for (const auto& r : *list) {
      xlo = std::min(xlo, r.step);
      xhi = std::max(xhi, r.step);
    }
  if (!(xlo <= xhi)) xlo = xhi = 0;
  const axis xa = nice_axis(xlo, xhi, true, false);

  const std::string subtitle = run_line(v);
  const double header = 62 + 16.0 * static_cast<double>(notes.size());
  const double height = header + 3 * panel_pitch;
  std::string out;
  auto o = std::back_inserter(out);
  fmt::format_to(o,
                 "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
                 "font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n",
                 width, height);
  fmt::format_to(o, "<rect x=\"0\" y=\"0\" width=\"{}\" height=\"{}\" fill=\"white\"/>\n", width, height);
  fmt::format_to(o, "<text x=\"{}\" y=\"26\" font-size=\"18\" font-weight=\"bold\">{}</text>\n", plot_x0 - 70,
                 xml_escape(title));
  fmt::format_to(o, "<text x=\"{}\" y=\"46\" font-size=\"12\" fill=\"#444\">{}</text>\n", plot_x0 - 70,
                 xml_escape(subtitle.empty() ? fmt::format("{} records", records.size()) : subtitle));
  for (size_t i = 0; i < notes.size(); ++i)
    fmt::format_to(o, "<text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"#b00\">{}</text>\n", plot_x0 - 70,
                   64 + 16 * i, xml_escape(notes[i]));
  double top = header;
  for (const panel* p : {&loss, &mem, &tput}) {
    draw_panel(out, *p, top, xa);
    top += panel_pitch;
  }
  out += "</svg>\n";
  return out;
}

}  // namespace troupe::parallel
