// bench/train_bench.cpp — one full training step of a decoder model on the CPU (forward +
// backward of the whole model via decoder::forward_backward, then AdamW over every parameter),
// reported as tokens/s and as MFU against the machine's sgemm throughput measured in the same run.
// bench/pytorch_train_bench.py times the same step in PyTorch; bench/run_train_bench.sh runs both.
//
//   build/bench/train_bench --config cfg.json --seq-len 128,256,512 --micro-batch 4 --steps 5 --threads 2
//   build/bench/train_bench --model ckpt_dir --seq-len 256
//   build/bench/train_bench --hidden 256 --layers 4 --heads 8 --kv-heads 4 --intermediate 688 --vocab 258
//
// Output: a header on stderr, and one JSON line per sequence length on stdout:
//   {"impl":"troupe","threads":2,"seq_len":256,"micro_batch":4,"step_ms":..,"step_ms_best":..,
//    "tokens_per_s":..,"params":..,"model_tflop_per_token":..,"peak_gflops":..,"mfu":..,
//    "fwd_bwd_ms":..,"adamw_ms":..,"last_loss":..}      (fwd_bwd_ms and adamw_ms: medians of the two parts)
//
// Invariants:
//   1. A step is: grads.zero_(); loss = forward_backward(ids, targets, B, T, grads); then
//      parallel::adamw::step (the trainer's optimizer; decay on ndim >= 2 only), with random
//      ids and targets in [0, V) that are new every step. The first --warmup (2) steps are not timed.
//      step_ms is the median of the timed steps, and tokens_per_s = B*T / median.
//   2. Model FLOPs per token follow PaLM (Chowdhery et al. 2022, appendix B): 6*N + 12*L*H*Q*T, with
//      N = all parameters (the input embedding included), L layers, H heads, Q head_dim and T the
//      sequence length. The attention term counts the full T x T matrix, as PaLM does, not the causal half.
//      MFU = flops_per_token * tokens_per_s / peak. peak is kernels::cpu::sgemm_peak_gflops(2048, 3):
//      the best of 3 sgemm 2048^3 (after one warm-up) on all the threads, as the kernels run them.
//   3. The thread count (--threads, else TROUPE_NUM_THREADS, else all cores) drives OpenMP (and
//      through kernels/cpu/blas.h every sgemm).
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "kernels/matmul.h"
#include "parallel/model/decoder.h"
#include "parallel/model/model_weights.h"
#include "parallel/train/optimizer.h"
#include "runtime/io/hf_config.h"
#include "runtime/threads.h"

using namespace troupe;
using clk = std::chrono::steady_clock;
using namespace troupe::bench;  // seconds_since, median, mib, loadavg

namespace {



}  // namespace

