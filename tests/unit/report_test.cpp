// Training metrics: metrics.jsonl writer/reader (append, torn last line), the progress and
// summary strings, the SVG report (well-formed, one point per record, monotone where the data is)
// and `troupe report` through the registered CLI.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "launch/commands.h"
#include "parallel/train/metrics.h"
#include "runtime/error.h"
#include "tests/unit/tmp_dir.h"

namespace fs = std::filesystem;
using namespace troupe::parallel;
using json = nlohmann::json;
using troupe::runtime::errc;
using troupe::runtime::error;

namespace {

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << text;
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

template <typename F>
error expect_error(F&& f, errc code) {
  try {
    f();
  } catch (const error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    return e;
  }
  ADD_FAILURE() << "no error thrown";
  return error(errc::internal, "none");
}

// The records a short run writes: start, `n` train steps (step 10, 20, ...) with a strictly
// decreasing loss and growing host memory, a val record every `val_every` train records, summary.
std::vector<json> sample_run(int n, int val_every) {
  std::vector<json> r;
  r.push_back({{"kind", "start"}, {"time", "2026-11-28T02:00:00Z"}, {"world_size", 2}, {"dp", 1}, {"cp", 2},
               {"params", 1234567}, {"seq_len", 256}, {"global_batch_tokens", 4096}, {"peak_gflops", 85.3},
               {"spec", "model:\n  preset: tiny\n"}});
  for (int i = 1; i <= n; ++i) {
    const int64_t host = 100'000'000 + int64_t{i} * 3'000'000;
    r.push_back({{"kind", "train"}, {"step", 10 * i}, {"loss", 4.0 / (1.0 + 0.1 * i)}, {"lr", 3e-4},
                 {"grad_norm", 1.2}, {"tokens", 4096 * 10 * i}, {"tokens_per_s", 5000.0 + 10 * i}, {"mfu", 0.12},
                 {"step_ms", 812.5}, {"elapsed_s", 0.8 * i},
                 {"mem", {{"host", host}, {"pinned", 0}}},
                 {"mem_peak", {{"host", host + 1'000'000}, {"pinned", 0}}}});
    if (val_every > 0 && i % val_every == 0)
      r.push_back({{"kind", "val"}, {"step", 10 * i}, {"val_loss", 3.0 / (1.0 + 0.05 * i)}, {"val_tokens", 8192}});
  }
  r.push_back({{"kind", "summary"}, {"steps", 10 * n}, {"final_loss", 1.5}, {"final_val_loss", 1.6},
               {"best_val_loss", 1.55}, {"tokens", 409600}, {"elapsed_s", 80.2}, {"tokens_per_s", 5100.0},
               {"mfu", 0.11}, {"checkpoint", "runs/x/checkpoints/step-00000100"}});
  return r;
}

// Tag balance: every <x ...> has its </x>, in order; self-closing tags and <!-- --> are fine;
// every '&' starts a known entity. Returns "" when well formed, else what went wrong.
std::string check_tags(const std::string& s) {
  std::vector<std::string> stack;
  size_t i = 0;
  while ((i = s.find_first_of("<&", i)) != std::string::npos) {
    if (s[i] == '&') {
      bool ok = false;
      for (const char* ent : {"&amp;", "&lt;", "&gt;", "&quot;", "&apos;"})
        ok = ok || s.compare(i, std::strlen(ent), ent) == 0;
      if (!ok) return fmt::format("bare & at {}", i);
      ++i;
      continue;
    }
    if (s.compare(i, 4, "<!--") == 0) {
      const size_t e = s.find("-->", i);
      if (e == std::string::npos) return "unclosed comment";
      i = e + 3;
      continue;
    }
    const size_t e = s.find('>', i);
    if (e == std::string::npos) return fmt::format("unclosed tag at {}", i);
    const std::string tag = s.substr(i + 1, e - i - 1);
    if (tag.find('<') != std::string::npos) return fmt::format("'<' inside tag at {}", i);
    if (tag.empty()) return "empty tag";
    if (tag[0] == '/') {
      const std::string name = tag.substr(1);
      if (stack.empty() || stack.back() != name)
        return fmt::format("</{}> closes {}", name, stack.empty() ? "nothing" : "<" + stack.back() + ">");
      stack.pop_back();
    } else if (tag.back() != '/') {
      stack.push_back(tag.substr(0, tag.find_first_of(" \t\n")));
    }
    i = e + 1;
  }
  if (!stack.empty()) return fmt::format("<{}> never closed", stack.back());
  return "";
}

struct point {
  double x, y;
};

// The points of the <polyline data-series="NAME">; fails the test if there is not exactly one.
std::vector<point> polyline(const std::string& svg, const std::string& name) {
  const std::regex re("<polyline data-series=\"" + name + "\"[^>]*points=\"([^\"]*)\"");
  std::vector<point> pts;
  int found = 0;
  for (auto it = std::sregex_iterator(svg.begin(), svg.end(), re); it != std::sregex_iterator(); ++it) {
    ++found;
    std::istringstream in((*it)[1].str());
    std::string pair;
    while (in >> pair) {
      const size_t comma = pair.find(',');
      pts.push_back({std::stod(pair.substr(0, comma)), std::stod(pair.substr(comma + 1))});
    }
  }
  EXPECT_EQ(found, 1) << "polyline " << name;
  return pts;
}

size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t i = s.find(what); i != std::string::npos; i = s.find(what, i + 1)) ++n;
  return n;
}

}  // namespace

