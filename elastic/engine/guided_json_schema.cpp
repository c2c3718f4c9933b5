// elastic/engine/guided_json_schema.cpp — compiles the supported JSON Schema subset into a json_grammar.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string_view>

#include "elastic/engine/guided_json.h"

namespace troupe::elastic {

using json = nlohmann::json;
using namespace guided_detail;

namespace {

const std::set<std::string_view> k_annotations = {"title",      "description", "default",  "examples",
                                                  "$schema",    "$id",         "$comment", "strict",
                                                  "deprecated", "readOnly",    "writeOnly"};
const std::set<std::string_view> k_keywords = {"type",  "properties",  "required",  "additionalProperties",
                                               "items", "minItems",    "maxItems",  "enum",
                                               "const", "anyOf",       "oneOf",     "$ref",
                                               "$defs", "definitions", "minLength", "maxLength"};
constexpr const char* k_supported =
    "guided decoding supports type, properties, required, additionalProperties, items, minItems, maxItems, "
    "enum, const, anyOf, oneOf, $ref (#/$defs/NAME), $defs, definitions, minLength, maxLength, and the "
    "annotations title, description, default, examples, $schema, $id, $comment, strict, deprecated, readOnly, "
    "writeOnly";

std::string join(const std::string& path, std::string_view key) {
  return path.empty() ? std::string(key) : path + "." + std::string(key);
}

std::string byte_name(int b) {
  return b > 0x20 && b < 0x7f ? fmt::format("'{}'", char(b)) : fmt::format("0x{:02x}", b);
}

enum type_bit : uint8_t {
  t_object = 1,
  t_array = 2,
  t_string = 4,
  t_number = 8,
  t_integer = 16,
  t_boolean = 32,
  t_null = 64,
  t_all = t_object | t_array | t_string | t_number | t_boolean | t_null
};

bool has_any(const json& s, std::initializer_list<const char*> keys) {
  for (const char* k : keys)
    if (s.contains(k)) return true;
  return false;
}

class compiler {
 public:
  explicit compiler(const json& root) : root_(root) {
    any_ = add_any_value(g_);
    done_.assign(g_.values.size(), 1);
    const auto& f = g_.values[any_].first;
    any_object_ = f['{'], any_array_ = f['['], any_string_ = f['"'], any_number_ = f['0'];
    any_integer_ = add_node({.kind = node_kind::number, .integer = true});
    bool_ = add_literal({"true", "false"}, "type");
    null_ = add_literal({"null"}, "type");
    scratch_ = new_value();
  }

  grammar_data build() {
    if (root_.is_object()) {
      for (const char* defs : {"$defs", "definitions"}) {
        if (!root_.contains(defs)) continue;
        if (!root_[defs].is_object()) throw guided_error(defs, "must be an object of named schemas");
        for (const auto& [name, sub] : root_[defs].items())
          resolve_ref(json(fmt::format("#/{}/{}", defs, escape_pointer(name))), "");
      }
    }
    g_.root = compile(root_, "");
    filter_literals();
    prune_unsatisfiable();
    return std::move(g_);
  }

 private:
  int32_t new_value() {
    g_.values.emplace_back();
    done_.push_back(0);
    return static_cast<int32_t>(g_.values.size() - 1);
  }
  int32_t add_node(typed_node n) {
    g_.nodes.push_back(n);
    return static_cast<int32_t>(g_.nodes.size() - 1);
  }
  int32_t add_literal(std::vector<std::string> values, std::string path) {
    literal_rule l;
    for (auto& v : values) l.candidates.emplace_back(std::move(v), k_none);
    l.path = std::move(path);
    g_.literals.push_back(std::move(l));
    return add_node({.kind = node_kind::literal, .rule = static_cast<int32_t>(g_.literals.size() - 1)});
  }

  static std::string escape_pointer(const std::string& s) {
    std::string r;
    for (char c : s) r += c == '~' ? "~0" : c == '/' ? "~1" : std::string(1, c);
    return r;
  }

