// parallel/train/metrics.h — the training run's metrics file (RUN_DIR/metrics.jsonl), the
// progress/summary lines printed while training, and the SVG report (`troupe report`).
//
//   metrics_writer w("runs/x/metrics.jsonl");                 // append mode: a resumed run continues it
//   w.write({{"kind", "train"}, {"step", 10}, {"loss", 2.31}, {"mem", {{"host", 123456789}}}});
//   log::info("{}", format_progress({.step = 10, .max_steps = 400, .loss = 2.31, ...}));
//   std::vector<nlohmann::json> recs = read_metrics("runs/x/metrics.jsonl");
//   std::string svg = render_report_svg(recs, "runs/x");      // loss, memory per tier, tokens/s
//
// One JSON object per line; "kind" is "start", "train", "val" or "summary" (see the trainer).
// Memory ("mem", "mem_peak") is bytes per tier under any keys ("host", "pinned", "device", ...).
//
// Invariants:
//   1. write() puts a whole line ("<json>\n") in one append; a crash leaves complete lines and at
//      most one torn last line. Opening a file whose last line is torn drops that fragment (or,
//      if it parses, ends it with "\n") so that appended records start on a line of their own.
//   2. read_metrics() returns the records in file order; a malformed line throws errc::format
//      naming path:line, except a malformed last line without "\n" (torn), which is skipped
//      with a warning.
//   3. The reports never throw on odd data: missing keys, non-numeric or non-finite values
//      (NaN is stored as null) are skipped and, for the loss, noted in the SVG.
//   4. A resumed run re-logs steps: in the SVG and the text summary a record supersedes the
//      earlier records of the same kind at the same or later steps.
#pragma once
#include <nlohmann/json.hpp>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace troupe::parallel {

// Appends JSON lines to `path` (parent directories created). Not thread-safe: one writer
// per file (rank 0). Errors (errc::io) name the path.
class metrics_writer {
 public:
  explicit metrics_writer(std::string path);
  ~metrics_writer();
  metrics_writer(metrics_writer&& other) noexcept;
  metrics_writer& operator=(metrics_writer&& other) noexcept;
  metrics_writer(const metrics_writer&) = delete;
  metrics_writer& operator=(const metrics_writer&) = delete;

  // `record` must be a JSON object (errc::invalid_argument otherwise).
  void write(const nlohmann::json& record);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  int fd_ = -1;
};

// Reads a metrics.jsonl (errc::not_found when missing; see invariant 2).
std::vector<nlohmann::json> read_metrics(const std::string& path);

// One line per logged step:
//   "step 120/400 | loss 2.3145 | lr 3.0e-04 | 5.12k tok/s | MFU 12.3% | host 1.2 GiB pinned 0 B | ETA 1m23s"
// max_steps <= 0 prints "step 120"; MFU is left out when not positive (no peak known); memory
// tiers print host, pinned, device, cxl first, then the rest by name, and are left out when empty.
struct progress_info {
  int64_t step = 0;
  int64_t max_steps = 0;
  double loss = 0;
  double lr = 0;
  double tokens_per_s = 0;
  double mfu = 0;    // fraction of peak, 0..1
  double eta_s = 0;  // negative or NaN: unknown ("ETA ?")
  std::map<std::string, int64_t> mem;  // bytes per tier
};
std::string format_progress(const progress_info& p);

std::string format_bytes(int64_t bytes);      // "0 B", "812 B", "812 KiB", "1.2 GiB" (1024-based)
std::string format_duration(double seconds);  // "45s", "1m23s", "2h05m", "3d04h"; NaN/negative: "?"
std::string format_rate(double per_s);        // "512", "5.12k", "51.2k", "512k", "5.12M"

// The block printed at the end of training, one aligned "  label   value" line per key present
// in the "summary" record (and the "start" record, which may be null), ending with "\n".
std::string format_summary(const nlohmann::json& start, const nlohmann::json& summary);

// One paragraph for `troupe report`: steps, first/last train loss, best val loss, last tokens/s,
// peak memory per tier (max of "mem_peak", else of "mem").
std::string format_report_text(const std::vector<nlohmann::json>& records);

// The SVG report: loss (train as a line, val as a line with points) vs step, memory per tier
// (MiB) vs step, tokens/s vs step; axes with ticks and labels, a legend, the title. Each series
// is a <polyline data-series="NAME"> with one point per record that has a finite value, in step
// order. Works with no val records, one record, constant values and no records at all.
std::string render_report_svg(const std::vector<nlohmann::json>& records, const std::string& title);

}  // namespace troupe::parallel