// ---- formatting -----------------------------------------------------------------------------

TEST(MetricsFormat, Bytes) {
  EXPECT_EQ(format_bytes(0), "0 B");
  EXPECT_EQ(format_bytes(812), "812 B");
  EXPECT_EQ(format_bytes(1023), "1023 B");
  EXPECT_EQ(format_bytes(1024), "1.0 KiB");
  EXPECT_EQ(format_bytes(812 * 1024), "812 KiB");
  EXPECT_EQ(format_bytes(10 * 1024), "10 KiB");
  EXPECT_EQ(format_bytes(10199), "10 KiB");             // 9.96 KiB rounds up, no "10.0"
  EXPECT_EQ(format_bytes(1024 * 1024 - 1), "1.0 MiB");  // never "1024 KiB"
  EXPECT_EQ(format_bytes(1288490189), "1.2 GiB");
  EXPECT_EQ(format_bytes(int64_t{3} << 40), "3.0 TiB");
  EXPECT_EQ(format_bytes(-2048), "-2.0 KiB");
}

TEST(MetricsFormat, Duration) {
  EXPECT_EQ(format_duration(0), "0s");
  EXPECT_EQ(format_duration(45), "45s");
  EXPECT_EQ(format_duration(59.6), "1m00s");
  EXPECT_EQ(format_duration(83), "1m23s");
  EXPECT_EQ(format_duration(7500), "2h05m");
  EXPECT_EQ(format_duration(3 * 86400 + 4 * 3600 + 59), "3d04h");
  EXPECT_EQ(format_duration(std::nan("")), "?");
  EXPECT_EQ(format_duration(-1), "?");
  EXPECT_EQ(format_duration(std::numeric_limits<double>::infinity()), "?");
}

TEST(MetricsFormat, Rate) {
  EXPECT_EQ(format_rate(512.3), "512");
  EXPECT_EQ(format_rate(5123.4), "5.12k");
  EXPECT_EQ(format_rate(51234), "51.2k");
  EXPECT_EQ(format_rate(512340), "512k");
  EXPECT_EQ(format_rate(999.6), "1.00k");
  EXPECT_EQ(format_rate(5.12e6), "5.12M");
  EXPECT_EQ(format_rate(1234567), "1.23M");
}