  // A value node for schema s: a pure $ref is the node of its target, anything else a new node.
  int32_t compile(const json& s, const std::string& path) {
    if (s.is_object() && s.contains("$ref") && !has_any(s, {"enum", "const"})) {
      check_keywords(s, path);
      only_with(s, path, "$ref");
      return resolve_ref(s["$ref"], path);
    }
    const int32_t v = new_value();
    fill(s, path, v);
    done_[v] = 1;
    return v;
  }

  int32_t resolve_ref(const json& ref, const std::string& path) {
    const std::string where = join(path, "$ref");
    if (!ref.is_string()) throw guided_error(where, "must be a string such as \"#/$defs/NAME\"");
    const std::string r = ref.get<std::string>();
    if (auto it = refs_.find(r); it != refs_.end()) return it->second;
    if (r.empty() || r[0] != '#')
      throw guided_error(where, fmt::format("'{}': only references inside the schema (#/$defs/NAME, "
                                            "#/definitions/NAME) are supported",
                                            r));
    const json* target = nullptr;
    std::string target_path;
    try {
      const json::json_pointer ptr(r.substr(1));
      if (root_.contains(ptr)) target = &root_.at(ptr);
    } catch (const json::exception&) {
    }
    if (target == nullptr) throw guided_error(where, fmt::format("'{}' points nowhere in the schema", r));
    for (size_t i = 2; i < r.size();) {  // "#/a/b~1c" -> "a.b/c"
      const size_t j = std::min(r.find('/', i), r.size());
      std::string tok;  // JSON pointer unescaping: ~1 is '/', ~0 is '~'
      for (size_t k = i; k < j; ++k) {
        if (r[k] == '~' && k + 1 < j && (r[k + 1] == '0' || r[k + 1] == '1')) {
          tok += r[k + 1] == '1' ? '/' : '~';
          ++k;
        } else {
          tok += r[k];
        }
      }
      target_path = join(target_path, tok);
      i = j + 1;
    }
    const int32_t v = new_value();
    refs_[r] = v;
    fill(*target, target_path, v);
    done_[v] = 1;
    return v;
  }

  void check_keywords(const json& s, const std::string& path) {
    for (const auto& [k, unused] : s.items())
      if (!k_annotations.count(k) && !k_keywords.count(k))
        throw guided_error(join(path, k),
                           fmt::format("'{}' is not supported for guided decoding ({})", k, k_supported));
  }

  // s may hold kw, annotations and $defs, nothing that constrains next to kw.
  void only_with(const json& s, const std::string& path, std::string_view kw) {
    for (const auto& [k, unused] : s.items())
      if (k != kw && !k_annotations.count(k) && k != "$defs" && k != "definitions")
        throw guided_error(join(path, k), fmt::format("'{}' next to '{}' is not supported for guided decoding: "
                                                      "move it into the {} schemas",
                                                      k, kw, kw));
  }

  void fill(const json& s, const std::string& path, int32_t out) {
    if (s.is_boolean()) {  // true: any value; false: none
      if (s.get<bool>()) g_.values[out] = g_.values[any_];
      done_[out] = 1;
      return;
    }
    if (!s.is_object()) throw guided_error(path, "a schema must be an object or a boolean");
    check_keywords(s, path);
    if (has_any(s, {"enum", "const"})) return fill_enum(s, path, out);
    if (s.contains("$ref")) {
      only_with(s, path, "$ref");
      const int32_t q = resolve_ref(s["$ref"], path);
      if (!done_[q]) throw guided_error(join(path, "$ref"), "a $ref cycle with no object or array in between");
      g_.values[out] = g_.values[q];
      done_[out] = 1;
      return;
    }
    if (has_any(s, {"anyOf", "oneOf"})) return fill_union(s, path, out);
    fill_typed(s, path, out);
  }

  uint8_t parse_types(const json& s, const std::string& path) {
    if (!s.contains("type")) return t_all;
    const std::string where = join(path, "type");
    auto one = [&](const json& t, const std::string& p) -> uint8_t {
      static const std::map<std::string, uint8_t> names = {
          {"object", t_object},   {"array", t_array},     {"string", t_string}, {"number", t_number},
          {"integer", t_integer}, {"boolean", t_boolean}, {"null", t_null}};
      auto it = t.is_string() ? names.find(t.get<std::string>()) : names.end();
      if (it == names.end())
        throw guided_error(p, fmt::format("{} is not a type: use object, array, string, number, integer, boolean "
                                          "or null",
                                          t.dump()));
      return it->second;
    };
    const json& t = s["type"];
    if (t.is_string()) return one(t, where);
    if (!t.is_array() || t.empty()) throw guided_error(where, "must be a type name or a non-empty array of type names");
    uint8_t r = 0;
    for (size_t i = 0; i < t.size(); ++i) r |= one(t[i], fmt::format("{}[{}]", where, i));
    return r;
  }

