// bench/layer_bench.cpp — forward + backward of one Llama decoder layer on the CPU at
// several sequence lengths, reported as achieved GFLOP/s and as a fraction of the
// machine's sgemm throughput measured in the same run (the CPU "MFU").
//
//   build/bench/layer_bench                       # hidden 512, T = 256..2048
//   build/bench/layer_bench --hidden 1024 --seq 512,1024 --reps 3
//
// FLOPs are model FLOPs (training = 3 x forward; recomputation inside attention's
// backward is not counted), with causal attention counted as 4*HD*NH*T(T+1)/2 per
// sequence. The baseline is kernels::cpu::sgemm_peak_gflops(2048, 3): the best of 3 sgemm 2048^3.
#include <cblas.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/rope.h"
#include "kernels/matmul.h"
#include "parallel/model/decoder_layer.h"
#include "parallel/model/model_weights.h"
#include "runtime/io/hf_config.h"
#include "runtime/threads.h"

using namespace troupe;
using clk = std::chrono::steady_clock;

namespace {

double seconds_since(clk::time_point t0) { return std::chrono::duration<double>(clk::now() - t0).count(); }


std::vector<int64_t> parse_list(const std::string& s) {
  std::vector<int64_t> out;
  size_t p = 0;
  while (p < s.size()) {
    size_t q = s.find(',', p);
    out.push_back(std::stoll(s.substr(p, q - p)));
    if (q == std::string::npos) break;
    p = q + 1;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t hidden = 512, heads = 8, kv_heads = 2, reps = 3, batch = 1;
  std::vector<int64_t> seqs = {256, 512, 1024, 2048};
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string k = argv[i], v = argv[i + 1];
    if (k == "--hidden") hidden = std::stoll(v);
    else if (k == "--heads") heads = std::stoll(v);
    else if (k == "--kv-heads") kv_heads = std::stoll(v);
    else if (k == "--reps") reps = std::stoll(v);
    else if (k == "--batch") batch = std::stoll(v);
    else if (k == "--seq") seqs = parse_list(v);
    else {
      fmt::print(stderr, "layer_bench: unknown option {} (known: --hidden --heads --kv-heads --seq --batch --reps)\n", k);
      return 2;
    }
  }
  const int64_t inter = hidden * 3;
  const std::string cfg_json = fmt::format(
      R"({{"model_type": "llama", "vocab_size": 256, "hidden_size": {}, "intermediate_size": {},
          "num_hidden_layers": 1, "num_attention_heads": {}, "num_key_value_heads": {},
          "max_position_embeddings": 65536, "rms_norm_eps": 1e-5, "rope_theta": 500000.0}})",
      hidden, inter, heads, kv_heads);
  const runtime::model_config cfg = runtime::parse_hf_config(cfg_json, "layer_bench config");
  parallel::model_weights w = parallel::model_weights::random_init(cfg, 7);
  parallel::model_weights g = parallel::model_weights::zeros_like(w);

  const double peak = kernels::cpu::sgemm_peak_gflops(2048, 3);  // as the kernels run sgemm
  fmt::print("machine: {} threads; sgemm 2048^3 best of 3: {:.1f} GFLOP/s (the baseline)\n", runtime::num_threads(),
             peak);
  fmt::print("layer: hidden {}, heads {} / kv {}, head_dim {}, intermediate {}, batch {}\n", hidden, heads, kv_heads,
             cfg.head_dim, inter, batch);
  fmt::print("{:>6} {:>12} {:>12} {:>12} {:>10} {:>8}\n", "T", "fwd ms", "bwd ms", "fwd+bwd ms", "GFLOP/s", "MFU");

  for (int64_t T : seqs) {
    const int64_t N = batch * T, C = hidden, HD = cfg.head_dim;
    runtime::rope_config rc = cfg.rope;
    rc.head_dim = HD;
    const kernels::rope_params rp = kernels::rope_compute_params(rc, T);
    std::vector<int64_t> pos(static_cast<size_t>(T));
    std::iota(pos.begin(), pos.end(), 0);
    std::vector<float> cos(static_cast<size_t>(T * rp.rotary_dim / 2)), sin(cos.size());
    kernels::rope_build_table(cos.data(), sin.data(), pos.data(), T, rp);
    const parallel::attention_geom geom = parallel::attention_geom::of(cfg, batch, T, rp.rotary_dim);

    std::vector<float> x0(static_cast<size_t>(N * C));
    std::mt19937 rng(static_cast<unsigned>(T));
    std::normal_distribution<float> nd(0, 1);
    for (auto& v : x0) v = nd(rng);

    double best_f = 1e30, best_b = 1e30;
    for (int64_t r = 0; r < reps + 1; ++r) {
      std::vector<float> x = x0;
      parallel::layer_activations a;
      auto t0 = clk::now();
      parallel::layer_forward(x.data(), a, w.layers[0], cfg, geom, cos.data(), sin.data(), nullptr, 0);
      double tf = seconds_since(t0);
      std::vector<float> dx(x.size(), 1e-3f);
      t0 = clk::now();
      parallel::layer_backward(dx.data(), g.layers[0], a, w.layers[0], cfg, geom, cos.data(), sin.data());
      double tb = seconds_since(t0);
      if (r > 0) {  // first rep warms up
        best_f = std::min(best_f, tf);
        best_b = std::min(best_b, tb);
      }
    }
    const double QD = static_cast<double>(heads * HD), KVD = static_cast<double>(kv_heads * HD);
    const double matmul = 2.0 * N * C * (QD + 2 * KVD + QD) + 2.0 * N * 3.0 * C * inter;
    const double attn = 4.0 * HD * heads * batch * (static_cast<double>(T) * (T + 1) / 2.0);
    const double flops = 3.0 * (matmul + attn);
    const double gflops = flops / (best_f + best_b) / 1e9;
    fmt::print("{:>6} {:>12.2f} {:>12.2f} {:>12.2f} {:>10.1f} {:>7.1f}%\n", T, best_f * 1e3, best_b * 1e3,
               (best_f + best_b) * 1e3, gflops, 100.0 * gflops / peak);
  }
  return 0;
}