TEST(MetricsFormat, Progress) {
  progress_info p;
  p.step = 120;
  p.max_steps = 400;
  p.loss = 2.31451;
  p.lr = 3e-4;
  p.tokens_per_s = 5123.4;
  p.mfu = 0.123;
  p.eta_s = 83;
  p.mem = {{"pinned", 0}, {"host", 1288490189}};
  EXPECT_EQ(format_progress(p),
            "step 120/400 | loss 2.3145 | lr 3.0e-04 | 5.12k tok/s | MFU 12.3% | host 1.2 GiB pinned 0 B | ETA 1m23s");

  // No step limit, no MFU (unknown peak), tiers in host/pinned/device/cxl order then by name, ETA unknown.
  progress_info q;
  q.step = 5;
  q.loss = 9;
  q.lr = 1e-3;
  q.tokens_per_s = 12;
  q.eta_s = -1;
  q.mem = {{"zz", 5}, {"cxl", 0}, {"device", 2048}, {"host", 1024}};
  EXPECT_EQ(format_progress(q),
            "step 5 | loss 9.0000 | lr 1.0e-03 | 12 tok/s | host 1.0 KiB device 2.0 KiB cxl 0 B zz 5 B | ETA ?");

  q.mem.clear();
  q.loss = std::nan("");
  EXPECT_EQ(format_progress(q), "step 5 | loss nan | lr 1.0e-03 | 12 tok/s | ETA ?");
}

TEST(MetricsFormat, Summary) {
  const auto run = sample_run(10, 5);
  EXPECT_EQ(format_summary(run.front(), run.back()),
            "run summary\n"
            "  steps           100\n"
            "  tokens          409,600\n"
            "  elapsed         1m20s\n"
            "  throughput      5.10k tok/s\n"
            "  MFU             11.0%\n"
            "  final loss      1.5000\n"
            "  final val loss  1.6000\n"
            "  best val loss   1.5500\n"
            "  model           1.23M params, seq_len 256, 4,096 tokens/step\n"
            "  ranks           2 (dp 1 x cp 2)\n"
            "  checkpoint      runs/x/checkpoints/step-00000100\n");
  // Without a start record and with missing keys: only what is there, aligned to the longest label.
  EXPECT_EQ(format_summary(json(), json{{"kind", "summary"}, {"steps", 3}, {"final_loss", nullptr}}),
            "run summary\n"
            "  steps       3\n"
            "  final loss  nan\n");
}

TEST(MetricsFormat, ReportText) {
  const auto run = sample_run(10, 5);
  // loss 4/(1+0.1i): 4/1.1 = 3.6364 at step 10, 4/2 = 2.0 at step 100; val 3/(1+0.05i): best 3/1.5 = 2.0 at
  // step 100; peak host = max mem_peak = 100e6 + 30e6 + 1e6 bytes = 124.9 MiB.
  EXPECT_EQ(format_report_text(run),
            "10 train records (steps 10..100); train loss 3.6364 at step 10 -> 2.0000 at step 100; "
            "best val loss 2.0000 at step 100; 5.10k tok/s, MFU 12.0% at the last step; "
            "peak memory host 125 MiB, pinned 0 B; finished 100 steps in 1m20s.");
  EXPECT_EQ(format_report_text({}), "no train records; no val loss.");
}

// ---- metrics.jsonl --------------------------------------------------------------------------

TEST(MetricsFile, WriterReaderRoundTrip) {
  tmp_dir d;
  const std::string path = d.file("run/sub/metrics.jsonl");  // parent dirs are created
  const auto run = sample_run(4, 2);
  {
    metrics_writer w(path);
    EXPECT_EQ(w.path(), path);
    for (const auto& r : run) w.write(r);
  }
  const auto back = read_metrics(path);
  ASSERT_EQ(back.size(), run.size());
  for (size_t i = 0; i < run.size(); ++i) EXPECT_EQ(back[i], run[i]) << "record " << i;
  EXPECT_EQ(back[0]["spec"], "model:\n  preset: tiny\n");  // a newline inside a string stays one line
  EXPECT_EQ(count(read_text(path), "\n"), run.size());

  // Append mode: a second writer (a resumed run) continues the file; NaN is stored as null.
  {
    metrics_writer w(path);
    w.write({{"kind", "train"}, {"step", 50}, {"loss", std::nan("")}});
  }
  const auto more = read_metrics(path);
  ASSERT_EQ(more.size(), run.size() + 1);
  EXPECT_TRUE(more.back()["loss"].is_null());
  EXPECT_EQ(more.back()["step"], 50);

  metrics_writer w(path);
  expect_error([&] { w.write(json::array({1, 2})); }, errc::invalid_argument);
  metrics_writer moved = std::move(w);
  moved.write({{"kind", "val"}, {"step", 50}, {"val_loss", 1.0}});
  EXPECT_EQ(read_metrics(path).size(), run.size() + 2);
}

