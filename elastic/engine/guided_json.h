// elastic/engine/guided_json.h — guided decoding for response_format json_object / json_schema: token masks.
//
//   auto g = json_grammar::from_schema(request["response_format"]["json_schema"]["schema"]);  // or any_object()
//   token_trie trie(tokenizer_token_bytes);          // once per tokenizer; "" for special tokens
//   json_matcher m(g);                               // one per sequence
//   std::vector<uint8_t> mask;
//   json_allowed_tokens(m, trie, mask);              // mask[id] = 1: token id keeps the output valid
//   // sample among the allowed ids (eos only if m.complete()), then:
//   m.advance(token_bytes[id]);                      // true for any id the mask allowed
//   if (m.complete() && !m.can_continue()) { /* only eos may follow */ }
//
// Invariants:
//   1. Byte level, RFC 8259; every accepted prefix can still be completed to a whole value of the grammar.
//      Strings hold well-formed UTF-8 (no overlongs, surrogates, code points > U+10FFFF), no raw bytes < 0x20,
//      the JSON escapes, and \uD800-\uDBFF only followed by a low-surrogate escape (as strict parsers want).
//   2. Whitespace where JSON allows it, at most 32 bytes in a row, none after the top-level value. A top-level
//      number is complete once it is valid and can_continue() while it may still grow.
//   3. advance() is all or nothing. json_allowed_tokens leaves m alone and equals, token by token, "a copy of
//      m advances over all of the token's bytes"; "" tokens are never allowed.
//   4. Declared keys match byte for byte as nlohmann dump() escapes them, once each; undeclared keys in such
//      objects may not use \u or \/ (no second spelling of a declared name). Repeated undeclared keys pass.
//   5. enum / const: exactly one value as compact dump() writes it, among those the sibling keywords accept.
//   6. anyOf / oneOf / type arrays: alternatives must start with different bytes; anyOf also merges number ⊇
//      integer, nested string lengths, enums, and an enum inside a string / number alternative. Else guided_error.
//   7. A json_grammar is immutable and shared across threads; a json_matcher is one 32-byte json_frame per
//      open value.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace troupe::elastic {

// Thrown for a schema this module does not support or that is malformed. `path` names where, dotted from
// the schema root ("properties.age.pattern", "items.anyOf[1]", "" for the root).
class guided_error : public std::runtime_error {
 public:
  guided_error(std::string path, std::string message);
  std::string path;
};

namespace guided_detail {

inline constexpr int32_t k_none = -1;
inline constexpr int32_t k_max_properties = 128;  // declared properties per object
inline constexpr uint8_t k_max_whitespace = 32;   // whitespace bytes in a row

struct prop_bits {  // a set of property indices < k_max_properties
  uint64_t w[2] = {0, 0};
  bool has(int32_t i) const { return (w[i >> 6] >> (i & 63)) & 1; }
  void set(int32_t i) { w[i >> 6] |= uint64_t{1} << (i & 63); }
  bool any_outside(const prop_bits& o) const { return (w[0] & ~o.w[0]) | (w[1] & ~o.w[1]); }  // this \ o ≠ ∅
  bool operator==(const prop_bits&) const = default;
};

// A byte trie over a few strings (property names, enum values); edges sorted by byte.
struct byte_trie {
  struct node {
    std::vector<std::pair<uint8_t, int32_t>> edges;
    int32_t term = k_none;  // the string that ends here (property index / 0 for literals), k_none if none
    prop_bits below;        // property tries: the usable properties whose names pass through here
  };
  std::vector<node> nodes;  // nodes[0] = the empty prefix
  int32_t child(int32_t n, uint8_t b) const;
  void insert(std::string_view s, int32_t term);
};

enum class node_kind : uint8_t { object, array, string, number, literal };

struct typed_node {  // what a value is once its first byte is known
  node_kind kind = node_kind::number;
  bool integer = false;                              // number: no fraction or exponent
  bool counted = false;                              // string: min_length / max_length apply
  uint32_t min_length = 0, max_length = UINT32_MAX;  // string, in characters
  uint32_t min_items = 0, max_items = UINT32_MAX;    // array
  int32_t items = k_none;                            // array: the value node of its items (k_none: no item possible)
  int32_t rule = k_none;                             // object: index into objects; literal: index into literals
};

struct object_rule {
  std::vector<std::string> names;  // declared properties, JSON-escaped (no quotes)
  std::vector<int32_t> values;     // their value nodes
  prop_bits required, usable;      // usable: the property's schema accepts some value
  int32_t additional = k_none;     // value node for undeclared keys; k_none: none allowed
  byte_trie keys;                  // names; term = property index
};

struct literal_rule {
  std::vector<std::pair<std::string, int32_t>> candidates;  // (dump(), value node it must also match or k_none)
  std::vector<std::string> values;                          // the candidates that passed
  byte_trie trie;                                           // values; term = 0
  std::string path;                                         // schema path, for errors
};

struct value_node {  // a value position: first byte -> typed node (k_none: no value starts so)
  std::array<int32_t, 256> first;
  value_node() { first.fill(k_none); }
};

struct grammar_data {
  std::vector<value_node> values;
  std::vector<typed_node> nodes;
  std::vector<object_rule> objects;
  std::vector<literal_rule> literals;
  int32_t root = k_none;  // value node
};

// One open value in the matcher. Trivially copyable, no padding.
struct json_frame {
  int32_t node;    // typed node; the root frame: the root value node
  int32_t pos;     // literal: trie node; object key: key trie node (k_none: no declared name fits);
                   // object value: property index (k_none: undeclared key)
  uint32_t count;  // string: characters so far (when counted); array: items so far
  uint8_t kind;    // frame_kind (guided_json.cpp)
  uint8_t state;   // position within the value
  uint8_t sub;     // string / key scanner: escape and UTF-8 progress
  uint8_t ws;      // whitespace bytes in a row
  prop_bits seen;  // object: declared properties used
  bool operator==(const json_frame&) const = default;
};

// Whether bytes form one whole value of value node v of g (g may still be under construction).
bool accepts_value(const grammar_data& g, int32_t v, std::string_view bytes);
// Adds the value node "any JSON value" (with its object, array, string, number and true/false/null nodes).
int32_t add_any_value(grammar_data& g);
// Fills the trie of every object_rule (names below usable) and literal_rule (values).
void build_tries(grammar_data& g);

}  // namespace guided_detail

