// elastic/engine/guided_json.cpp — the JSON pushdown matcher, the vocabulary trie and the token mask walk.
#include "elastic/engine/guided_json.h"

#include <algorithm>
#include <stdexcept>

namespace troupe::elastic {

using namespace guided_detail;

guided_error::guided_error(std::string p, std::string message)
    : std::runtime_error(p.empty() ? "response_format schema: " + message
                                   : "response_format schema at '" + p + "': " + message),
      path(std::move(p)) {}

namespace guided_detail {

int32_t byte_trie::child(int32_t n, uint8_t b) const {
  const auto& e = nodes[n].edges;
  if (e.size() <= 8) {
    for (const auto& [c, to] : e)
      if (c == b) return to;
    return k_none;
  }
  auto it = std::lower_bound(e.begin(), e.end(), b, [](const auto& p, uint8_t v) { return p.first < v; });
  return it != e.end() && it->first == b ? it->second : k_none;
}

void byte_trie::insert(std::string_view s, int32_t term) {
  if (nodes.empty()) nodes.emplace_back();
  int32_t n = 0;
  for (uint8_t b : s) {
    int32_t c = child(n, b);
    if (c == k_none) {
      c = static_cast<int32_t>(nodes.size());
      nodes.emplace_back();
      auto& e = nodes[n].edges;
      e.insert(std::lower_bound(e.begin(), e.end(), std::make_pair(b, int32_t{0})), {b, c});
    }
    n = c;
  }
  nodes[n].term = term;
}

}  // namespace guided_detail

namespace {

enum frame_kind : uint8_t { k_root, k_object, k_array, k_string, k_number, k_literal };
enum root_state : uint8_t { r_start, r_done };
enum object_state : uint8_t { o_start, o_key, o_key_declared, o_colon, o_value, o_after, o_next };
enum array_state : uint8_t { a_start, a_value, a_after };
enum number_state : uint8_t { n_minus, n_zero, n_int, n_dot, n_frac, n_exp, n_exp_sign, n_exp_digit, n_bad };
// String scanner: s_esc after '\'; s_u* inside \uXXXX (s_u2d: the first hex digit was d); s_h* the rest of
// a high surrogate, then s_l* its "\uDC00-\uDFFF" partner; s_c1..3: that many UTF-8 continuation bytes
// (80-BF) to go; s_e0 / s_ed / s_f0 / s_f4: the next continuation byte has a narrower range.
// clang-format off
enum string_sub : uint8_t {
  s_plain, s_esc, s_u1, s_u2, s_u2d, s_u3, s_u4, s_h3, s_h4, s_lbs, s_lu, s_l1, s_l2, s_l3, s_l4,
  s_c1, s_c2, s_c3, s_e0, s_ed, s_f0, s_f4
};
// clang-format on
enum scan_result : uint8_t { scan_reject, scan_ok, scan_close };

inline bool is_ws(uint8_t b) { return b == ' ' || b == '\n' || b == '\r' || b == '\t'; }
inline bool is_hex(uint8_t b) { return (b >= '0' && b <= '9') || ((b | 0x20) >= 'a' && (b | 0x20) <= 'f'); }
inline bool is_digit(uint8_t b) { return b >= '0' && b <= '9'; }
inline bool in(uint8_t b, uint8_t lo, uint8_t hi) { return b >= lo && b <= hi; }

// clang-format off
// One byte of a string body (after the opening quote). counted: count characters against [lo, hi].
// canonical: refuse \/ and \u (keys that must not spell a declared property another way).
inline scan_result scan_byte(uint8_t& sub, uint32_t& count, uint8_t b, bool counted, uint32_t lo, uint32_t hi,
                             bool canonical) {
  auto to = [&](uint8_t s) { sub = s; return scan_ok; };
  switch (sub) {
    case s_plain:
      if (b == '"') return counted && count < lo ? scan_reject : scan_close;
      if (b < 0x20) return scan_reject;
      if (counted) {
        if (count >= hi) return scan_reject;
        ++count;
      }
      if (b == '\\') return to(s_esc);
      if (b < 0x80) return scan_ok;
      if (b < 0xC2) return scan_reject;
      if (b < 0xE0) return to(s_c1);
      if (b == 0xE0) return to(s_e0);
      if (b == 0xED) return to(s_ed);
      if (b < 0xF0) return to(s_c2);
      if (b == 0xF0) return to(s_f0);
      if (b < 0xF4) return to(s_c3);
      if (b == 0xF4) return to(s_f4);
      return scan_reject;
    case s_esc:
      switch (b) {
        case '"': case '\\': case 'b': case 'f': case 'n': case 'r': case 't': return to(s_plain);
        case '/': return canonical ? scan_reject : to(s_plain);
        case 'u': return canonical ? scan_reject : to(s_u1);
        default: return scan_reject;
      }
    case s_u1: return (b | 0x20) == 'd' ? to(s_u2d) : is_hex(b) ? to(s_u2) : scan_reject;
    case s_u2: return is_hex(b) ? to(s_u3) : scan_reject;
    case s_u2d:
      if (in(b, '0', '7')) return to(s_u3);
      return b == '8' || b == '9' || in(b | 0x20, 'a', 'b') ? to(s_h3) : scan_reject;  // c-f: lone low
    case s_u3: return is_hex(b) ? to(s_u4) : scan_reject;
    case s_u4: return is_hex(b) ? to(s_plain) : scan_reject;
    case s_h3: return is_hex(b) ? to(s_h4) : scan_reject;
    case s_h4: return is_hex(b) ? to(s_lbs) : scan_reject;
    case s_lbs: return b == '\\' ? to(s_lu) : scan_reject;
    case s_lu: return b == 'u' ? to(s_l1) : scan_reject;
    case s_l1: return (b | 0x20) == 'd' ? to(s_l2) : scan_reject;
    case s_l2: return in(b | 0x20, 'c', 'f') ? to(s_l3) : scan_reject;
    case s_l3: return is_hex(b) ? to(s_l4) : scan_reject;
    case s_l4: return is_hex(b) ? to(s_plain) : scan_reject;
    case s_c1: return in(b, 0x80, 0xBF) ? to(s_plain) : scan_reject;
    case s_c2: return in(b, 0x80, 0xBF) ? to(s_c1) : scan_reject;
    case s_c3: return in(b, 0x80, 0xBF) ? to(s_c2) : scan_reject;
    case s_e0: return in(b, 0xA0, 0xBF) ? to(s_c1) : scan_reject;
    case s_ed: return in(b, 0x80, 0x9F) ? to(s_c1) : scan_reject;
    case s_f0: return in(b, 0x90, 0xBF) ? to(s_c2) : scan_reject;
    case s_f4: return in(b, 0x80, 0x8F) ? to(s_c2) : scan_reject;
    default: return scan_reject;
  }
}

inline uint8_t number_next(uint8_t s, uint8_t b, bool integer) {
  const bool d = is_digit(b);
  const bool frac = !integer && b == '.';
  const bool exp = !integer && (b == 'e' || b == 'E');
  switch (s) {
    case n_minus: return b == '0' ? n_zero : d ? n_int : n_bad;
    case n_zero: return frac ? n_dot : exp ? n_exp : n_bad;
    case n_int: return d ? n_int : frac ? n_dot : exp ? n_exp : n_bad;
    case n_dot: return d ? n_frac : n_bad;
    case n_frac: return d ? n_frac : exp ? n_exp : n_bad;
    case n_exp: return d ? n_exp_digit : (b == '+' || b == '-') ? n_exp_sign : n_bad;
    case n_exp_sign: case n_exp_digit: return d ? n_exp_digit : n_bad;
    default: return n_bad;
  }
}
inline bool number_terminal(uint8_t s) { return s == n_zero || s == n_int || s == n_frac || s == n_exp_digit; }
// clang-format on

constexpr int32_t k_pushed = -1, k_popped = -2;
struct undo_entry {
  json_frame old;  // k_popped: the frame popped; index >= 0: the frame's previous value
  int32_t op;      // index of the frame changed, k_pushed or k_popped
};

// Steps a frame stack over bytes, logging every change so that rollback() can undo it.
class machine {
 public:
  machine(const grammar_data& g, std::vector<json_frame>& st, std::vector<undo_entry>& log)
      : g_(g), st_(st), log_(log) {}