TEST(MetricsFile, MalformedMiddleLineNamesFileAndLine) {
  tmp_dir d;
  const std::string path = d.file("metrics.jsonl");
  write_text(path, "{\"kind\":\"train\",\"step\":1}\n{\"kind\":\"train\",\"st\n{\"kind\":\"train\",\"step\":3}\n");
  const error e = expect_error([&] { read_metrics(path); }, errc::format);
  EXPECT_NE(std::string(e.what()).find(path + ":2:"), std::string::npos) << e.what();

  write_text(path, "{\"kind\":\"start\"}\n\n[1,2]\n{\"kind\":\"train\",\"step\":3}\n");
  const error e2 = expect_error([&] { read_metrics(path); }, errc::format);
  EXPECT_NE(std::string(e2.what()).find(path + ":3: expected a JSON object, got array"), std::string::npos)
      << e2.what();

  // A malformed last line that did end with "\n" was written whole: an error, not a torn line.
  write_text(path, "{\"kind\":\"train\",\"step\":1}\n{oops}\n");
  const error e3 = expect_error([&] { read_metrics(path); }, errc::format);
  EXPECT_NE(std::string(e3.what()).find(path + ":2:"), std::string::npos) << e3.what();

  expect_error([&] { read_metrics(d.file("missing.jsonl")); }, errc::not_found);
}

TEST(MetricsFile, TruncatedLastLineIsSkipped) {
  tmp_dir d;
  const std::string path = d.file("metrics.jsonl");
  write_text(path, "{\"kind\":\"train\",\"step\":1}\r\n\n{\"kind\":\"train\",\"step\":2}\n{\"kind\":\"train\",\"st");
  const auto recs = read_metrics(path);
  ASSERT_EQ(recs.size(), 2u);
  EXPECT_EQ(recs[0]["step"], 1);
  EXPECT_EQ(recs[1]["step"], 2);

  // A complete last line without "\n" is kept.
  write_text(path, "{\"kind\":\"train\",\"step\":1}\n{\"kind\":\"train\",\"step\":2}");
  EXPECT_EQ(read_metrics(path).size(), 2u);
}

TEST(MetricsFile, WriterRepairsTornTail) {
  tmp_dir d;
  const std::string path = d.file("metrics.jsonl");
  // Torn fragment: dropped, so the appended record gets a line of its own.
  write_text(path, "{\"kind\":\"train\",\"step\":1}\n{\"kind\":\"train\",\"st");
  {
    metrics_writer w(path);
    w.write({{"kind", "train"}, {"step", 2}});
  }
  auto recs = read_metrics(path);
  ASSERT_EQ(recs.size(), 2u);
  EXPECT_EQ(recs[1]["step"], 2);
  EXPECT_EQ(read_text(path), "{\"kind\":\"train\",\"step\":1}\n{\"kind\":\"train\",\"step\":2}\n");

  // A whole record missing only its "\n": kept and ended.
  write_text(path, "{\"kind\":\"train\",\"step\":1}");
  {
    metrics_writer w(path);
    w.write({{"kind", "train"}, {"step", 2}});
  }
  EXPECT_EQ(read_text(path), "{\"kind\":\"train\",\"step\":1}\n{\"kind\":\"train\",\"step\":2}\n");

  // A torn first (only) line: the file ends up holding just the new record.
  write_text(path, "{\"kind\":");
  {
    metrics_writer w(path);
    w.write({{"kind", "start"}});
  }
  EXPECT_EQ(read_text(path), "{\"kind\":\"start\"}\n");
}

// ---- SVG ------------------------------------------------------------------------------------

TEST(MetricsSvg, TagCheckerRejectsBrokenXml) {  // the checker the SVG tests rely on
  EXPECT_EQ(check_tags("<svg a=\"1\"><g><line/></g><text>a &amp; b</text></svg>"), "");
  EXPECT_NE(check_tags("<svg><g></svg>"), "");
  EXPECT_NE(check_tags("<svg><g>"), "");
  EXPECT_NE(check_tags("<svg><text>a & b</text></svg>"), "");
  EXPECT_NE(check_tags("<svg><text>a <b</text></svg>"), "");
}

