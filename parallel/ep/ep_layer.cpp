// parallel/ep/ep_layer.cpp — see ep_layer.h.
#include "parallel/ep/ep_layer.h"

#include <algorithm>
#include <cstring>
#include <exception>
#include <thread>

#include "kernels/moe.h"
#include "runtime/error.h"
#include "runtime/log.h"

namespace troupe::parallel::ep {

namespace kc = troupe::kernels::cpu;
using runtime::errc;
using runtime::tensor;

namespace {

constexpr int tag_weights = 20001;  // forward: native -> borrower, {gate, up, down}
constexpr int tag_grads = 20002;    // backward: borrower -> native, the chunk's partial gradients
constexpr int tag_migrate = 20003;  // ep_migrate

// A buffer of `rows` rows of width w (at least one row: communicators want a defined tensor).
tensor rows_buffer(int64_t rows, int64_t w) { return tensor::empty({std::max<int64_t>(rows, 1), w}); }

// Where the rows of one step travel (the same for forward and backward, so it is built once).
struct route_map {
  struct segment {
    int64_t local_slot, rows;  // rows [local_slot, +rows) of this rank's permuted rows
  };
  struct piece {
    int64_t recv_at, comp_at, rows;  // source-major receive row -> chunk-major compute row
  };
  std::vector<std::vector<segment>> send;  // per destination, in the destination's chunk order
  std::vector<int64_t> send_rows, recv_rows;
  std::vector<piece> pieces;
  std::vector<ep_chunk> mine;
  std::vector<int32_t> chunk_offsets;  // (mine + 1)
  int64_t rows_out = 0, rows_in = 0;
};

route_map make_route(const ep_plan& plan, const std::vector<int64_t>& counts, const std::vector<int32_t>& local_offsets,
                     int P, int64_t E, int me) {
  auto cnt = [&](int p, int64_t e) { return counts[static_cast<size_t>(p * E + e)]; };
  std::vector<int64_t> pre(static_cast<size_t>(P * E), 0);  // first global row of source p in expert e
  for (int64_t e = 0; e < E; ++e)
    for (int p = 1; p < P; ++p)
      pre[static_cast<size_t>(p * E + e)] = pre[static_cast<size_t>((p - 1) * E + e)] + cnt(p - 1, e);
  auto overlap = [&](const ep_chunk& c, int p, int64_t& lo, int64_t& hi) {
    const int64_t b = pre[static_cast<size_t>(p * E + c.expert)];
    lo = std::max(c.begin, b);
    hi = std::min(c.end, b + cnt(p, c.expert));
    return hi > lo;
  };
  route_map m;
  m.send.resize(static_cast<size_t>(P));
  m.send_rows.assign(static_cast<size_t>(P), 0);
  m.recv_rows.assign(static_cast<size_t>(P), 0);
  for (int q = 0; q < P; ++q)
    for (const auto& c : plan.chunks_of(q)) {
      int64_t lo, hi;
      if (!overlap(c, me, lo, hi)) continue;
      const int64_t slot = local_offsets[static_cast<size_t>(c.expert)] + lo - pre[static_cast<size_t>(me * E + c.expert)];
      m.send[static_cast<size_t>(q)].push_back({slot, hi - lo});
      m.send_rows[static_cast<size_t>(q)] += hi - lo;
      m.rows_out += hi - lo;
    }
  m.mine = plan.chunks_of(me);
  m.chunk_offsets.assign(1, 0);
  for (const auto& c : m.mine) m.chunk_offsets.push_back(static_cast<int32_t>(m.chunk_offsets.back() + c.rows()));
  for (const auto& c : m.mine)
    for (int p = 0; p < P; ++p) {
      int64_t lo, hi;
      if (overlap(c, p, lo, hi)) m.recv_rows[static_cast<size_t>(p)] += hi - lo;
    }
  std::vector<int64_t> at(static_cast<size_t>(P), 0);  // running receive row per source
  for (int p = 1; p < P; ++p) at[static_cast<size_t>(p)] = at[static_cast<size_t>(p - 1)] + m.recv_rows[static_cast<size_t>(p - 1)];
  m.rows_in = at.back() + m.recv_rows.back();
  for (size_t i = 0; i < m.mine.size(); ++i)
    for (int p = 0; p < P; ++p) {
      int64_t lo, hi;
      if (!overlap(m.mine[i], p, lo, hi)) continue;
      m.pieces.push_back({at[static_cast<size_t>(p)], m.chunk_offsets[i] + (lo - m.mine[i].begin), hi - lo});
      at[static_cast<size_t>(p)] += hi - lo;
    }
  return m;
}

std::vector<int64_t> elements(const std::vector<int64_t>& rows, int64_t w) {
  std::vector<int64_t> out(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) out[i] = rows[i] * w;
  return out;
}

void copy_rows(float* dst, const float* src, int64_t rows, int64_t w) {
  if (rows > 0) std::memcpy(dst, src, static_cast<size_t>(rows * w) * sizeof(float));
}

// This rank's permuted rows (local slot order) -> the computing ranks, which get them chunk-major.
tensor dispatch_rows(const route_map& m, const float* local, int64_t w, runtime::communicator& comm) {
  tensor send = rows_buffer(m.rows_out, w), recv = rows_buffer(m.rows_in, w);
  int64_t at = 0;
  for (const auto& segs : m.send)
    for (const auto& s : segs) {
      copy_rows(send.data<float>() + at * w, local + s.local_slot * w, s.rows, w);
      at += s.rows;
    }
  comm.all_to_all_v(recv, elements(m.recv_rows, w), send, elements(m.send_rows, w));
  tensor out = rows_buffer(m.chunk_offsets.back(), w);
  for (const auto& p : m.pieces) copy_rows(out.data<float>() + p.comp_at * w, recv.data<float>() + p.recv_at * w, p.rows, w);
  return out;
}

// The inverse: chunk-major computed rows -> each source rank's local slots.
void combine_rows(float* local, const route_map& m, const float* computed, int64_t w, runtime::communicator& comm) {
  tensor send = rows_buffer(m.rows_in, w), recv = rows_buffer(m.rows_out, w);
  for (const auto& p : m.pieces) copy_rows(send.data<float>() + p.recv_at * w, computed + p.comp_at * w, p.rows, w);
  comm.all_to_all_v(recv, elements(m.send_rows, w), send, elements(m.recv_rows, w));
  int64_t at = 0;
  for (const auto& segs : m.send)
    for (const auto& s : segs) {
      copy_rows(local + s.local_slot * w, recv.data<float>() + at * w, s.rows, w);
      at += s.rows;
    }
}

// Runs `transfers` on `side` (its own thread) while `main` runs on this thread; with no side
// communicator, one after the other on this thread. Rethrows the first failure.
template <typename Main, typename Transfers>
void overlapped(runtime::communicator* side, Main&& main, Transfers&& transfers) {
  if (!side) {
    main();
    transfers();
    return;
  }
  std::exception_ptr failed;
  std::thread t([&] {
    try {
      transfers();
    } catch (...) {
      failed = std::current_exception();
    }
  });
  try {
    main();
  } catch (...) {
    side->abort("expert-parallel layer: the token exchange failed");
    t.join();
    throw;
  }
  t.join();
  if (failed) std::rethrow_exception(failed);
}

// Weight copies of one forward: (expert, borrower) pairs in global order (invariant 4).
std::vector<ep_chunk> weight_copies(const ep_plan& plan) {
  auto w = plan.foreign_weights();
  std::sort(w.begin(), w.end(), [](const ep_chunk& a, const ep_chunk& b) {
    return a.expert != b.expert ? a.expert < b.expert : a.rank < b.rank;
  });
  return w;
}

// The weights chunk work uses for expert e: borrowed ones, else this rank's native ones.
struct expert_weights {
  const float* gate;
  const float* up;
  const float* down;
};
expert_weights weights_of(const ep_activations& a, const layer_params& L, int expert) {
  auto it = a.borrowed.find(expert);
  if (it != a.borrowed.end())
    return {it->second[0].data<float>(), it->second[1].data<float>(), it->second[2].data<float>()};
  const auto e = static_cast<size_t>(expert);
  TROUPE_CHECK(L.expert_gate[e].defined(), errc::internal,
               "expert-parallel layer: expert {} is neither native here nor borrowed", expert);
  return {L.expert_gate[e].data<float>(), L.expert_up[e].data<float>(), L.expert_down[e].data<float>()};
}

}  // namespace

int64_t ep_row_tile() { return kc::moe_row_tile; }

void ep_moe_forward(float* out, ep_activations& a, const float* x, const layer_params& L, const model_config& c,
                    int64_t N, ep_context& ctx) {
  TROUPE_CHECK(ctx.tokens, errc::invalid_argument, "expert-parallel layer: ep_context.tokens is not set");
  runtime::communicator& comm = *ctx.tokens;
  const int P = comm.size(), me = comm.rank();
  const int64_t C = c.hidden, E = c.n_experts, K = c.top_k, Im = c.moe_intermediate, R = N * K;
  TROUPE_CHECK(ctx.placement.ranks == P && ctx.placement.experts() == E, errc::invalid_argument,
               "expert-parallel layer: placement is for {} experts on {} ranks, but the model has {} experts and the "
               "group {} ranks",
               ctx.placement.experts(), ctx.placement.ranks, E, P);
  TROUPE_CHECK(!ctx.weights || (ctx.weights->size() == P && ctx.weights->rank() == me), errc::invalid_argument,
               "expert-parallel layer: the weights communicator must span the same ranks as the tokens one");
  ctx.last = ep_step_stats{};
  a.borrowed.clear();

  // 1. Route this rank's tokens; exchange per-(rank, expert) row counts; everyone plans the same.
  moe_route(a.local, x, L, c, N);
  tensor mine = tensor::empty({E}, runtime::dtype::i64), all = tensor::empty({P * E}, runtime::dtype::i64);
  for (int64_t e = 0; e < E; ++e)
    mine.data<int64_t>()[e] = a.local.offsets[static_cast<size_t>(e + 1)] - a.local.offsets[static_cast<size_t>(e)];
  comm.all_gather(all, mine);
  a.counts.assign(all.data<int64_t>(), all.data<int64_t>() + P * E);
  std::vector<int64_t> loads(static_cast<size_t>(E), 0);
  for (int p = 0; p < P; ++p)
    for (int64_t e = 0; e < E; ++e) loads[static_cast<size_t>(e)] += a.counts[static_cast<size_t>(p * E + e)];
  llep_options lo = ctx.options.llep;
  lo.row_align = kc::moe_row_tile;
  a.plan = make_ep_plan(ctx.options.mode, loads, ctx.placement, lo, ctx.options.eplb_redundant_per_rank);
  ep_plan_check(a.plan, loads, kc::moe_row_tile);
  if (runtime::log::logger().should_log(spdlog::level::debug))
    runtime::log::debug("ep rank {}: {}", me, a.plan.describe());
  const route_map m = make_route(a.plan, a.counts, a.local.offsets, P, E, me);
  a.chunk_offsets = m.chunk_offsets;

  // 2. Dispatch the rows; borrowed weights travel point-to-point at the same time.
  tensor xp_local = rows_buffer(R, C);
  kc::moe_permute(xp_local.data<float>(), x, a.local.slot_row.data(), R, K, C);
  auto copies = weight_copies(a.plan);
  if (ctx.options.mode == ep_mode::eplb) {
    // Resident replicas (invariant 6): keep those the plan still has, fetch only the new ones.
    std::set<std::pair<int, int>> want;
    for (const auto& w : copies) want.insert({w.expert, w.rank});
    for (auto it = ctx.replica_pairs.begin(); it != ctx.replica_pairs.end();)
      it = want.count(*it) ? std::next(it) : ctx.replica_pairs.erase(it);
    for (auto it = ctx.replicas.begin(); it != ctx.replicas.end();)
      it = ctx.replica_pairs.count({it->first, me}) ? std::next(it) : ctx.replicas.erase(it);
    for (const auto& [e, ws] : ctx.replicas) a.borrowed[e] = ws;
    std::vector<ep_chunk> fetch;
    for (const auto& w : copies)
      if (!ctx.replica_pairs.count({w.expert, w.rank})) fetch.push_back(w);
    copies = std::move(fetch);
  }
  size_t wsent = 0, wrecv = 0;
  auto transfers = [&] {
    runtime::communicator& wc = ctx.weights ? *ctx.weights : comm;
    for (const auto& w : copies) {
      const int native = ctx.placement.native[static_cast<size_t>(w.expert)];
      if (me == native) {
        for (int j = 0; j < 3; ++j) {
          const auto& v = j == 0 ? L.expert_gate : j == 1 ? L.expert_up : L.expert_down;
          wc.send(v[static_cast<size_t>(w.expert)], w.rank, tag_weights);
          wsent += v[static_cast<size_t>(w.expert)].nbytes();
        }
      } else if (me == w.rank) {
        std::vector<tensor> ws{tensor::empty({Im, C}), tensor::empty({Im, C}), tensor::empty({C, Im})};
        for (auto& t : ws) {
          wc.recv(t, native, tag_weights);
          wrecv += t.nbytes();
        }
        if (ctx.options.mode == ep_mode::eplb) ctx.replicas[w.expert] = ws;
        a.borrowed[w.expert] = std::move(ws);
      }
    }
  };
  overlapped(ctx.weights, [&] { a.xp = dispatch_rows(m, xp_local.data<float>(), C, comm); }, transfers);
  xp_local = tensor();
  if (ctx.options.mode == ep_mode::eplb)
    for (const auto& w : copies) ctx.replica_pairs.insert({w.expert, w.rank});

  // 3. The expert FFN on this rank's chunks (tiles from each chunk's first row: ep_plan.h inv. 2).
  const int64_t Rm = m.chunk_offsets.back();
  a.h_gate = rows_buffer(Rm, Im);
  a.h_up = rows_buffer(Rm, Im);
  tensor yp = rows_buffer(Rm, C);
  for (size_t i = 0; i < m.mine.size(); ++i) {
    const int e = m.mine[i].expert;
    const int64_t r0 = m.chunk_offsets[i];
    const int32_t off[2] = {0, static_cast<int32_t>(m.mine[i].rows())};
    const expert_weights w = weights_of(a, L, e);
    kc::moe_expert_ffn_forward(yp.data<float>() + r0 * C, a.h_gate.data<float>() + r0 * Im,
                               a.h_up.data<float>() + r0 * Im, a.xp.data<float>() + r0 * C, &w.gate, &w.up, &w.down,
                               off, 1, C, Im);
  }

  // 4. Combine back to the tokens' ranks, unpermute in k order, the shared expert.
  a.local.yp = rows_buffer(R, C);
  combine_rows(a.local.yp.data<float>(), m, yp.data<float>(), C, comm);
  kc::moe_unpermute(out, a.local.yp.data<float>(), a.local.topk_w.data<float>(), a.local.row_slot.data(), N, K, C);
  moe_shared_forward(out, a.local, x, L, c, N);

  ctx.last.loads = loads;
  ctx.last.plan = a.plan;
  ctx.last.weight_bytes_sent = wsent;
  ctx.last.weight_bytes_received = wrecv;
  ctx.last.weights_fetched = wrecv;
  ctx.last.token_bytes_sent = static_cast<size_t>(2 * m.rows_out * C) * sizeof(float);  // dispatch + combine
  ctx.last.rows_computed = Rm;
}

void ep_moe_backward(float* dx, layer_params& G, const float* dout, ep_activations& a, const float* x,
                     const layer_params& L, const model_config& c, int64_t N, ep_context& ctx) {
  runtime::communicator& comm = *ctx.tokens;
  const int P = comm.size(), me = comm.rank();
  const int64_t C = c.hidden, E = c.n_experts, K = c.top_k, Im = c.moe_intermediate, R = N * K;
  const route_map m = make_route(a.plan, a.counts, a.local.offsets, P, E, me);

  // 1. Unpermute backward locally; the row gradients go where their rows were computed.
  tensor dyp_local = rows_buffer(R, C);
  runtime::work_buffer dtopk_w(static_cast<size_t>(std::max<int64_t>(N * K, 1)));
  kc::moe_unpermute_backward(dyp_local.data<float>(), dtopk_w.data(), dout, a.local.yp.data<float>(),
                             a.local.topk_w.data<float>(), a.local.row_slot.data(), N, K, C);
  tensor dyp = dispatch_rows(m, dyp_local.data<float>(), C, comm);
  dyp_local = tensor();

  // 2. Expert FFN backward per chunk: native experts accumulate into G; a borrowed chunk into its
  //    own partial gradient, which goes back to the native rank.
  const int64_t Rm = m.chunk_offsets.back();
  tensor dxp = rows_buffer(Rm, C);
  std::vector<std::vector<tensor>> partial(m.mine.size());
  for (size_t i = 0; i < m.mine.size(); ++i) {
    const int e = m.mine[i].expert;
    const int64_t r0 = m.chunk_offsets[i];
    const int32_t off[2] = {0, static_cast<int32_t>(m.mine[i].rows())};
    const expert_weights w = weights_of(a, L, e);
    float *dg, *du, *dd;
    if (ctx.placement.native[static_cast<size_t>(e)] == me) {
      dg = G.expert_gate[static_cast<size_t>(e)].data<float>();
      du = G.expert_up[static_cast<size_t>(e)].data<float>();
      dd = G.expert_down[static_cast<size_t>(e)].data<float>();
    } else {
      partial[i] = {tensor::zeros({Im, C}), tensor::zeros({Im, C}), tensor::zeros({C, Im})};
      dg = partial[i][0].data<float>();
      du = partial[i][1].data<float>();
      dd = partial[i][2].data<float>();
    }
    kc::moe_expert_ffn_backward(dxp.data<float>() + r0 * C, &dg, &du, &dd, dyp.data<float>() + r0 * C,
                                a.xp.data<float>() + r0 * C, a.h_gate.data<float>() + r0 * Im,
                                a.h_up.data<float>() + r0 * Im, &w.gate, &w.up, &w.down, off, 1, C, Im);
  }
  a.borrowed.clear();
  a.xp = tensor();
  a.h_gate = tensor();
  a.h_up = tensor();

  // 3. Combine the input gradients while borrowed chunks' weight gradients return (plan order:
  //    expert, then row; the native rank adds them in that order).
  tensor dxp_local = rows_buffer(R, C);
  size_t gsent = 0, grecv = 0;
  auto returns = [&] {
    runtime::communicator& wc = ctx.weights ? *ctx.weights : comm;
    size_t mine_i = 0;
    for (const auto& ch : a.plan.chunks) {
      const int native = ctx.placement.native[static_cast<size_t>(ch.expert)];
      const bool is_mine = ch.rank == me;
      size_t idx = 0;
      if (is_mine) idx = mine_i++;
      if (ch.rank == native) continue;
      if (is_mine) {
        for (const auto& t : partial[idx]) {
          wc.send(t, native, tag_grads);
          gsent += t.nbytes();
        }
      } else if (me == native) {
        std::vector<tensor*> dst{&G.expert_gate[static_cast<size_t>(ch.expert)],
                                 &G.expert_up[static_cast<size_t>(ch.expert)],
                                 &G.expert_down[static_cast<size_t>(ch.expert)]};
        for (tensor* d : dst) {
          tensor t = tensor::empty(d->shape());
          wc.recv(t, ch.rank, tag_grads);
          grecv += t.nbytes();
          float* g = d->data<float>();
          const float* s = t.data<float>();
          for (int64_t i = 0; i < t.numel(); ++i) g[i] += s[i];
        }
      }
    }
  };
  overlapped(ctx.weights, [&] { combine_rows(dxp_local.data<float>(), m, dxp.data<float>(), C, comm); }, returns);

  // 4. dx = the K row gradients of each token (k order), then router and shared expert.
  kc::moe_permute_backward(dx, dxp_local.data<float>(), a.local.row_slot.data(), N, K, C);
  moe_router_shared_backward(dx, G, dout, dtopk_w.data(), a.local, x, L, c, N);
  ctx.last.weight_bytes_sent += gsent;
  ctx.last.weight_bytes_received += grecv;
  ctx.last.token_bytes_sent += static_cast<size_t>(2 * m.rows_out * C) * sizeof(float);
}

std::vector<ep_expert_tensors> ep_expert_sets(layer_params& L, const model_config& c) {
  const int64_t C = c.hidden, Im = c.moe_intermediate;
  return {{&L.expert_gate, {Im, C}}, {&L.expert_up, {Im, C}}, {&L.expert_down, {C, Im}}};
}

size_t ep_migrate(const std::vector<ep_expert_tensors>& sets, const ep_placement& from, const ep_placement& to,
                  runtime::communicator& comm) {
  TROUPE_CHECK(from.experts() == to.experts() && from.ranks == comm.size() && to.ranks == comm.size(),
               errc::invalid_argument,
               "ep_migrate: placements of {} and {} experts on {} and {} ranks for a group of {}", from.experts(),
               to.experts(), from.ranks, to.ranks, comm.size());
  to.validate();
  const int me = comm.rank();
  size_t sent = 0;
  for (int64_t e = 0; e < from.experts(); ++e) {  // global order: expert, then set
    const int src = from.native[static_cast<size_t>(e)], dst = to.native[static_cast<size_t>(e)];
    if (src == dst || (me != src && me != dst)) continue;
    for (const auto& s : sets) {
      tensor& t = (*s.tensors)[static_cast<size_t>(e)];
      if (me == src) {
        TROUPE_CHECK(t.defined(), errc::internal, "ep_migrate: rank {} should own expert {} but holds no tensor", me,
                     e);
        comm.send(t, dst, tag_migrate);
        sent += t.nbytes();
        t = tensor();
      } else {
        t = tensor::empty(s.shape);
        comm.recv(t, src, tag_migrate);
      }
    }
  }
  return sent;
}

void ep_shard_layer(layer_params& L, const ep_placement& placement, int rank) {
  TROUPE_CHECK(static_cast<int64_t>(L.expert_gate.size()) == placement.experts(), errc::invalid_argument,
               "ep_shard_layer: the layer has {} experts, the placement {}", L.expert_gate.size(),
               placement.experts());
  for (size_t e = 0; e < L.expert_gate.size(); ++e) {
    if (placement.native[e] == rank) continue;
    L.expert_gate[e] = tensor();
    L.expert_up[e] = tensor();
    L.expert_down[e] = tensor();
  }
}

}  // namespace troupe::parallel::ep