  // Consumes byte b; false when it is not allowed (the stack may be half changed: roll back).
  bool step(uint8_t b) {
    for (;;) {
      const size_t i = st_.size() - 1;
      json_frame f = st_[i];
      switch (f.kind) {
        case k_string: {
          if (f.sub == s_plain && f.state == 0 && b >= 0x20 && b < 0x80 && b != '"' && b != '\\') return true;
          const typed_node& n = g_.nodes[f.node];
          switch (scan_byte(f.sub, f.count, b, f.state != 0, n.min_length, n.max_length, false)) {
            case scan_reject:
              return false;
            case scan_close:
              pop();
              value_done();
              return true;
            default:
              set(i, f);
              return true;
          }
        }
        case k_number: {
          const uint8_t s = number_next(f.state, b, f.sub != 0);
          if (s != n_bad) {
            f.state = s;
            set(i, f);
            return true;
          }
          if (!number_terminal(f.state)) return false;
          pop();
          value_done();
          continue;  // b goes to the enclosing value
        }
        case k_literal: {
          const byte_trie& t = g_.literals[g_.nodes[f.node].rule].trie;
          const int32_t c = t.child(f.pos, b);
          if (c != k_none) {
            if (t.nodes[c].term != k_none && t.nodes[c].edges.empty()) {
              pop();
              value_done();
            } else {
              f.pos = c;
              set(i, f);
            }
            return true;
          }
          if (t.nodes[f.pos].term == k_none) return false;
          pop();
          value_done();
          continue;
        }
        case k_array:
          return array_byte(i, f, b);
        case k_object:
          return object_byte(i, f, b);
        default:  // k_root
          if (f.state == r_done) return false;
          if (is_ws(b)) return add_ws(i, f);
          return enter(f.node, b);
      }
    }
  }