TEST(MetricsSvg, SeriesPointsAndMonotoneY) {
  const int n = 20;
  const auto run = sample_run(n, 5);
  const std::string svg = render_report_svg(run, "runs/<tiny> & co");
  ASSERT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_EQ(svg.substr(svg.size() - 7), "</svg>\n");
  EXPECT_EQ(check_tags(svg), "");
  EXPECT_NE(svg.find("runs/&lt;tiny&gt; &amp; co"), std::string::npos);
  EXPECT_EQ(svg.find("nan"), std::string::npos);
  EXPECT_EQ(svg.find("inf"), std::string::npos);

  const auto loss = polyline(svg, "train loss");
  const auto val = polyline(svg, "val loss");
  const auto host = polyline(svg, "host");
  const auto pinned = polyline(svg, "pinned");
  const auto tput = polyline(svg, "tokens/s");
  ASSERT_EQ(loss.size(), size_t{n});
  ASSERT_EQ(val.size(), size_t{n / 5});
  ASSERT_EQ(host.size(), size_t{n});
  ASSERT_EQ(pinned.size(), size_t{n});
  ASSERT_EQ(tput.size(), size_t{n});
  EXPECT_EQ(count(svg, "<polyline"), 5u);
  for (size_t i = 1; i < loss.size(); ++i) {
    EXPECT_GT(loss[i].x, loss[i - 1].x) << i;     // step increases
    EXPECT_GT(loss[i].y, loss[i - 1].y) << i;     // loss decreases: SVG y grows downwards
    EXPECT_LT(host[i].y, host[i - 1].y) << i;     // host memory grows
    EXPECT_LT(tput[i].y, tput[i - 1].y) << i;     // tokens/s grows
    EXPECT_EQ(pinned[i].y, pinned[0].y) << i;     // constant
    EXPECT_EQ(host[i].x, loss[i].x) << i;         // panels share the step axis
  }
  for (size_t i = 1; i < val.size(); ++i) EXPECT_GT(val[i].y, val[i - 1].y) << i;
  // Val points sit at the x of the train record with the same step (every 5th).
  for (size_t i = 0; i < val.size(); ++i) EXPECT_EQ(val[i].x, loss[5 * i + 4].x) << i;
  // Every point inside the plot area (x from 90 to 760).
  for (const auto* s : {&loss, &val, &host, &pinned, &tput})
    for (const auto& p : *s) {
      EXPECT_GE(p.x, 90.0);
      EXPECT_LE(p.x, 760.0);
    }
  // Legend carries the peak per tier; subtitle the run shape.
  EXPECT_NE(svg.find("host (peak 154 MiB)"), std::string::npos);  // 100e6 + 60e6 + 1e6 bytes = 153.5 MiB
  EXPECT_NE(svg.find("2 ranks (dp 1, cp 2)"), std::string::npos);
  EXPECT_EQ(svg.find("(no val records)"), std::string::npos);
}

TEST(MetricsSvg, NoValRecordsOneRecordAndEmpty) {
  const auto run = sample_run(6, 0);
  const std::string svg = render_report_svg(run, "no-val");
  EXPECT_EQ(check_tags(svg), "");
  EXPECT_EQ(count(svg, "data-series=\"val loss\""), 0u);
  EXPECT_NE(svg.find("(no val records)"), std::string::npos);
  EXPECT_EQ(polyline(svg, "train loss").size(), 6u);

  // One train record: a one-point polyline plus a marker; nothing degenerate in the output.
  const std::vector<json> one = {{{"kind", "train"}, {"step", 7}, {"loss", 2.5}, {"tokens_per_s", 100.0},
                                  {"mem", {{"host", 1 << 20}}}}};
  const std::string svg1 = render_report_svg(one, "one");
  EXPECT_EQ(check_tags(svg1), "");
  EXPECT_EQ(polyline(svg1, "train loss").size(), 1u);
  EXPECT_EQ(polyline(svg1, "host").size(), 1u);
  EXPECT_GE(count(svg1, "<circle"), 3u);
  EXPECT_EQ(svg1.find("nan"), std::string::npos);
  EXPECT_EQ(svg1.find("inf"), std::string::npos);

  // No records at all: still a well-formed SVG, each panel saying so.
  const std::string svg0 = render_report_svg({}, "empty");
  EXPECT_EQ(check_tags(svg0), "");
  EXPECT_EQ(count(svg0, "no data"), 3u);
  EXPECT_EQ(count(svg0, "<polyline"), 0u);
}