int main(int argc, char** argv) {
  std::string model_dir, config_path;
  int64_t hidden = 256, layers = 4, heads = 8, kv_heads = 4, inter = 688, vocab = 258;
  int64_t micro_batch = 4, steps = 5, warmup = 2, threads = 0;
  std::vector<int64_t> seqs = {128, 256, 512};
  CLI::App app{"troupe's CPU training step (forward + backward + AdamW), tokens/s and MFU"};
  app.add_option("--model", model_dir, "a HF checkpoint directory");
  app.add_option("--config", config_path, "a HF config.json (random weights)");
  app.add_option("--hidden", hidden);
  app.add_option("--layers", layers);
  app.add_option("--heads", heads);
  app.add_option("--kv-heads", kv_heads);
  app.add_option("--intermediate", inter);
  app.add_option("--vocab", vocab);
  app.add_option("--seq-len", seqs, "sequence lengths, comma separated")->delimiter(',');
  app.add_option("--micro-batch", micro_batch);
  app.add_option("--steps", steps, "timed steps per sequence length");
  app.add_option("--warmup", warmup, "untimed steps first");
  app.add_option("--threads", threads, "0 = TROUPE_NUM_THREADS or all cores");
  CLI11_PARSE(app, argc, argv);
  if (steps < 1 || micro_batch < 1) {
    fmt::print(stderr, "train_bench: --steps and --micro-batch must be >= 1 (got {} and {})\n", steps, micro_batch);
    return 2;
  }
  if (threads > 0) runtime::set_num_threads(static_cast<int>(threads));

  parallel::model_weights w;
  if (!model_dir.empty()) {
    w = parallel::model_weights::load(model_dir);
  } else {
    const runtime::model_config cfg =
        !config_path.empty()
            ? runtime::load_hf_config(config_path)
            : runtime::parse_hf_config(
                  fmt::format(R"({{"model_type": "llama", "vocab_size": {}, "hidden_size": {}, "intermediate_size": {},
                      "num_hidden_layers": {}, "num_attention_heads": {}, "num_key_value_heads": {},
                      "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                      "tie_word_embeddings": false}})",
                              vocab, hidden, inter, layers, heads, kv_heads),
                  "train_bench preset");
    w = parallel::model_weights::random_init(cfg, 7);
  }
  const runtime::model_config& cfg = w.config();
  parallel::model_weights g = parallel::model_weights::zeros_like(w);
  parallel::decoder dec(w);
  parallel::adamw opt(w, {0.9, 0.95, 1e-8, 0.1});
  const double n_params = static_cast<double>(w.parameter_count());

  const double peak = kernels::cpu::sgemm_peak_gflops(2048, 3);
  fmt::print(stderr, "train_bench: {} threads; sgemm 2048^3 best of 3: {:.1f} GFLOP/s (the MFU baseline)\n",
             runtime::num_threads(), peak);
  fmt::print(stderr,
             "model: {} vocab {}, hidden {}, {} layers, heads {} / kv {}, head_dim {}, intermediate {}, "
             "{} params; micro batch {}\n",
             cfg.model_type, cfg.vocab_size, cfg.hidden, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
             cfg.intermediate, w.parameter_count(), micro_batch);

  std::mt19937 rng(1);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(cfg.vocab_size - 1));
  for (int64_t T : seqs) {
    const int64_t B = micro_batch;
    std::vector<int32_t> ids(static_cast<size_t>(B * T)), targets(ids.size());
    std::vector<double> times, fwd_bwd_times, adamw_times;
    float loss = 0.0f;
    for (int64_t s = 0; s < warmup + steps; ++s) {
      for (auto& x : ids) x = tok(rng);
      for (auto& x : targets) x = tok(rng);
      auto t0 = clk::now();
      g.zero_();
      loss = dec.forward_backward(ids.data(), targets.data(), B, T, g);
      const double t_fb = seconds_since(t0);
      opt.step(w, g, 1e-4);
      const double dt = seconds_since(t0);
      if (s >= warmup) {
        times.push_back(dt);
        fwd_bwd_times.push_back(t_fb);
        adamw_times.push_back(dt - t_fb);
      }
    }
    const double med = median(times);
    const double tokens_per_s = static_cast<double>(B * T) / med;
    const double flops_per_token =
        6.0 * n_params + 12.0 * static_cast<double>(cfg.n_layers * cfg.n_heads * cfg.head_dim * T);
    const double mfu = flops_per_token * tokens_per_s / (peak * 1e9);
    fmt::print(
        "{{\"impl\":\"troupe\",\"threads\":{},\"seq_len\":{},\"micro_batch\":{},\"step_ms\":{:.3f},"
        "\"step_ms_best\":{:.3f},\"tokens_per_s\":{:.1f},\"params\":{},\"model_tflop_per_token\":{:.6g},"
        "\"peak_gflops\":{:.1f},\"mfu\":{:.4f},\"fwd_bwd_ms\":{:.3f},\"adamw_ms\":{:.3f},\"last_loss\":{:.4f}}}\n",
        runtime::num_threads(), T, B, med * 1e3, *std::min_element(times.begin(), times.end()) * 1e3, tokens_per_s,
        w.parameter_count(), flops_per_token / 1e12, peak, mfu, median(fwd_bwd_times) * 1e3,
        median(adamw_times) * 1e3, loss);
    std::fflush(stdout);
  }
  return 0;
}