  void rollback(size_t mark) {
    while (log_.size() > mark) {
      const undo_entry& e = log_.back();
      if (e.op >= 0) {
        st_[e.op] = e.old;
      } else if (e.op == k_pushed) {
        st_.pop_back();
      } else {
        st_.push_back(e.old);
      }
      log_.pop_back();
    }
  }

 private:
  void set(size_t i, const json_frame& f) {
    log_.push_back({st_[i], static_cast<int32_t>(i)});
    st_[i] = f;
  }
  void push(const json_frame& f) {
    log_.push_back({json_frame{}, k_pushed});
    st_.push_back(f);
  }
  void pop() {
    log_.push_back({st_.back(), k_popped});
    st_.pop_back();
  }
  bool add_ws(size_t i, json_frame f) {
    if (f.ws >= k_max_whitespace) return false;
    ++f.ws;
    set(i, f);
    return true;
  }
  // The top frame's current value (the frame above it, now popped) is complete.
  void value_done() {
    const size_t i = st_.size() - 1;
    json_frame p = st_[i];
    p.ws = 0;
    if (p.kind == k_root)
      p.state = r_done;
    else if (p.kind == k_array)
      p.state = a_after, ++p.count;
    else
      p.state = o_after;
    set(i, p);
  }
  // Opens the value of value node v that byte b starts.
  bool enter(int32_t v, uint8_t b) {
    const int32_t t = g_.values[v].first[b];
    if (t == k_none) return false;
    const typed_node& n = g_.nodes[t];
    json_frame f{};
    f.node = t;
    switch (n.kind) {
      case node_kind::object:
        f.kind = k_object, f.state = o_start;
        break;
      case node_kind::array:
        f.kind = k_array, f.state = a_start;
        break;
      case node_kind::string:
        f.kind = k_string, f.state = n.counted ? 1 : 0, f.sub = s_plain;
        break;
      case node_kind::number:
        f.kind = k_number, f.sub = n.integer ? 1 : 0;
        f.state = b == '-' ? n_minus : b == '0' ? n_zero : n_int;
        break;
      case node_kind::literal: {
        const byte_trie& tr = g_.literals[n.rule].trie;
        const int32_t c = tr.child(0, b);
        if (c == k_none) return false;
        if (tr.nodes[c].term != k_none && tr.nodes[c].edges.empty()) {
          value_done();
          return true;
        }
        f.kind = k_literal, f.pos = c;
        break;
      }
    }
    push(f);
    return true;
  }

