// `troupe report RUN_DIR [-o FILE]`: reads RUN_DIR/metrics.jsonl, writes the SVG report (loss,
// memory per tier, tokens/s vs step) to RUN_DIR/report.svg or FILE, prints its path and a
// one-paragraph summary of the run.
#include <fmt/format.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "launch/commands.h"
#include "parallel/train/metrics.h"
#include "runtime/error.h"

namespace troupe::launch {

namespace {

struct report_args {
  std::string run_dir;
  std::string output;
};

void run_report(const report_args& a) {
  namespace fs = std::filesystem;
  using runtime::errc;
  std::error_code ec;
  TROUPE_CHECK(fs::exists(a.run_dir, ec), errc::not_found, "{}: no such run directory", a.run_dir);
  TROUPE_CHECK(fs::is_directory(a.run_dir, ec), errc::invalid_argument,
               "{}: not a directory (give the run directory that holds metrics.jsonl)", a.run_dir);
  const std::string metrics = (fs::path(a.run_dir) / "metrics.jsonl").string();
  TROUPE_CHECK(fs::is_regular_file(metrics, ec), errc::not_found,
               "{}: no metrics.jsonl in this directory (the trainer writes it into its run directory)", a.run_dir);
  const auto records = parallel::read_metrics(metrics);
  TROUPE_CHECK(!records.empty(), errc::format, "{}: no records (the file is empty)", metrics);

  const std::string out = a.output.empty() ? (fs::path(a.run_dir) / "report.svg").string() : a.output;
  const std::string svg = parallel::render_report_svg(records, a.run_dir);
  if (const fs::path parent = fs::path(out).parent_path(); !parent.empty()) {
    fs::create_directories(parent, ec);
    TROUPE_CHECK(!ec, errc::io, "{}: cannot create directory {}: {}", out, parent.string(), ec.message());
  }
  // Written next to the target and renamed, so a reader never sees half a file.
  const std::string tmp = out + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    TROUPE_CHECK(f.good(), errc::io, "{}: cannot open for writing: {}", tmp, std::strerror(errno));
    f << svg;
    f.flush();
    TROUPE_CHECK(f.good(), errc::io, "{}: write failed: {}", tmp, std::strerror(errno));
  }
  fs::rename(tmp, out, ec);
  TROUPE_CHECK(!ec, errc::io, "{}: cannot rename to {}: {}", tmp, out, ec.message());
  fmt::print("wrote {}\n{}\n", out, parallel::format_report_text(records));
}

}  // namespace

void register_report(CLI::App& app) {
  auto args = std::make_shared<report_args>();
  auto* cmd = app.add_subcommand("report", "Plot a training run's metrics (loss, memory per tier, tokens/s) as SVG");
  cmd->add_option("RUN_DIR", args->run_dir, "Run directory holding metrics.jsonl")->required();
  cmd->add_option("-o,--output", args->output, "Output SVG file (default RUN_DIR/report.svg)");
  cmd->callback([args] { run_report(*args); });
}

}  // namespace troupe::launch