  // A non-negative integer keyword, or dflt when absent.
  uint32_t parse_count(const json& s, const std::string& path, const char* key, uint32_t dflt) {
    if (!s.contains(key)) return dflt;
    const json& v = s[key];
    const bool integral =
        v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0) ||
        (v.is_number_float() && v.get<double>() >= 0 && std::floor(v.get<double>()) == v.get<double>());
    if (!integral) throw guided_error(join(path, key), fmt::format("must be a non-negative integer, not {}", v.dump()));
    const double d = v.get<double>();
    return d >= double(UINT32_MAX) ? UINT32_MAX : static_cast<uint32_t>(d);
  }

  // The typed nodes and the first-byte table are made before the contents are compiled, so that a $ref back
  // to this schema from inside it (a recursive object or array) already sees how its values start.
  void fill_typed(const json& s, const std::string& path, int32_t out) {
    uint8_t types = parse_types(s, path);
    if (types & t_number) types &= ~t_integer;
    const bool obj_kw = has_any(s, {"properties", "required", "additionalProperties"});
    const bool arr_kw = has_any(s, {"items", "minItems", "maxItems"});
    const int32_t obj = obj_kw ? add_node({.kind = node_kind::object}) : any_object_;
    const int32_t arr = arr_kw ? add_node({.kind = node_kind::array}) : any_array_;
    const int32_t str = string_node(s, path);
    value_node v;
    if (types & t_object) v.first['{'] = obj;
    if (types & t_array) v.first['['] = arr;
    if (types & t_string) v.first['"'] = str;
    if (types & (t_number | t_integer)) {
      const int32_t num = types & t_number ? any_number_ : any_integer_;
      v.first['-'] = num;
      for (int c = '0'; c <= '9'; ++c) v.first[c] = num;
    }
    if (types & t_boolean) v.first['t'] = v.first['f'] = bool_;
    if (types & t_null) v.first['n'] = null_;
    g_.values[out] = v;
    done_[out] = 1;
    if (obj_kw) fill_object(s, path, obj);
    if (arr_kw) fill_array(s, path, arr);
  }

  void fill_object(const json& s, const std::string& path, int32_t node) {
    object_rule o;
    std::vector<std::string> raw;
    if (s.contains("properties")) {
      const json& props = s["properties"];
      const std::string where = join(path, "properties");
      if (!props.is_object()) throw guided_error(where, "must be an object mapping names to schemas");
      for (const auto& [name, sub] : props.items()) {
        const int32_t v = compile(sub, join(where, name));
        raw.push_back(name);
        o.values.push_back(v);
      }
    }
    o.additional = any_;
    if (s.contains("additionalProperties")) {
      const json& a = s["additionalProperties"];
      if (a.is_boolean())
        o.additional = a.get<bool>() ? any_ : k_none;
      else if (a.is_object())
        o.additional = compile(a, join(path, "additionalProperties"));
      else
        throw guided_error(join(path, "additionalProperties"), "must be a boolean or a schema");
    }
    if (s.contains("required")) {
      const json& req = s["required"];
      const std::string where = join(path, "required");
      if (!req.is_array()) throw guided_error(where, "must be an array of property names");
      for (size_t i = 0; i < req.size(); ++i) {
        if (!req[i].is_string())
          throw guided_error(where, fmt::format("[{}] = {} is not a property name", i, req[i].dump()));
        const std::string name = req[i].get<std::string>();
        auto it = std::find(raw.begin(), raw.end(), name);
        if (it == raw.end()) {
          if (o.additional == k_none)
            throw guided_error(where, fmt::format("'{}' is required but is not in properties and additionalProperties "
                                                  "is false, so no object can match",
                                                  name));
          raw.push_back(name);
          o.values.push_back(o.additional);
          it = raw.end() - 1;
        }
        if (raw.size() <= size_t(k_max_properties)) o.required.set(static_cast<int32_t>(it - raw.begin()));
      }
    }
    if (raw.size() > size_t(k_max_properties))
      throw guided_error(join(path, "properties"), fmt::format("{} properties: guided decoding supports at most {} "
                                                               "per object",
                                                               raw.size(), k_max_properties));
    for (const auto& name : raw) {
      const std::string d = json(name).dump();
      o.names.push_back(d.substr(1, d.size() - 2));
    }
    g_.objects.push_back(std::move(o));
    g_.nodes[node].rule = static_cast<int32_t>(g_.objects.size() - 1);
  }