  bool array_byte(size_t i, json_frame f, uint8_t b) {
    const typed_node& n = g_.nodes[f.node];
    if (is_ws(b)) return add_ws(i, f);
    switch (f.state) {
      case a_start:
        if (b == ']') return n.min_items == 0 && close();
        return n.max_items > 0 && n.items != k_none && enter(n.items, b);
      case a_value:
        return enter(n.items, b);
      default:  // a_after
        if (b == ',') {
          if (f.count >= n.max_items) return false;
          f.state = a_value, f.ws = 0;
          set(i, f);
          return true;
        }
        return b == ']' && f.count >= n.min_items && close();
    }
  }

  bool close() {
    pop();
    value_done();
    return true;
  }

  static bool key_possible(const json_frame& f, const object_rule& o) {
    return o.additional != k_none || o.usable.any_outside(f.seen);
  }

  bool object_byte(size_t i, json_frame f, uint8_t b) {
    if (f.state == o_key && f.pos == k_none && f.sub == s_plain && b >= 0x20 && b < 0x80 && b != '"' && b != '\\')
      return true;  // an undeclared key's plain character: nothing changes
    const object_rule& o = g_.objects[g_.nodes[f.node].rule];
    if (f.state == o_key || f.state == o_key_declared) return key_byte(i, f, o, b);
    if (is_ws(b)) return add_ws(i, f);
    switch (f.state) {
      case o_start:
      case o_next:
        if (b == '"') {
          if (!key_possible(f, o)) return false;
          f.state = o.additional != k_none ? o_key : o_key_declared;
          f.pos = o.names.empty() ? k_none : 0;
          f.sub = s_plain, f.ws = 0;
          set(i, f);
          return true;
        }
        return b == '}' && f.state == o_start && !o.required.any_outside(f.seen) && close();
      case o_colon:
        if (b != ':') return false;
        f.state = o_value, f.ws = 0;
        set(i, f);
        return true;
      case o_value:
        return enter(f.pos != k_none ? o.values[f.pos] : o.additional, b);
      default:  // o_after
        if (b == ',') {
          if (!key_possible(f, o)) return false;
          f.state = o_next, f.ws = 0;
          set(i, f);
          return true;
        }
        return b == '}' && !o.required.any_outside(f.seen) && close();
    }
  }

  // A byte of a key: followed both as an undeclared key (o_key: the scanner in f.sub) and along the trie
  // of declared names (f.pos), which also catches an undeclared-looking key that spells a declared name.
  bool key_byte(size_t i, json_frame f, const object_rule& o, uint8_t b) {
    uint8_t sub = f.sub;
    scan_result free = scan_reject;
    if (f.state == o_key) {
      uint32_t unused = 0;
      free = scan_byte(sub, unused, b, false, 0, 0, !o.names.empty());
    }
    int32_t pos = k_none;
    bool declared_alive = false;
    if (f.pos != k_none) {
      const int32_t c = o.keys.child(f.pos, b);
      if (c != k_none) {
        pos = c;
        declared_alive = o.keys.nodes[c].below.any_outside(f.seen);
      } else if (b == '"' && o.keys.nodes[f.pos].term != k_none) {
        const int32_t p = o.keys.nodes[f.pos].term;  // the key is declared property p
        if (!o.usable.has(p) || f.seen.has(p)) return false;
        f.seen.set(p);
        f.pos = p, f.state = o_colon, f.ws = 0;
        set(i, f);
        return true;
      }
    }
    if (free == scan_close) {
      f.pos = k_none, f.state = o_colon, f.ws = 0;
      set(i, f);
      return true;
    }
    if (!declared_alive && free != scan_ok) return false;
    f.pos = pos, f.sub = sub, f.state = free == scan_ok ? o_key : o_key_declared;
    set(i, f);
    return true;
  }