class token_trie;

class json_grammar {  // immutable once built; shared by many matchers (thread-safe to share)
 public:
  // json_object: any JSON object at the top level.
  static std::shared_ptr<const json_grammar> any_object();
  // json_schema: the schema itself (not the {"name", "schema", "strict"} wrapper). Throws guided_error.
  static std::shared_ptr<const json_grammar> from_schema(const nlohmann::json& schema);

  const guided_detail::grammar_data& data() const { return data_; }
  explicit json_grammar(guided_detail::grammar_data d) : data_(std::move(d)) {}

 private:
  guided_detail::grammar_data data_;
};

class json_matcher {  // the state of one generated sequence; cheap to copy
 public:
  explicit json_matcher(std::shared_ptr<const json_grammar> g);
  bool advance(uint8_t byte);            // false: not allowed here; the state is unchanged then
  bool advance(std::string_view bytes);  // all or nothing: false leaves the state unchanged
  bool complete() const;                 // the bytes so far form one whole value of the grammar
  bool can_continue() const;             // some byte may still follow
  int64_t depth() const { return static_cast<int64_t>(stack_.size()) - 1; }        // open values
  const std::vector<guided_detail::json_frame>& frames() const { return stack_; }  // [0] = the root frame
  bool operator==(const json_matcher& o) const { return g_ == o.g_ && stack_ == o.stack_; }

 private:
  friend void json_allowed_tokens(const json_matcher& m, const token_trie& t, std::vector<uint8_t>& mask);
  std::shared_ptr<const json_grammar> g_;
  std::vector<guided_detail::json_frame> stack_;  // [0] = the root frame
};

class token_trie {  // the vocabulary as a byte trie in preorder, built once per tokenizer
 public:
  // token_bytes[id] = the raw bytes of token id (may be a partial UTF-8 character); "" = never allowed
  // inside JSON (special tokens such as BOS/EOS).
  explicit token_trie(const std::vector<std::string>& token_bytes);
  int64_t vocab_size() const { return vocab_size_; }
  int64_t num_nodes() const { return static_cast<int64_t>(nodes_.size()) - 1; }  // the empty prefix included

 private:
  friend void json_allowed_tokens(const json_matcher& m, const token_trie& t, std::vector<uint8_t>& mask);
  struct node {
    int32_t end;        // one past the last node of this subtree
    int32_t tok_begin;  // ids_[tok_begin, next node's tok_begin) end exactly here
    int32_t depth;      // bytes from the root
    uint8_t byte;       // the edge into this node
  };
  int64_t vocab_size_ = 0;
  int32_t max_depth_ = 0;
  std::vector<node> nodes_;  // preorder; [0] = the empty prefix; a sentinel at the back
  std::vector<int32_t> ids_;
};

// mask (resized to vocab_size) [id] = 1 when all of token id's bytes may follow m's state, else 0.
// Never touches m. The end-of-sequence token is the caller's business (allowed iff m.complete()).
void json_allowed_tokens(const json_matcher& m, const token_trie& t, std::vector<uint8_t>& mask);

}  // namespace troupe::elastic