  void fill_array(const json& s, const std::string& path, int32_t node) {
    typed_node n{.kind = node_kind::array, .items = any_};
    if (s.contains("items")) {
      const json& it = s["items"];
      if (!it.is_object() && !it.is_boolean())
        throw guided_error(join(path, "items"),
                           "must be a schema (tuple forms such as an array of schemas or "
                           "prefixItems are not supported for guided decoding)");
      n.items = compile(it, join(path, "items"));
    }
    n.min_items = parse_count(s, path, "minItems", 0);
    n.max_items = parse_count(s, path, "maxItems", UINT32_MAX);
    if (n.min_items > n.max_items)
      throw guided_error(join(path, "minItems"), fmt::format("minItems {} is greater than maxItems {}, so no array "
                                                             "can match",
                                                             n.min_items, n.max_items));
    g_.nodes[node] = n;
  }

  int32_t string_node(const json& s, const std::string& path) {
    if (!has_any(s, {"minLength", "maxLength"})) return any_string_;
    typed_node n{.kind = node_kind::string, .counted = true};
    n.min_length = parse_count(s, path, "minLength", 0);
    n.max_length = parse_count(s, path, "maxLength", UINT32_MAX);
    if (n.min_length > n.max_length)
      throw guided_error(join(path, "minLength"), fmt::format("minLength {} is greater than maxLength {}, so no "
                                                              "string can match",
                                                              n.min_length, n.max_length));
    return add_node(n);
  }

  // enum / const: a literal node over the values' dump()s; the rest of the schema filters them (build()).
  void fill_enum(const json& s, const std::string& path, int32_t out) {
    std::vector<json> vals;
    std::string where = join(path, "enum");
    if (s.contains("enum")) {
      const json& e = s["enum"];
      if (!e.is_array() || e.empty()) throw guided_error(where, "must be a non-empty array of values");
      vals.assign(e.begin(), e.end());
    }
    if (s.contains("const")) {
      const json& c = s["const"];
      if (s.contains("enum")) {
        std::erase_if(vals, [&](const json& v) { return v != c; });
        if (vals.empty())
          throw guided_error(join(path, "const"), "is not one of the enum values, so nothing can match");
      } else {
        vals = {c};
        where = join(path, "const");
      }
    }
    literal_rule l;
    l.path = where;
    value_node v;
    const auto node = static_cast<int32_t>(g_.nodes.size());
    for (const json& x : vals) {
      std::string d;
      try {
        d = x.dump();
      } catch (const json::exception& e) {
        throw guided_error(where, fmt::format("a value cannot be serialized: {}", e.what()));
      }
      if (std::find_if(l.candidates.begin(), l.candidates.end(), [&](const auto& c) { return c.first == d; }) !=
          l.candidates.end())
        continue;
      v.first[static_cast<uint8_t>(d[0])] = node;
      l.candidates.emplace_back(std::move(d), k_none);
    }
    g_.literals.push_back(std::move(l));
    const auto rule = static_cast<int32_t>(g_.literals.size() - 1);
    add_node({.kind = node_kind::literal, .rule = rule});
    g_.values[out] = v;
    done_[out] = 1;
    json rest = s;  // the other keywords: the values must match them too
    rest.erase("enum");
    rest.erase("const");
    bool constrained = false;
    for (const auto& [k, unused] : rest.items())
      constrained |= !k_annotations.count(k) && k != "$defs" && k != "definitions";
    if (!constrained) return;
    const int32_t c = compile(rest, path);
    for (auto& cand : g_.literals[rule].candidates) cand.second = c;
  }

