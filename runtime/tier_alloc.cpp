// runtime/tier_alloc.cpp — mmap + mbind with free-memory checks and fallbacks (tier_alloc.h).
#include "runtime/tier_alloc.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <numeric>

#include "runtime/device.h"
#include "runtime/error.h"
#include "runtime/log.h"

#ifdef TROUPE_HAVE_CUDA
#include <cuda_runtime.h>
#endif

#ifdef TROUPE_HAVE_NUMA
#include <numa.h>
#include <numaif.h>
#endif

namespace troupe::runtime {
namespace {

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

std::string gib(double bytes) {
  if (bytes < 1024.0 * 1024.0 * 1024.0) return fmt::format("{:.1f} MiB", bytes / (1024.0 * 1024.0));
  return fmt::format("{:.2f} GiB", bytes / (1024.0 * 1024.0 * 1024.0));
}

std::string node_list(const std::vector<int>& nodes) {
  return fmt::format("{{{}}}", fmt::join(nodes, ","));
}

// A candidate policy and whether the nodes' free memory can hold it; "" = it fits.
struct candidate {
  std::string policy;  // bind | interleave | striped | default
  std::vector<int> nodes;
  std::vector<int64_t> weights;
};

std::string shortfall(const candidate& c, size_t mapped, const node_free_fn& free_bytes) {
  if (c.policy == "default") return "";
  if (c.policy == "bind") {
    int64_t total = 0;
    for (int n : c.nodes) {
      const int64_t fr = free_bytes(n);
      if (fr < 0) return fmt::format("node {} is not a node with memory", n);
      total += fr;
    }
    if (total >= static_cast<int64_t>(mapped)) return "";
    return fmt::format("node(s) {} have {} free, {} asked", node_list(c.nodes), gib(static_cast<double>(total)),
                       gib(static_cast<double>(mapped)));
  }
  const bool uniform = c.weights.empty();
  const double sum = uniform ? static_cast<double>(c.nodes.size())
                             : static_cast<double>(std::accumulate(c.weights.begin(), c.weights.end(), int64_t{0}));
  for (size_t i = 0; i < c.nodes.size(); ++i) {
    const double share = static_cast<double>(mapped) * (uniform ? 1.0 : static_cast<double>(c.weights[i])) / sum;
    const int64_t fr = free_bytes(c.nodes[i]);
    if (fr < 0) return fmt::format("node {} is not a node with memory", c.nodes[i]);
    if (static_cast<double>(fr) < share) {
      return fmt::format("node {} has {} free, its {} share is {}", c.nodes[i], gib(static_cast<double>(fr)),
                         c.policy, gib(share));
    }
  }
  return "";
}

std::vector<candidate> candidates_of(const placement& where) {
  std::vector<candidate> out;
  const bool weighted = where.how == placement::interleave && !where.weights.empty() &&
                        std::adjacent_find(where.weights.begin(), where.weights.end(), std::not_equal_to<>()) !=
                            where.weights.end();
  if (where.how == placement::bind) {
    out.push_back({"bind", where.nodes, {}});
    out.push_back({"interleave", where.nodes, {}});
  } else if (weighted) {
    out.push_back({"striped", where.nodes, where.weights});
    out.push_back({"interleave", where.nodes, {}});
  } else {
    out.push_back({"interleave", where.nodes, {}});
  }
  out.push_back({"default", {}, {}});
  return out;
}

#ifdef TROUPE_HAVE_NUMA
int64_t numa_free_of(int node) {
  if (node < 0 || node > numa_max_node()) return -1;
  long long fr = 0;
  const long long size = numa_node_size64(node, &fr);
  return size <= 0 ? -1 : static_cast<int64_t>(fr);
}

// mbind over [p, p + n) for one candidate; false (errno kept in err) when the kernel refuses.
bool apply_policy(char* p, size_t n, const candidate& c, std::string& err) {
  auto mask_of = [](const std::vector<int>& nodes, std::vector<unsigned long>& mask) {
    const int bits = static_cast<int>(sizeof(unsigned long) * 8);
    int maxn = 0;
    for (int x : nodes) maxn = std::max(maxn, x);
    mask.assign(static_cast<size_t>(maxn / bits + 1), 0UL);
    for (int x : nodes) mask[static_cast<size_t>(x / bits)] |= 1UL << (x % bits);
    return static_cast<unsigned long>(mask.size() * bits + 1);  // maxnode: one past the last bit
  };
  std::vector<unsigned long> mask;
  auto do_mbind = [&](char* at, size_t len, int mode, const std::vector<int>& nodes) {
    const unsigned long maxnode = mask_of(nodes, mask);
    if (mbind(at, len, mode, mask.data(), maxnode, 0) != 0) {
      err = fmt::format("mbind({}, {}) failed: {}", mode == MPOL_BIND ? "MPOL_BIND" : "MPOL_INTERLEAVE",
                        node_list(nodes), std::strerror(errno));
      return false;
    }
    return true;
  };
  if (c.policy == "bind") return do_mbind(p, n, MPOL_BIND, c.nodes);
  if (c.policy == "interleave") return do_mbind(p, n, MPOL_INTERLEAVE, c.nodes);
  if (c.policy == "striped") {
    const size_t stripes = (n + kStripeBytes - 1) / kStripeBytes;
    const std::vector<int> which = interleave_stripes(stripes, c.weights);
    for (size_t s = 0; s < stripes;) {
      size_t e = s + 1;  // merge runs of stripes on the same node into one mbind
      while (e < stripes && which[e] == which[s]) ++e;
      const size_t off = s * kStripeBytes;
      const size_t len = std::min(n, e * kStripeBytes) - off;
      if (!do_mbind(p + off, len, MPOL_BIND, {c.nodes[static_cast<size_t>(which[s])]})) return false;
      s = e;
    }
    return true;
  }
  return true;  // default: nothing to set
}

void reset_policy(char* p, size_t n) { mbind(p, n, MPOL_DEFAULT, nullptr, 0, 0); }
#endif

}  // namespace

bool numa_usable() {
#ifdef TROUPE_HAVE_NUMA
  static const bool usable = numa_available() >= 0;
  return usable;
#else
  return false;
#endif
}

std::vector<int> interleave_stripes(size_t n, const std::vector<int64_t>& weights) {
  TROUPE_CHECK(!weights.empty(), errc::invalid_argument, "interleave_stripes: no weights");
  int64_t total = 0;
  for (int64_t w : weights) {
    TROUPE_CHECK(w >= 0, errc::invalid_argument, "interleave_stripes: weight {} is negative", w);
    total += w;
  }
  TROUPE_CHECK(total > 0, errc::invalid_argument, "interleave_stripes: the weights sum to 0");
  // Smooth weighted round robin (nginx): each stripe goes to the node furthest behind its share.
  std::vector<int64_t> current(weights.size(), 0);
  std::vector<int> out(n);
  for (size_t s = 0; s < n; ++s) {
    size_t best = 0;
    for (size_t i = 0; i < weights.size(); ++i) {
      current[i] += weights[i];
      if (current[i] > current[best]) best = i;
    }
    current[best] -= total;
    out[s] = static_cast<int>(best);
  }
  return out;
}

tier_alloc_decision plan_tier_alloc(size_t bytes, const placement& where, const node_free_fn& free_bytes) {
  for (int n : where.nodes) TROUPE_CHECK(n >= 0, errc::invalid_argument, "tier_alloc: node {} is negative", n);
  TROUPE_CHECK(where.weights.empty() || (where.how == placement::interleave && where.weights.size() == where.nodes.size()),
               errc::invalid_argument, "tier_alloc: {} weights for {} nodes; give one weight per node, interleave only",
               where.weights.size(), where.nodes.size());
  tier_alloc_decision d;
  if (where.nodes.empty()) {
    d.policy = "default";
    return d;
  }
  if (!numa_usable()) {
    d.policy = "default";
    d.fell_back = true;
    d.note = fmt::format("NUMA is not available ({}); nodes {} ignored, default policy",
#ifdef TROUPE_HAVE_NUMA
                         "numa_available() < 0",
#else
                         "built without libnuma",
#endif
                         node_list(where.nodes));
    return d;
  }
  const size_t mapped = (std::max<size_t>(bytes, 1) + page_size() - 1) / page_size() * page_size();
  node_free_fn fr = free_bytes;
#ifdef TROUPE_HAVE_NUMA
  if (!fr) fr = numa_free_of;
#endif
  const auto cands = candidates_of(where);
  for (size_t i = 0; i < cands.size(); ++i) {
    const std::string why = shortfall(cands[i], mapped, fr);
    if (!why.empty()) {
      if (d.note.find(why) == std::string::npos) d.note += (d.note.empty() ? "" : "; ") + why;
      continue;
    }
    d.policy = cands[i].policy;
    d.nodes = cands[i].nodes;
    d.weights = cands[i].weights;
    d.fell_back = i > 0;
    if (!d.fell_back) d.note.clear();
    return d;
  }
  TROUPE_THROW(errc::internal, "tier_alloc: no candidate policy (default always fits)");
}

tier_allocation tier_alloc(size_t bytes, const placement& where, const node_free_fn& free_bytes) {
  const tier_alloc_decision d = plan_tier_alloc(bytes, where, free_bytes);
  tier_allocation a;
  a.bytes = bytes;
  a.mapped = (std::max<size_t>(bytes, 1) + page_size() - 1) / page_size() * page_size();
  void* p = mmap(nullptr, a.mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TROUPE_CHECK(p != MAP_FAILED, errc::io, "tier_alloc: mmap of {} bytes failed: {}", a.mapped, std::strerror(errno));
  a.ptr = p;
  a.policy = d.policy;
  a.nodes = d.nodes;
  a.fell_back = d.fell_back;
  a.note = d.note;
#ifdef TROUPE_HAVE_NUMA
  if (numa_usable() && d.policy != "default") {
    // The decided policy, then the later candidates if the kernel refuses it.
    std::vector<candidate> cands = candidates_of(where);
    auto it = std::find_if(cands.begin(), cands.end(), [&](const candidate& c) { return c.policy == d.policy; });
    for (; it != cands.end(); ++it) {
      std::string err;
      if (apply_policy(static_cast<char*>(p), a.mapped, *it, err)) {
        a.policy = it->policy;
        a.nodes = it->nodes;
        break;
      }
      reset_policy(static_cast<char*>(p), a.mapped);
      a.fell_back = true;
      a.note += (a.note.empty() ? "" : "; ") + err;
    }
  }
#endif
  if (a.fell_back) {
    log::warn("tier_alloc: {} bytes asked {} on nodes {}: {}; using {}{}", bytes,
              where.how == placement::bind ? "bound" : "interleaved", node_list(where.nodes), a.note, a.policy,
              a.nodes.empty() ? "" : " over " + node_list(a.nodes));
  }
  // Touch every page after the policy is set, so each page is placed by it.
  volatile char* c = static_cast<char*>(p);
  for (size_t off = 0; off < a.mapped; off += page_size()) c[off] = 0;
#ifdef TROUPE_HAVE_CUDA
  if (where.pin && cuda_status().available) {
    const cudaError_t e = cudaHostRegister(p, a.mapped, cudaHostRegisterDefault);
    a.pinned = e == cudaSuccess;
    if (!a.pinned) {
      (void)cudaGetLastError();  // clear it
      log::warn("tier_alloc: cudaHostRegister of {} bytes failed: {}; the GPU copies from pageable memory",
                a.mapped, cudaGetErrorString(e));
    }
  }
#endif
  return a;
}

void tier_free(tier_allocation& a) {
#ifdef TROUPE_HAVE_CUDA
  if (a.pinned && a.ptr != nullptr) cudaHostUnregister(a.ptr);
#endif
  a.pinned = false;
  if (a.ptr != nullptr) munmap(a.ptr, a.mapped);
  a.ptr = nullptr;
  a.bytes = a.mapped = 0;
}

std::vector<int> pages_nodes(const void* p, size_t bytes) {
#ifdef TROUPE_HAVE_NUMA
  TROUPE_CHECK(numa_usable(), errc::unsupported, "pages_nodes: NUMA is not available on this machine");
  const size_t ps = page_size();
  const uintptr_t start = reinterpret_cast<uintptr_t>(p) / ps * ps;
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + std::max<size_t>(bytes, 1);
  const size_t n = (end - start + ps - 1) / ps;
  std::vector<int> status(n, -1);
  constexpr size_t chunk = 4096;
  std::vector<void*> pages(chunk);
  for (size_t i = 0; i < n; i += chunk) {
    const size_t m = std::min(chunk, n - i);
    for (size_t j = 0; j < m; ++j) pages[j] = reinterpret_cast<void*>(start + (i + j) * ps);
    const long r = move_pages(0, m, pages.data(), nullptr, status.data() + i, 0);
    TROUPE_CHECK(r == 0, errc::io, "pages_nodes: move_pages over {} pages failed: {}", m, std::strerror(errno));
  }
  for (int& s : status) s = s < 0 ? -1 : s;
  return status;
#else
  (void)p, (void)bytes;
  TROUPE_THROW(errc::unsupported, "pages_nodes: built without libnuma");
#endif
}

int policy_of(const void* p) {
#ifdef TROUPE_HAVE_NUMA
  if (!numa_usable()) return 0;
  int mode = -1;
  TROUPE_CHECK(get_mempolicy(&mode, nullptr, 0, const_cast<void*>(p), MPOL_F_ADDR) == 0, errc::io,
               "policy_of: get_mempolicy failed: {}", std::strerror(errno));
  return mode;
#else
  (void)p;
  return 0;
#endif
}

}  // namespace troupe::runtime