TEST(MetricsSvg, ConstantAndNonFiniteLoss) {
  std::vector<json> recs;
  for (int i = 1; i <= 8; ++i) {
    json r = {{"kind", "train"}, {"step", i}, {"loss", 3.0}, {"tokens_per_s", 10.0}, {"mem", {{"cxl", 0}}}};
    if (i == 3 || i == 6) r["loss"] = nullptr;  // NaN/inf as the writer stores them
    recs.push_back(r);
  }
  recs.push_back({{"kind", "train"}, {"step", 9}, {"loss", "oops"}});
  const std::string svg = render_report_svg(recs, "flat");
  EXPECT_EQ(check_tags(svg), "");
  const auto loss = polyline(svg, "train loss");
  ASSERT_EQ(loss.size(), 6u);
  for (const auto& p : loss) EXPECT_EQ(p.y, loss[0].y);
  EXPECT_NE(svg.find("note: 3 train record(s) without a finite loss (NaN/inf/missing) are not drawn; first at step 3"),
            std::string::npos);
  EXPECT_EQ(svg.find("nan"), std::string::npos);
  const auto cxl = polyline(svg, "cxl");  // constant zero memory: drawn on the bottom edge
  ASSERT_EQ(cxl.size(), 8u);
  EXPECT_EQ(cxl[0].y, cxl[7].y);
}

TEST(MetricsSvg, ResumedRunSupersedesRelogged) {
  std::vector<json> recs;
  for (int s : {1, 2, 3, 4, 5, 3, 4, 5, 6})  // crashed after 5, resumed from a step-2 checkpoint
    recs.push_back({{"kind", "train"}, {"step", s}, {"loss", 10.0 - s + (recs.size() > 4 ? 0.5 : 0.0)}});
  const std::string svg = render_report_svg(recs, "resumed");
  EXPECT_EQ(check_tags(svg), "");
  const auto loss = polyline(svg, "train loss");
  ASSERT_EQ(loss.size(), 6u);
  for (size_t i = 1; i < loss.size(); ++i) EXPECT_GT(loss[i].x, loss[i - 1].x);
  EXPECT_NE(svg.find("note: 3 record(s) re-logged by a resumed run"), std::string::npos);
}

// ---- troupe report --------------------------------------------------------------------------

TEST(ReportCommand, WritesSvgThroughCli) {
  tmp_dir d;
  const std::string run_dir = d.file("run");
  {
    metrics_writer w(run_dir + "/metrics.jsonl");
    for (const auto& r : sample_run(12, 4)) w.write(r);
  }
  {
    CLI::App app;
    troupe::launch::register_commands(app);
    const char* argv[] = {"troupe", "report", run_dir.c_str()};
    app.parse(3, argv);
  }
  const std::string svg = read_text(run_dir + "/report.svg");
  ASSERT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_EQ(check_tags(svg), "");
  EXPECT_EQ(polyline(svg, "train loss").size(), 12u);
  EXPECT_FALSE(fs::exists(run_dir + "/report.svg.tmp"));

  const std::string out = d.file("elsewhere/r.svg");
  {
    CLI::App app;
    troupe::launch::register_commands(app);
    const char* argv[] = {"troupe", "report", run_dir.c_str(), "-o", out.c_str()};
    app.parse(5, argv);
  }
  EXPECT_EQ(read_text(out), svg);

  auto run_cli = [](const std::string& dir) {
    CLI::App app;
    troupe::launch::register_commands(app);
    const char* argv[] = {"troupe", "report", dir.c_str()};
    app.parse(3, argv);
  };
  const error e1 = expect_error([&] { run_cli(d.file("nope")); }, errc::not_found);
  EXPECT_NE(std::string(e1.what()).find(d.file("nope") + ": no such run directory"), std::string::npos);
  fs::create_directories(d.file("empty_run"));
  const error e2 = expect_error([&] { run_cli(d.file("empty_run")); }, errc::not_found);
  EXPECT_NE(std::string(e2.what()).find("no metrics.jsonl"), std::string::npos);
}