  void fill_union(const json& s, const std::string& path, int32_t out) {
    if (s.contains("anyOf") && s.contains("oneOf"))
      throw guided_error(join(path, "oneOf"), "anyOf and oneOf in one schema are not supported for guided decoding");
    const bool exclusive = s.contains("oneOf");
    const char* kw = exclusive ? "oneOf" : "anyOf";
    only_with(s, path, kw);
    const std::string where = join(path, kw);
    const json& alts = s[kw];
    if (!alts.is_array() || alts.empty()) throw guided_error(where, "must be a non-empty array of schemas");
    std::vector<int32_t> ids;
    for (size_t i = 0; i < alts.size(); ++i) {
      const std::string p = fmt::format("{}[{}]", where, i);
      const int32_t v = compile(alts[i], p);
      if (!done_[v]) throw guided_error(p, "a $ref cycle with no object or array in between");
      ids.push_back(v);
    }
    std::array<int32_t, 256> acc, from;
    acc.fill(k_none);
    for (size_t k = 0; k < ids.size(); ++k) {
      for (int b = 0; b < 256; ++b) {
        const int32_t t = g_.values[ids[k]].first[b];
        if (t == k_none) continue;
        if (acc[b] == k_none) {
          acc[b] = t, from[b] = static_cast<int32_t>(k);
          continue;
        }
        const int32_t m = exclusive ? k_none : combine(acc[b], t, static_cast<uint8_t>(b));
        if (m == k_none)
          throw guided_error(
              where,
              fmt::format(
                  "alternatives {} and {} can both start with {}: guided decoding supports {} alternatives that start "
                  "with different bytes (object, array, string, number, true/false, null, or enums that differ){}",
                  from[b], k, byte_name(b), kw,
                  exclusive ? "" : ", or where one contains the other (number and integer, strings, enums)"));
        acc[b] = m;
      }
    }
    g_.values[out].first = acc;
    done_[out] = 1;
  }

  // One typed node for anyOf alternatives a and b that both start with byte first, or k_none.
  int32_t combine(int32_t a, int32_t b, uint8_t first) {
    if (a == b) return a;
    const typed_node x = g_.nodes[a], y = g_.nodes[b];
    if (x.kind == node_kind::number && y.kind == node_kind::number) return x.integer ? b : a;
    if (x.kind == node_kind::string && y.kind == node_kind::string) {
      if (x.min_length <= y.min_length && x.max_length >= y.max_length) return a;
      if (y.min_length <= x.min_length && y.max_length >= x.max_length) return b;
      return k_none;
    }
    if (x.kind == node_kind::literal && y.kind == node_kind::literal) {
      auto key = std::make_pair(a, b);
      if (auto it = merged_.find(key); it != merged_.end()) return it->second;
      literal_rule l = g_.literals[x.rule];
      for (const auto& c : g_.literals[y.rule].candidates)
        if (std::find(l.candidates.begin(), l.candidates.end(), c) == l.candidates.end()) l.candidates.push_back(c);
      l.path = g_.literals[x.rule].path + " | " + g_.literals[y.rule].path;
      g_.literals.push_back(std::move(l));
      return merged_[key] =
                 add_node({.kind = node_kind::literal, .rule = static_cast<int32_t>(g_.literals.size() - 1)});
    }
    auto within = [&](const typed_node& lit, int32_t other) {  // other accepts every value of lit starting so
      const node_kind k = g_.nodes[other].kind;
      if (k != node_kind::string && k != node_kind::number) return false;
      g_.values[scratch_].first[first] = other;
      for (const auto& [d, unused] : g_.literals[lit.rule].candidates)
        if (static_cast<uint8_t>(d[0]) == first && !accepts_value(g_, scratch_, d)) return false;
      return true;
    };
    if (x.kind == node_kind::literal && within(x, b)) return b;
    if (y.kind == node_kind::literal && within(y, a)) return a;
    return k_none;
  }

