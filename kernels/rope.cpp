// kernels/rope.cpp — RoPE frequency tables for every HF rope_scaling variant
// (backend-independent; the rotation itself is in kernels/cpu and kernels/cuda).
#include "kernels/rope.h"

#include <algorithm>
#include <cmath>

#include "runtime/error.h"

namespace troupe::kernels {

namespace {
using runtime::errc;

double yarn_get_mscale(double scale, double mscale = 1.0) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(scale) + 1.0;
}

double yarn_correction_dim(double num_rotations, double dim, double base, double max_pos) {
  return (dim * std::log(max_pos / (num_rotations * 2.0 * M_PI))) / (2.0 * std::log(base));
}
}  // namespace

rope_params rope_compute_params(const rope_config& cfg, int64_t seq_len) {
  TROUPE_CHECK(cfg.head_dim > 0 && cfg.theta > 0, errc::invalid_argument, "rope: head_dim {} and theta {} must be > 0",
               cfg.head_dim, cfg.theta);
  rope_params p;
  p.rotary_dim = static_cast<int64_t>(static_cast<double>(cfg.head_dim) * cfg.partial_rotary_factor);
  TROUPE_CHECK(p.rotary_dim > 0 && p.rotary_dim % 2 == 0 && p.rotary_dim <= cfg.head_dim, errc::invalid_argument,
               "rope: rotary dim {} (head_dim {} x partial_rotary_factor {}) must be even and in (0, head_dim]",
               p.rotary_dim, cfg.head_dim, cfg.partial_rotary_factor);
  const int64_t dim = p.rotary_dim;
  const int64_t half = dim / 2;
  double base = cfg.theta;
  if (cfg.type != rope_type::standard)
    TROUPE_CHECK(cfg.factor > 0, errc::invalid_argument, "rope_scaling.factor {} must be > 0", cfg.factor);

  if (cfg.type == rope_type::dynamic) {
    const double max_pos = static_cast<double>(cfg.max_position_embeddings);
    const double s = std::max(static_cast<double>(seq_len), max_pos);
    base = base * std::pow((cfg.factor * s / max_pos) - (cfg.factor - 1.0),
                           static_cast<double>(dim) / static_cast<double>(dim - 2));
  }
  // HF computes base ** (arange(0, dim, 2) / dim) in float32.
  std::vector<float> pos_freqs(half);
  for (int64_t i = 0; i < half; ++i) {
    float expo = static_cast<float>(2 * i) / static_cast<float>(dim);
    pos_freqs[i] = std::pow(static_cast<float>(base), expo);
  }
  p.inv_freq.resize(half);
  for (int64_t i = 0; i < half; ++i) p.inv_freq[i] = 1.0f / pos_freqs[i];

  switch (cfg.type) {
    case rope_type::standard:
    case rope_type::dynamic:
      break;
    case rope_type::linear:
      for (auto& f : p.inv_freq) f = f / static_cast<float>(cfg.factor);
      break;
    case rope_type::llama3: {
      const double old_ctx = static_cast<double>(
          cfg.original_max_position_embeddings > 0 ? cfg.original_max_position_embeddings : cfg.max_position_embeddings);
      TROUPE_CHECK(cfg.high_freq_factor != cfg.low_freq_factor, errc::invalid_argument,
                   "rope_scaling: llama3 needs high_freq_factor != low_freq_factor");
      const double low_wavelen = old_ctx / cfg.low_freq_factor;
      const double high_wavelen = old_ctx / cfg.high_freq_factor;
      for (auto& f : p.inv_freq) {
        const float inv = f;
        const double wavelen = 2.0 * M_PI / static_cast<double>(inv);
        float scaled = wavelen > low_wavelen ? inv / static_cast<float>(cfg.factor) : inv;
        const bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
        if (medium) {
          const float smooth = static_cast<float>((old_ctx / wavelen - cfg.low_freq_factor) /
                                                  (cfg.high_freq_factor - cfg.low_freq_factor));
          scaled = (1.0f - smooth) * scaled / static_cast<float>(cfg.factor) + smooth * scaled;
        }
        f = scaled;
      }
      break;
    }
    case rope_type::yarn: {
      const double factor = cfg.factor;
      const double orig = static_cast<double>(
          cfg.original_max_position_embeddings > 0 ? cfg.original_max_position_embeddings : cfg.max_position_embeddings);
      if (cfg.attention_factor > 0) {
        p.attention_scaling = static_cast<float>(cfg.attention_factor);
      } else if (cfg.mscale > 0 && cfg.mscale_all_dim > 0) {
        p.attention_scaling =
            static_cast<float>(yarn_get_mscale(factor, cfg.mscale) / yarn_get_mscale(factor, cfg.mscale_all_dim));
      } else {
        p.attention_scaling = static_cast<float>(yarn_get_mscale(factor));
      }
      double low = std::floor(yarn_correction_dim(cfg.beta_fast, static_cast<double>(dim), base, orig));
      double high = std::ceil(yarn_correction_dim(cfg.beta_slow, static_cast<double>(dim), base, orig));
      low = std::max(low, 0.0);
      high = std::min(high, static_cast<double>(dim - 1));
      if (low == high) high += 0.001;
      for (int64_t i = 0; i < half; ++i) {
        float ramp = static_cast<float>((static_cast<double>(i) - low) / (high - low));
        ramp = std::clamp(ramp, 0.0f, 1.0f);
        const float extrap_factor = 1.0f - ramp;
        const float inv_extrap = 1.0f / pos_freqs[i];
        const float inv_interp = 1.0f / (static_cast<float>(factor) * pos_freqs[i]);
        p.inv_freq[i] = inv_interp * (1.0f - extrap_factor) + inv_extrap * extrap_factor;
      }
      break;
    }
  }
  return p;
}

void rope_build_table(float* cos, float* sin, const int64_t* positions, int64_t T, const rope_params& p) {
  const int64_t half = static_cast<int64_t>(p.inv_freq.size());
  for (int64_t t = 0; t < T; ++t) {
    const float pos = static_cast<float>(positions[t]);
    for (int64_t i = 0; i < half; ++i) {
      const float f = pos * p.inv_freq[i];
      cos[t * half + i] = std::cos(f) * p.attention_scaling;
      sin[t * half + i] = std::sin(f) * p.attention_scaling;
    }
  }
}

}  // namespace troupe::kernels