  const grammar_data& g_;
  std::vector<json_frame>& st_;
  std::vector<undo_entry>& log_;
};

bool stack_complete(const grammar_data& g, const std::vector<json_frame>& st) {
  if (st.size() == 1) return st[0].state == r_done;
  if (st.size() != 2) return false;
  const json_frame& f = st[1];
  if (f.kind == k_number) return number_terminal(f.state);
  if (f.kind == k_literal) return g.literals[g.nodes[f.node].rule].trie.nodes[f.pos].term != k_none;
  return false;
}

json_frame root_frame(int32_t value_node) {
  json_frame f{};
  f.node = value_node, f.kind = k_root, f.state = r_start;
  return f;
}

std::vector<undo_entry>& scratch_log() {
  thread_local std::vector<undo_entry> log;
  log.clear();
  return log;
}

}  // namespace

namespace guided_detail {

bool accepts_value(const grammar_data& g, int32_t v, std::string_view bytes) {
  std::vector<json_frame> st{root_frame(v)};
  std::vector<undo_entry> log;
  machine m(g, st, log);
  for (char c : bytes)
    if (!m.step(static_cast<uint8_t>(c))) return false;
  return stack_complete(g, st);
}

void build_tries(grammar_data& g) {
  for (object_rule& o : g.objects) {
    o.keys = {};
    o.keys.nodes.emplace_back();
    for (size_t p = 0; p < o.names.size(); ++p) o.keys.insert(o.names[p], static_cast<int32_t>(p));
    for (size_t p = 0; p < o.names.size(); ++p) {
      if (!o.usable.has(static_cast<int32_t>(p))) continue;
      int32_t n = 0;
      o.keys.nodes[0].below.set(static_cast<int32_t>(p));
      for (char c : o.names[p]) {
        n = o.keys.child(n, static_cast<uint8_t>(c));
        o.keys.nodes[n].below.set(static_cast<int32_t>(p));
      }
    }
  }
  for (literal_rule& l : g.literals) {
    l.trie = {};
    l.trie.nodes.emplace_back();
    for (const auto& v : l.values) l.trie.insert(v, 0);
  }
}

int32_t add_any_value(grammar_data& g) {
  const auto v = static_cast<int32_t>(g.values.size());
  g.values.emplace_back();
  auto add = [&](typed_node n) {
    g.nodes.push_back(n);
    return static_cast<int32_t>(g.nodes.size() - 1);
  };
  object_rule o;
  o.additional = v;
  g.objects.push_back(std::move(o));
  literal_rule l;
  for (const char* s : {"true", "false", "null"}) l.candidates.emplace_back(s, k_none), l.values.emplace_back(s);
  g.literals.push_back(std::move(l));
  const int32_t obj = add({.kind = node_kind::object, .rule = static_cast<int32_t>(g.objects.size() - 1)});
  const int32_t arr = add({.kind = node_kind::array, .items = v});
  const int32_t str = add({.kind = node_kind::string});
  const int32_t num = add({.kind = node_kind::number});
  const int32_t lit = add({.kind = node_kind::literal, .rule = static_cast<int32_t>(g.literals.size() - 1)});
  auto& first = g.values[v].first;
  first['{'] = obj, first['['] = arr, first['"'] = str, first['-'] = num;
  for (int c = '0'; c <= '9'; ++c) first[c] = num;
  first['t'] = first['f'] = first['n'] = lit;
  return v;
}

}  // namespace guided_detail

std::shared_ptr<const json_grammar> json_grammar::any_object() {
  static const std::shared_ptr<const json_grammar> g = [] {
    grammar_data d;
    const int32_t any = add_any_value(d);
    d.root = static_cast<int32_t>(d.values.size());
    d.values.emplace_back();
    d.values[d.root].first['{'] = d.values[any].first['{'];
    build_tries(d);
    return std::make_shared<const json_grammar>(std::move(d));
  }();
  return g;
}

json_matcher::json_matcher(std::shared_ptr<const json_grammar> g) : g_(std::move(g)) {
  if (!g_) throw std::invalid_argument("json_matcher: null grammar");
  stack_.push_back(root_frame(g_->data().root));
}

bool json_matcher::advance(uint8_t byte) {
  auto& log = scratch_log();
  machine m(g_->data(), stack_, log);
  if (m.step(byte)) return true;
  m.rollback(0);
  return false;
}

bool json_matcher::advance(std::string_view bytes) {
  auto& log = scratch_log();
  machine m(g_->data(), stack_, log);
  for (char c : bytes) {
    if (!m.step(static_cast<uint8_t>(c))) {
      m.rollback(0);
      return false;
    }
  }
  return true;
}

bool json_matcher::complete() const { return stack_complete(g_->data(), stack_); }

bool json_matcher::can_continue() const {
  std::vector<json_frame> st = stack_;
  auto& log = scratch_log();
  machine m(g_->data(), st, log);
  for (int b = 0; b < 256; ++b) {
    if (m.step(static_cast<uint8_t>(b))) return true;
    m.rollback(0);
  }
  return false;
}

token_trie::token_trie(const std::vector<std::string>& token_bytes)
    : vocab_size_(static_cast<int64_t>(token_bytes.size())) {
  if (token_bytes.size() > static_cast<size_t>(INT32_MAX))
    throw std::invalid_argument("token_trie: more than 2^31 - 1 tokens");
  std::vector<int32_t> order;
  for (size_t id = 0; id < token_bytes.size(); ++id)
    if (!token_bytes[id].empty()) order.push_back(static_cast<int32_t>(id));
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return token_bytes[a] < token_bytes[b]; });
  nodes_.push_back({0, 0, 0, 0});
  std::vector<int32_t> path{0};  // path[d] = the node at depth d of the last token
  std::string_view prev;
  for (int32_t id : order) {
    const std::string_view s = token_bytes[id];
    size_t l = 0;
    while (l < s.size() && l < prev.size() && s[l] == prev[l]) ++l;
    for (; path.size() > l + 1; path.pop_back()) nodes_[path.back()].end = static_cast<int32_t>(nodes_.size());
    for (size_t k = l; k < s.size(); ++k) {
      path.push_back(static_cast<int32_t>(nodes_.size()));
      nodes_.push_back({0, static_cast<int32_t>(ids_.size()), static_cast<int32_t>(k + 1), static_cast<uint8_t>(s[k])});
      if (nodes_.size() > static_cast<size_t>(INT32_MAX) - 1)
        throw std::invalid_argument("token_trie: more than 2^31 - 2 trie nodes");
    }
    max_depth_ = std::max(max_depth_, static_cast<int32_t>(s.size()));
    ids_.push_back(id);
    prev = s;
  }
  for (; !path.empty(); path.pop_back()) nodes_[path.back()].end = static_cast<int32_t>(nodes_.size());
  nodes_.push_back({static_cast<int32_t>(nodes_.size()), static_cast<int32_t>(ids_.size()), 0, 0});  // sentinel
}

void json_allowed_tokens(const json_matcher& m, const token_trie& t, std::vector<uint8_t>& mask) {
  mask.assign(static_cast<size_t>(t.vocab_size_), 0);
  thread_local std::vector<json_frame> st;
  thread_local std::vector<size_t> marks;  // marks[d]: the log size once the node at depth d was reached
  auto& log = scratch_log();
  st = m.stack_;
  marks.assign(static_cast<size_t>(t.max_depth_) + 1, 0);
  machine mc(m.g_->data(), st, log);
  const token_trie::node* nodes = t.nodes_.data();
  const int32_t* ids = t.ids_.data();
  const auto n = static_cast<int32_t>(t.nodes_.size()) - 1;  // the sentinel
  uint8_t* out = mask.data();
  for (int32_t i = 1; i < n;) {
    const token_trie::node& nd = nodes[i];
    mc.rollback(marks[nd.depth - 1]);
    if (!mc.step(nd.byte)) {
      i = nd.end;  // no token below can be allowed
      continue;
    }
    marks[nd.depth] = log.size();
    for (int32_t k = nd.tok_begin, e = nodes[i + 1].tok_begin; k < e; ++k) out[ids[k]] = 1;
    ++i;
  }
}

}  // namespace troupe::elastic