  // Keeps the enum values that their schema's other keywords accept, until nothing changes.
  void filter_literals() {
    for (object_rule& o : g_.objects)
      for (size_t p = 0; p < o.names.size(); ++p) o.usable.set(static_cast<int32_t>(p));
    for (literal_rule& l : g_.literals) {
      l.values.clear();
      for (const auto& [d, unused] : l.candidates)
        if (std::find(l.values.begin(), l.values.end(), d) == l.values.end()) l.values.push_back(d);
    }
    build_tries(g_);
    for (bool changed = true; changed;) {
      changed = false;
      for (literal_rule& l : g_.literals) {
        std::vector<std::string> kept;
        for (const auto& [d, c] : l.candidates)
          if ((c == k_none || accepts_value(g_, c, d)) && std::find(kept.begin(), kept.end(), d) == kept.end())
            kept.push_back(d);
        if (kept == l.values) continue;
        l.values = std::move(kept);
        l.trie = {};
        l.trie.nodes.emplace_back();
        for (const auto& d : l.values) l.trie.insert(d, 0);
        changed = true;
      }
    }
    for (const literal_rule& l : g_.literals)
      if (l.values.empty())
        throw guided_error(l.path, "none of the values matches the schema's other keywords, so nothing can match");
  }

  // Least fixpoint of "accepts some finite value"; drops what cannot be completed so that every accepted
  // prefix can be.
  void prune_unsatisfiable() {
    std::vector<uint8_t> sat_t(g_.nodes.size(), 0), sat_v(g_.values.size(), 0);
    for (bool changed = true; changed;) {
      changed = false;
      for (size_t t = 0; t < g_.nodes.size(); ++t) {
        if (sat_t[t]) continue;
        const typed_node& n = g_.nodes[t];
        bool ok = true;
        if (n.kind == node_kind::literal) ok = !g_.literals[n.rule].values.empty();
        if (n.kind == node_kind::array) ok = n.min_items == 0 || (n.items != k_none && sat_v[n.items]);
        if (n.kind == node_kind::object) {
          const object_rule& o = g_.objects[n.rule];
          for (size_t p = 0; p < o.names.size(); ++p)
            if (o.required.has(static_cast<int32_t>(p)) && !sat_v[o.values[p]]) ok = false;
        }
        if (ok) sat_t[t] = 1, changed = true;
      }
      for (size_t v = 0; v < g_.values.size(); ++v) {
        if (sat_v[v]) continue;
        for (int32_t t : g_.values[v].first)
          if (t != k_none && sat_t[t]) {
            sat_v[v] = 1, changed = true;
            break;
          }
      }
    }
    if (!sat_v[g_.root])
      throw guided_error("",
                         "the schema accepts no finite JSON value (a required property or minItems item whose "
                         "schema accepts nothing, possibly through $ref recursion)");
    for (value_node& v : g_.values)
      for (int32_t& t : v.first)
        if (t != k_none && !sat_t[t]) t = k_none;
    for (typed_node& n : g_.nodes)
      if (n.kind == node_kind::array && n.items != k_none && !sat_v[n.items]) n.items = k_none;
    for (object_rule& o : g_.objects) {
      o.usable = {};
      for (size_t p = 0; p < o.names.size(); ++p)
        if (sat_v[o.values[p]]) o.usable.set(static_cast<int32_t>(p));
      if (o.additional != k_none && !sat_v[o.additional]) o.additional = k_none;
    }
    build_tries(g_);
  }

  const json& root_;
  grammar_data g_;
  std::vector<uint8_t> done_;  // per value node: filled (a $ref target under construction is not)
  std::map<std::string, int32_t> refs_;
  std::map<std::pair<int32_t, int32_t>, int32_t> merged_;
  int32_t any_ = k_none, any_object_ = k_none, any_array_ = k_none, any_string_ = k_none, any_number_ = k_none;
  int32_t any_integer_ = k_none, bool_ = k_none, null_ = k_none, scratch_ = k_none;
};

}  // namespace

std::shared_ptr<const json_grammar> json_grammar::from_schema(const nlohmann::json& schema) {
  return std::make_shared<const json_grammar>(compiler(schema).build());
}

}  // namespace troupe::elastic
