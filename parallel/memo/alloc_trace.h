// parallel/memo/alloc_trace.h — an allocation trace on a logical clock: the input of the
// MEMO memory planner (planner.h) and of the caching-allocator replay (caching_allocator_sim.h).
//
//   alloc_trace t;
//   int64_t x = t.alloc(4096, "layer.in");     // tick 0
//   int64_t y = t.alloc(8192, "attn.scores");  // tick 1
//   t.free(y);                                 // tick 2
//   t.close();                                 // frees x (tick 3)
//   plan p = plan_mip(t.events(), {});         // p.offset[i] is events()[i]'s byte offset
//   t.max_live_bytes();                        // 12288: no plan can peak below this
//
// Invariants:
//   1. Every alloc and every free is one tick of the clock; events()[i].id == i and
//      alloc_time is strictly increasing with i.
//   2. A tensor occupies its bytes in [alloc_time, free_time): one freed at tick t and one
//      allocated at a later tick may share bytes. free_time == alloc_event::live while it is
//      still allocated; close() frees all of them at one tick, after which alloc/free throw.
//   3. Sizes are positive; freeing an unknown or already freed id, or a bad size, throws
//      errc::invalid_argument naming the id/name, and leaves the trace as it was.
//   4. from_json(to_json()) reproduces the trace exactly; a malformed document throws
//      errc::format naming the event and the key.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace troupe::parallel::memo {

struct alloc_event {
  static constexpr int64_t live = -1;  // free_time of a tensor that is still allocated
  int64_t id = 0;
  int64_t size = 0;        // bytes, > 0
  int64_t alloc_time = 0;  // live in [alloc_time, free_time)
  int64_t free_time = live;
  std::string name;
};

// True when a and b are live at a common tick (both must be freed).
inline bool lifetimes_overlap(const alloc_event& a, const alloc_event& b) {
  return a.alloc_time < b.free_time && b.alloc_time < a.free_time;
}

// Max over time of the bytes live at once (still-live events count until the end).
int64_t max_live_bytes(const std::vector<alloc_event>& ev);

// Throws errc::invalid_argument naming the first event (by index, id and name) with a
// non-positive size or that is not freed after it was allocated. `what` prefixes the message.
void check_events(const std::vector<alloc_event>& ev, const std::string& what);

class alloc_trace {
 public:
  int64_t alloc(int64_t size, std::string name);  // returns the id (== index in events())
  void free(int64_t id);
  void close();  // frees everything still live at one tick; the trace is complete
  bool closed() const { return closed_; }
  int64_t now() const { return clock_; }  // the next tick
  const std::vector<alloc_event>& events() const { return events_; }
  int64_t max_live_bytes() const { return memo::max_live_bytes(events_); }
  int64_t live_bytes() const { return live_bytes_; }

  // {"clock": N, "closed": bool, "events": [{"id","size","alloc","free","name"}, ...]}
  nlohmann::json to_json() const;
  static alloc_trace from_json(const nlohmann::json& j);

 private:
  std::vector<alloc_event> events_;
  int64_t clock_ = 0;
  int64_t live_bytes_ = 0;
  int64_t live_count_ = 0;
  bool closed_ = false;
};

// A synthetic allocation trace of GPT-style transformer layers, forward then backward, as an
// eager framework that saves activations would issue it. Sizes in elements (× dtype_bytes):
//   per layer forward, saved for backward: the layer input x, ln1, q, k, v, attn_out (b·s·h
//     each), the attention residual h1 (b·s·h), ln2 (b·s·h), mlp_up and mlp_act (b·s·ffn)
//     — the "skeletal" activations of ALGORITHMS.md; the layer output is the next input;
//   per layer forward, transient: attention scores and probs (b·heads·s·s each), the
//     attention projection and the MLP down output (b·s·h, freed by the residual add);
//   head: logits (b·s·vocab) and their gradient, then the gradient of the last output;
//   per layer backward (reverse order): a gradient of each saved tensor's size, the score
//     and prob gradients (b·heads·s·s) as transients; a saved tensor is freed once its
//     gradient has been computed, a gradient once it has been consumed.
// The embedding output (b·s·h) is layer 0's input. The trace is closed. Used by tests and
// benchmarks to compare a planned arena against a caching-allocator replay.
struct synthetic_layer_config {
  int64_t batch = 1, seq = 512, hidden = 256, heads = 4, ffn = 1024, vocab = 1000;
  int64_t layers = 2;
  int64_t dtype_bytes = 2;
};
alloc_trace synthetic_transformer_trace(const synthetic_layer_config& c);

}  // namespace troupe::parallel::memo
