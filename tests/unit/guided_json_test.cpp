// Guided JSON decoding (elastic/engine/guided_json.h): documents of many shapes accepted byte by byte and
// complete only at the end, invalid bytes refused at the exact offset (structure, numbers, escapes, UTF-8,
// whitespace cap), the schema subset (required / additionalProperties / enum / $ref recursion / item and
// length bounds / unions) and its guided_error paths, json_allowed_tokens against a brute-force check on a
// random vocabulary in states reached by random walks, and random walks completed into documents that
// nlohmann::json parses and that match the schema (checked by a small independent validator here).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <queue>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "elastic/engine/guided_json.h"

using namespace troupe::elastic;
using json = nlohmann::json;

namespace {

using grammar = std::shared_ptr<const json_grammar>;

grammar schema(const char* s) { return json_grammar::from_schema(json::parse(s)); }

// The offset of the first refused byte; -1: all accepted and complete; -2: all accepted, not complete.
int64_t refused_at(const grammar& g, std::string_view doc) {
  json_matcher m(g);
  for (size_t i = 0; i < doc.size(); ++i)
    if (!m.advance(static_cast<uint8_t>(doc[i]))) return static_cast<int64_t>(i);
  return m.complete() ? -1 : -2;
}

// Every byte accepted, complete() only after the last one (top-level numbers may be complete earlier),
// and nothing may follow a complete object / array / string / literal.
void expect_document(const grammar& g, std::string_view doc) {
  SCOPED_TRACE(std::string(doc));
  json_matcher m(g);
  for (size_t i = 0; i < doc.size(); ++i) {
    ASSERT_TRUE(m.advance(static_cast<uint8_t>(doc[i]))) << "refused at " << i;
    if (i + 1 < doc.size() && m.complete()) {
      const char c = doc[i];
      ASSERT_TRUE(c >= '0' && c <= '9') << "complete early at " << i;
    }
  }
  EXPECT_TRUE(m.complete());
}

std::string expect_guided_error(const char* s) {
  try {
    json_grammar::from_schema(json::parse(s));
  } catch (const guided_error& e) {
    EXPECT_NE(std::string(e.what()).find(e.path), std::string::npos);
    return e.path;
  }
  ADD_FAILURE() << "no guided_error for " << s;
  return "<none>";
}

// --- an independent validator of the supported subset, for walk results -------------------------------
int64_t code_points(const std::string& s) {
  int64_t n = 0;
  for (unsigned char c : s) n += (c & 0xC0) != 0x80;
  return n;
}

bool valid(const json& v, const json& s, const json& root) {
  if (s.is_boolean()) return s.get<bool>();
  if (s.contains("$ref")) return valid(v, root.at(json::json_pointer(s["$ref"].get<std::string>().substr(1))), root);
  if (s.contains("enum") && std::find(s["enum"].begin(), s["enum"].end(), v) == s["enum"].end()) return false;
  if (s.contains("const") && v != s["const"]) return false;
  if (s.contains("anyOf") &&
      std::none_of(s["anyOf"].begin(), s["anyOf"].end(), [&](const json& a) { return valid(v, a, root); }))
    return false;
  if (s.contains("oneOf") &&
      std::count_if(s["oneOf"].begin(), s["oneOf"].end(), [&](const json& a) { return valid(v, a, root); }) != 1)
    return false;
  if (s.contains("type")) {
    const json types = s["type"].is_array() ? s["type"] : json::array({s["type"]});
    auto is = [&](const std::string& t) {
      if (t == "object") return v.is_object();
      if (t == "array") return v.is_array();
      if (t == "string") return v.is_string();
      if (t == "number") return v.is_number();
      if (t == "integer") return v.is_number_integer();
      if (t == "boolean") return v.is_boolean();
      return v.is_null();
    };
    if (std::none_of(types.begin(), types.end(), [&](const json& t) { return is(t.get<std::string>()); })) return false;
  }
  if (v.is_object()) {
    const json props = s.value("properties", json::object());
    for (const auto& r : s.value("required", json::array()))
      if (!v.contains(r.get<std::string>())) return false;
    for (const auto& [k, x] : v.items()) {
      if (props.contains(k)) {
        if (!valid(x, props[k], root)) return false;
      } else if (s.contains("additionalProperties") && !valid(x, s["additionalProperties"], root)) {
        return false;
      }
    }
  }
  if (v.is_array()) {
    if (s.contains("minItems") && v.size() < s["minItems"].get<size_t>()) return false;
    if (s.contains("maxItems") && v.size() > s["maxItems"].get<size_t>()) return false;
    if (s.contains("items"))
      for (const auto& x : v)
        if (!valid(x, s["items"], root)) return false;
  }
  if (v.is_string()) {
    const int64_t n = code_points(v.get<std::string>());
    if (s.contains("minLength") && n < s["minLength"].get<int64_t>()) return false;
    if (s.contains("maxLength") && n > s["maxLength"].get<int64_t>()) return false;
  }
  return true;
}

// --- random vocabulary, brute force, completion by search ----------------------------------------------
std::vector<std::string> random_vocab(uint64_t seed, int64_t n_random) {
  std::mt19937_64 rng(seed);
  std::vector<std::string> v = {"", ""};  // special tokens (BOS / EOS)
  for (int b = 0; b < 256; ++b) v.emplace_back(1, static_cast<char>(b));
  // clang-format off
  const std::vector<std::string> pieces = {
      "{", "}", "[", "]", "{\"", "\":", "\",", "\"}", "\"]", "\":\"", "\",\"", "\": ", ", \"", "},", "}]", "]}",
      "[{", "[[", "]]", "{}", "[]", "\"\"", "12", "345", "-1", "0.", ".5", "e+", "E-", "1e5", "true", "false",
      "null", " true", "tru", "nul", " ", "  ", "    ", std::string(16, ' '), std::string(33, ' '), "\n", "\n  ",
      "\t", "\\", "\\u", "\\n", "\\\"", "\\/", "\\ud83d", "\\ude00", "d83d", "\\u00e9", "\\x", "é", "€", "😀",
      "中文", "\xC3", "\xA9", "\xF0\x9F", "\x98\x80", "\xC0\x80", "\xED\xA0\x80", "\xF4\x90\x80\x80", "name",
      "\"name\":", "age", "\"age\": ", "tags", "\"tags\":[", "email", "children", "value", "kind", "street", "city",
      "\"a\"", "a\\\"b", "red", "\"red\"", "green", "blue", "\"x\"", "\"y\":", "x", "y"};
  // clang-format on
  v.insert(v.end(), pieces.begin(), pieces.end());
  const std::string pool = "{}[]\":,\\ 0123456789-+.eEtrufalsn\"abcxyz";
  for (int64_t i = 0; i < n_random; ++i) {
    std::string s;
    const int len = 1 + static_cast<int>(rng() % 6);
    for (int k = 0; k < len; ++k) {
      const uint64_t r = rng() % 10;
      s += r < 5   ? static_cast<char>(0x20 + rng() % 95)
           : r < 8 ? pool[rng() % pool.size()]
                   : static_cast<char>(rng() % 256);
    }
    v.push_back(s);
  }
  return v;
}

std::vector<uint8_t> brute_force_mask(const json_matcher& m, const std::vector<std::string>& vocab) {
  std::vector<uint8_t> mask(vocab.size(), 0);
  for (size_t id = 0; id < vocab.size(); ++id) {
    if (vocab[id].empty()) continue;
    json_matcher c = m;
    mask[id] = c.advance(vocab[id]);
  }
  return mask;
}

std::string state_key(const json_matcher& m) {
  const auto& f = m.frames();
  return std::string(reinterpret_cast<const char*>(f.data()), f.size() * sizeof(f[0]));
}

// The shortest byte string over `alphabet` that completes m: A* on (bytes so far + open values), an open
// value needing at least one more byte; states deduplicated.
bool complete_by_search(const json_matcher& m, const std::string& alphabet, std::string& out) {
  if (m.complete()) return true;
  struct item {
    int64_t f, seq;
    json_matcher m;
    std::string path;
    bool operator<(const item& o) const { return f != o.f ? f > o.f : seq > o.seq; }  // min-heap
  };
  std::priority_queue<item> q;
  int64_t seq = 0;
  q.push({m.depth(), seq++, m, ""});
  std::unordered_set<std::string> seen{state_key(m)};
  while (!q.empty() && seen.size() < 200000) {
    const item cur = q.top();
    q.pop();
    for (char c : alphabet) {
      json_matcher nx = cur.m;
      if (!nx.advance(static_cast<uint8_t>(c))) continue;
      if (nx.complete()) {
        out += cur.path + c;
        return true;
      }
      if (seen.insert(state_key(nx)).second) {
        const auto len = static_cast<int64_t>(cur.path.size()) + 1;
        q.push({len + nx.depth(), seq++, nx, cur.path + c});
      }
    }
  }
  return false;
}

std::string alphabet_for(const std::string& schema_text) {
  std::string a = "{}[]\":,0123456789-.etrufalsn\\abcdu\x80\x90\xA0";  // + UTF-8 continuation bytes
  for (char c : schema_text)
    if (a.find(c) == std::string::npos) a += c;
  return a;
}

// An exponent of 3 digits or more: nlohmann::json refuses numbers that overflow a double, RFC 8259 does not.
bool long_exponent(const std::string& s) {
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != 'e' && s[i] != 'E') continue;
    size_t j = i + 1;
    if (j < s.size() && (s[j] == '+' || s[j] == '-')) ++j;
    size_t k = j;
    while (k < s.size() && s[k] >= '0' && s[k] <= '9') ++k;
    if (k - j >= 3) return true;
  }
  return false;
}

// Random walks: at every step the mask equals the brute force; a random allowed token is taken (stopping
// at random once complete); then the document is completed by search, parsed and validated.
void walk_and_check(const grammar& g, const json& schema_json, uint64_t seed, int walks, int max_steps) {
  const auto vocab = random_vocab(seed, 3000);
  const token_trie trie(vocab);
  ASSERT_EQ(trie.vocab_size(), static_cast<int64_t>(vocab.size()));
  const std::string alphabet = alphabet_for(schema_json.dump());
  std::mt19937_64 rng(seed * 7919 + 1);
  std::vector<uint8_t> mask;
  int64_t masks = 0;
  std::set<std::string> docs;
  for (int w = 0; w < walks; ++w) {
    json_matcher m(g);
    std::string doc;
    for (int step = 0; step < max_steps; ++step) {
      json_allowed_tokens(m, trie, mask);
      ++masks;
      ASSERT_EQ(mask, brute_force_mask(m, vocab)) << "walk " << w << " after: " << doc;
      std::string unused;
      ASSERT_TRUE(complete_by_search(m, alphabet, unused)) << "a dead end after: " << doc;
      if (m.complete() && rng() % 4 == 0) break;
      std::vector<int32_t> allowed;
      for (size_t id = 0; id < mask.size(); ++id)
        if (mask[id] && !long_exponent(doc.substr(doc.size() - std::min<size_t>(doc.size(), 8)) + vocab[id]))
          allowed.push_back(static_cast<int32_t>(id));
      if (allowed.empty()) {
        ASSERT_TRUE(m.complete()) << "stuck after: " << doc;
        break;
      }
      const int32_t id = allowed[rng() % allowed.size()];
      ASSERT_TRUE(m.advance(vocab[id]));
      doc += vocab[id];
    }
    std::string rest;
    ASSERT_TRUE(complete_by_search(m, alphabet, rest)) << "cannot complete: " << doc;
    ASSERT_TRUE(m.advance(rest));
    doc += rest;
    ASSERT_TRUE(m.complete());
    json v;
    ASSERT_NO_THROW(v = json::parse(doc)) << doc;
    EXPECT_TRUE(valid(v, schema_json, schema_json)) << doc;
    docs.insert(doc);
  }
  EXPECT_GT(masks, 3 * walks);                             // the walks went somewhere
  EXPECT_GE(docs.size(), static_cast<size_t>(walks / 2));  // and not always to the same place
}

const char* k_person = R"({
  "type": "object",
  "properties": {
    "name": {"type": "string", "minLength": 1, "maxLength": 8},
    "age": {"type": "integer"},
    "email": {"type": ["string", "null"]},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
                "required": ["street"], "additionalProperties": false},
    "a\"b": {"type": "boolean"}
  },
  "required": ["name", "age"],
  "additionalProperties": false
})";

const char* k_tree = R"({
  "$defs": {"node": {"type": "object",
                     "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]},
                                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
                     "required": ["value"], "additionalProperties": false}},
  "$ref": "#/$defs/node"
})";

const char* k_mixed = R"({
  "type": "object",
  "properties": {"x": {"type": "number"}, "y": {"const": {"k": [1, "two", null]}}},
  "required": ["x"],
  "additionalProperties": {"type": "array", "items": {"type": ["integer", "boolean"]}, "minItems": 1}
})";

const char* k_union = R"({
  "anyOf": [
    {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}}, "additionalProperties": false},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
    {"type": "string", "minLength": 2},
    {"type": "null"},
    {"enum": [true, 7, 7.5, "zz"]}
  ]
})";

}  // namespace

// --- json_object: structure, numbers, strings -----------------------------------------------------------

TEST(GuidedJson, ObjectModeAcceptsManyShapes) {
  const auto g = json_grammar::any_object();
  for (const char* doc :
       {"{}", "{ }", "{\"a\":1}", " {\"a\" : true }", "{\"a\":[1,2,{\"b\":null}],\"c\":\"x\"}", "{\"\":\"\"}",
        "{\"a\":{\"b\":{\"c\":{\"d\":[[[]]]}}}}", "{\"n\":[0,-0,1.5,-2e10,3E+2,4e-0,0.001]}",
        "{\"s\":\"\\\"\\\\\\/\\b\\f\\n\\r\\t\\u00e9\\uD83D\\uDE00\"}", "{\"utf8\":\"é€😀中文\"}",
        "{\n\t\"a\" :\r\n [ true , false , null ]\n}", "{\"a\":1,\"a\":2}", "{\"k\\u0041\":{}}"})
    expect_document(g, doc);
}

namespace {

// A random JSON value: strings with escapes, control bytes, DEL and UTF-8 up to U+10FFFF; all kinds of numbers.
json random_value(std::mt19937_64& rng, int depth) {
  static const std::vector<std::string> pieces = {"a",    "Z",    " ",    "\"", "\\", "/", "\n", "\t",
                                                  "\x01", "\x1f", "\x7f", "é",  "€",  "😀", "中", "\U0010FFFF"};
  auto str = [&] {
    std::string s;
    for (int n = static_cast<int>(rng() % 6); n > 0; --n) s += pieces[rng() % pieces.size()];
    return s;
  };
  switch (rng() % (depth > 0 ? 9 : 6)) {
    case 0:
      return nullptr;
    case 1:
      return rng() % 2 == 0;
    case 2:
      return static_cast<int64_t>(rng() % 2000001) - 1000000;
    case 3:
      return std::ldexp(static_cast<double>(static_cast<int64_t>(rng() % 2001) - 1000),
                        static_cast<int>(rng() % 200) - 100);
    case 4:
      return static_cast<uint64_t>(rng());
    case 5:
      return str();
    case 6:
    case 7: {
      json o = json::object();
      for (int n = static_cast<int>(rng() % 4); n > 0; --n) o[str()] = random_value(rng, depth - 1);
      return o;
    }
    default: {
      json a = json::array();
      for (int n = static_cast<int>(rng() % 4); n > 0; --n) a.push_back(random_value(rng, depth - 1));
      return a;
    }
  }
}

}  // namespace

// Compact, indented and ensure_ascii (\uXXXX, surrogate pairs) dumps of random values.
TEST(GuidedJson, AcceptsWhatNlohmannWrites) {
  const auto any = schema("{}");
  const auto object = json_grammar::any_object();
  std::mt19937_64 rng(11);
  int objects = 0;
  for (int i = 0; i < 300; ++i) {
    const json v = random_value(rng, 4);
    for (const std::string& doc : {v.dump(), v.dump(2), v.dump(-1, ' ', true), v.dump(1, '\t', true)}) {
      SCOPED_TRACE(doc);
      EXPECT_EQ(refused_at(any, doc), -1);
      EXPECT_EQ(refused_at(object, doc), v.is_object() ? -1 : 0);
    }
    objects += v.is_object();
  }
  EXPECT_GT(objects, 50);
}

TEST(GuidedJson, ObjectModeRefusesAtTheExactOffset) {
  const auto g = json_grammar::any_object();
  // clang-format off
  const std::vector<std::pair<std::string, int64_t>> cases = {
      {"[1]", 0}, {"1", 0}, {"\"a\"", 0}, {"{\"a\":01", 6}, {"{\"a\":1,}", 7}, {"{,}", 1}, {"{\"a\" 1}", 5},
      {"{\"a\":1 \"b\":2}", 7}, {"{\"a\":tru}", 8}, {"{\"a\":-}", 6}, {"{\"a\":1.}", 7}, {"{\"a\":1e}", 7},
      {"{\"a\":.5}", 5}, {"{\"a\":+1}", 5}, {"{\"a\":1.e5}", 7}, {"{\"a\":[1,]}", 8}, {"{\"a\":[,1]}", 6},
      {"{\"a\":\"x\x01\"}", 7}, {"{\"a\":\"\t\"}", 6}, {"{\"a\":\"\\x\"}", 7}, {"{\"a\":\"\\u12G4\"}", 10},
      {"{\"a\":\"\\ud800x\"}", 12}, {"{\"a\":\"\\udc00\"}", 9}, {"{\"a\":\"\\ud800\\u0041\"}", 14},
      {"{\"a\":\"\\ud83d\\ud83d\"}", 15}, {"{\"a\":\"\xC0\x80\"}", 6}, {"{\"a\":\"\xC3\"}", 7},
      {"{\"a\":\"\x80\"}", 6}, {"{\"a\":\"\xE0\x80\x80\"}", 7}, {"{\"a\":\"\xED\xA0\x80\"}", 7},
      {"{\"a\":\"\xF4\x90\x80\x80\"}", 7}, {"{\"a\":\"\xF5\"}", 6}, {"{\"a\":\"\xC3\xA9\xA9\"}", 8}, {"{} ", 2},
      {"{}x", 2}, {"{}}", 2}, {"{\"a\":1}]", 7}, {"{\"\x01\":1}", 2}, {"{\"a\":[1}", 7}, {"{\"a\":{]}", 6},
  };
  // clang-format on
  for (const auto& [doc, at] : cases) EXPECT_EQ(refused_at(g, doc), at) << doc;
  EXPECT_EQ(refused_at(g, "{\"a\":1"), -2);
  EXPECT_EQ(refused_at(g, "{\"a\":\"\\ud83d\\ude00\"}"), -1);
}

TEST(GuidedJson, AdvanceIsAllOrNothing) {
  json_matcher m(json_grammar::any_object());
  ASSERT_TRUE(m.advance("{\"a\":"));
  const json_matcher before = m;
  EXPECT_FALSE(m.advance("12x"));
  EXPECT_TRUE(m == before);
  EXPECT_FALSE(m.advance(static_cast<uint8_t>('}')));
  EXPECT_TRUE(m == before);
  EXPECT_TRUE(m.advance("12}"));
  EXPECT_TRUE(m.complete());
  EXPECT_FALSE(m.can_continue());
  EXPECT_FALSE(m.advance(static_cast<uint8_t>(' ')));
  json_matcher copy = before;  // copies are independent
  EXPECT_TRUE(copy.advance("[]}"));
  EXPECT_TRUE(copy.complete());
  EXPECT_FALSE(before.complete());
  EXPECT_TRUE(before.can_continue());
}

TEST(GuidedJson, TopLevelNumbers) {
  const auto num = schema(R"({"type": "number"})");
  const auto integer = schema(R"({"type": "integer"})");
  for (const char* doc : {"0", "-0", "7", "123", "1.5", "-0.25e+10", "3E7"}) {
    json_matcher m(num);
    ASSERT_TRUE(m.advance(std::string_view(doc))) << doc;
    EXPECT_TRUE(m.complete()) << doc;
    EXPECT_TRUE(m.can_continue()) << doc;  // more digits (or . / e) could follow
    EXPECT_FALSE(m.advance(static_cast<uint8_t>(' '))) << doc;
  }
  for (const char* doc : {"-", "1.", "1e", "1e+", "-1.0e"}) {
    json_matcher m(num);
    EXPECT_TRUE(m.advance(std::string_view(doc)) && !m.complete()) << doc;
  }
  json_matcher z(integer);
  ASSERT_TRUE(z.advance(static_cast<uint8_t>('0')));
  EXPECT_TRUE(z.complete());
  EXPECT_FALSE(z.can_continue());
  EXPECT_EQ(refused_at(integer, "12.5"), 2);
  EXPECT_EQ(refused_at(integer, "12e5"), 2);
  EXPECT_EQ(refused_at(integer, "-12"), -1);
  EXPECT_EQ(refused_at(num, " 5"), -1);  // leading whitespace is JSON
}

TEST(GuidedJson, WhitespaceIsCappedAt32InARow) {
  const auto g = json_grammar::any_object();
  const std::string ws32(32, ' ');
  for (const std::string& pre : {std::string(""), std::string("{"), std::string("{\"a\""), std::string("{\"a\":"),
                                 std::string("{\"a\":1"), std::string("{\"a\":["), std::string("{\"a\":[1,")}) {
    json_matcher m(g);
    ASSERT_TRUE(m.advance(pre));
    EXPECT_TRUE(m.advance(ws32)) << pre;
    EXPECT_FALSE(m.advance(static_cast<uint8_t>('\n'))) << pre;
  }
  EXPECT_EQ(refused_at(g, "{" + std::string(16, ' ') + std::string(16, '\t') + "\r"), 33);
  EXPECT_EQ(refused_at(g, "{ \"a\"" + ws32 + ":" + ws32 + "1" + ws32 + "}"), -1);  // runs, not totals
  EXPECT_EQ(refused_at(g, "{\"a\":\"" + std::string(100, ' ') + "\"}"), -1);       // string content
}

// --- schemas ----------------------------------------------------------------------------------------------

TEST(GuidedJson, ObjectSchemaKeysRequiredAndAdditional) {
  const auto g = schema(k_person);
  expect_document(g, R"({"name":"bob","age":3})");
  expect_document(g, R"({ "age" : -4 , "name" : "é中😀" , "tags" : ["red","blue"], "email": null })");
  expect_document(g, R"({"address":{"street":"main"},"a\"b":true,"name":"x","age":0,"email":"e"})");
  EXPECT_EQ(refused_at(g, R"({"age":3})"), 8);                       // '}' before the required name
  EXPECT_EQ(refused_at(g, R"({"name":"x","age":1,"nope":1})"), 21);  // unknown key, additionalProperties false
  EXPECT_EQ(refused_at(g, R"({"name":"x","name":"y"})"), 13);        // a key may not repeat
  EXPECT_EQ(refused_at(g, R"({"nam":1})"), 5);
  EXPECT_EQ(refused_at(g, R"({"name":"","age":1})"), 9);    // minLength 1
  EXPECT_EQ(refused_at(g, R"({"name":"123456789"})"), 17);  // maxLength 8
  EXPECT_EQ(refused_at(g, R"({"age":1.5})"), 8);            // integer
  EXPECT_EQ(refused_at(g, R"({"email":1})"), 9);
  EXPECT_EQ(refused_at(g, R"({"tags":["red","pink"]})"), 16);             // enum
  EXPECT_EQ(refused_at(g, R"({"tags":["red","red","red","red"]})"), 26);  // maxItems 3
  EXPECT_EQ(refused_at(g, R"({"address":{}})"), 12);                      // street required
  EXPECT_EQ(refused_at(g, R"({"address":{"street":"s","zip":1}})"), 26);
  EXPECT_EQ(refused_at(g, R"({"a\u0022b":true})"), 4);       // declared names only as dump() escapes them
  EXPECT_EQ(refused_at(g, R"({"name":"x","age":1,})"), 20);  // trailing comma
}

TEST(GuidedJson, UndeclaredKeysCannotSpellDeclaredOnes) {
  const auto g = schema(R"({"type":"object","properties":{"a":{"type":"integer"},"n":false},
                            "additionalProperties":{"type":"string"}})");
  expect_document(g, R"({"a":1,"b":"x","ab":"y","":"z","a\"":"w"})");
  EXPECT_EQ(refused_at(g, R"({"b":"x","a":"str"})"), 13);  // "a" is declared: its value is an integer
  EXPECT_EQ(refused_at(g, R"({"\u0061":1})"), 3);          // \u in keys of such objects
  EXPECT_EQ(refused_at(g, R"({"\/":"x"})"), 3);
  EXPECT_EQ(refused_at(g, R"({"n":1})"), 3);        // "n" has schema false: the key may not appear
  EXPECT_EQ(refused_at(g, R"({"a":1,"a":2})"), 9);  // the closing quote of a used name
  const auto plain = json_grammar::any_object();    // no declared names: any escape in keys
  EXPECT_EQ(refused_at(plain, R"({"\u0061":1})"), -1);
}

TEST(GuidedJson, EnumAndConstAreExactDumps) {
  const auto g = schema(R"({"enum": [1, 12, "a", {"k": [1, null]}, [true], null, 2.5]})");
  for (const char* doc : {"1", "12", "\"a\"", "{\"k\":[1,null]}", "[true]", "null", "2.5"})
    EXPECT_EQ(refused_at(g, doc), -1) << doc;
  EXPECT_EQ(refused_at(g, "13"), 1);
  EXPECT_EQ(refused_at(g, "\"b\""), 1);
  EXPECT_EQ(refused_at(g, "{\"k\": [1,null]}"), 5);  // compact only
  EXPECT_EQ(refused_at(g, " 1"), -1);                // whitespace before the value is JSON's
  json_matcher one(g);
  ASSERT_TRUE(one.advance(static_cast<uint8_t>('1')));
  EXPECT_TRUE(one.complete());
  EXPECT_TRUE(one.can_continue());  // "12"
  const auto typed = schema(R"({"type": "string", "enum": ["x", 1, "yy"], "maxLength": 1})");
  EXPECT_EQ(refused_at(typed, "\"x\""), -1);
  EXPECT_EQ(refused_at(typed, "1"), 0);       // not a string
  EXPECT_EQ(refused_at(typed, "\"yy\""), 1);  // longer than maxLength
  const auto c = schema(R"({"type":"object","properties":{"v":{"const":"on"}},"required":["v"]})");
  EXPECT_EQ(refused_at(c, R"({"v":"on"})"), -1);
  EXPECT_EQ(refused_at(c, R"({"v":"of"})"), 7);
}

TEST(GuidedJson, RefRecursion) {
  const auto g = schema(k_tree);
  expect_document(g, R"({"value":1,"children":[{"value":"ab","children":[{"value":-3},{"value":"c"}]}]})");
  EXPECT_EQ(refused_at(g, R"({"value":1,"children":[{"children":[]}]})"), 37);         // value required below
  EXPECT_EQ(refused_at(g, R"({"value":1,"children":[{"value":1},{"value":2},)"), 46);  // maxItems 2
  std::string deep;
  for (int i = 0; i < 200; ++i) deep += R"({"value":0,"children":[)";
  deep += R"({"value":0})";
  for (int i = 0; i < 200; ++i) deep += "]}";
  expect_document(g, deep);
  const auto list = schema(R"({"$defs":{"l":{"type":"object","properties":{"v":{"type":"integer"},
      "next":{"anyOf":[{"$ref":"#/$defs/l"},{"type":"null"}]}},"required":["v","next"]}},"$ref":"#/$defs/l"})");
  expect_document(list, R"({"v":1,"next":{"v":2,"next":null}})");
  EXPECT_EQ(refused_at(list, R"({"v":1,"next":{"v":2}})"), 20);
  const auto defs =
      schema(R"({"definitions":{"b":{"type":"boolean"}},"type":"array","items":{"$ref":"#/definitions/b"}})");
  expect_document(defs, "[true,false]");
  EXPECT_EQ(refused_at(defs, "[1]"), 1);
}

TEST(GuidedJson, ItemAndLengthBounds) {
  const auto a = schema(R"({"type":"array","items":{"type":"integer"},"minItems":2,"maxItems":3})");
  EXPECT_EQ(refused_at(a, "[]"), 1);
  EXPECT_EQ(refused_at(a, "[1]"), 2);
  EXPECT_EQ(refused_at(a, "[1,2]"), -1);
  EXPECT_EQ(refused_at(a, "[1, 2 ,3]"), -1);
  EXPECT_EQ(refused_at(a, "[1,2,3,"), 6);
  const auto none = schema(R"({"type":"array","maxItems":0})");
  EXPECT_EQ(refused_at(none, "[]"), -1);
  EXPECT_EQ(refused_at(none, "[1"), 1);
  const auto s = schema(R"({"type":"string","minLength":2,"maxLength":3})");
  EXPECT_EQ(refused_at(s, "\"a\""), 2);
  EXPECT_EQ(refused_at(s, "\"ab\""), -1);
  EXPECT_EQ(refused_at(s, "\"\\n\\u00e9\\\"\""), -1);   // an escape is one character
  EXPECT_EQ(refused_at(s, "\"\\ud83d\\ude00é\""), -1);  // a surrogate pair is one character
  EXPECT_EQ(refused_at(s, "\"中文😀\""), -1);            // a UTF-8 character is one character
  EXPECT_EQ(refused_at(s, "\"abcd\""), 4);
  EXPECT_EQ(refused_at(s, "\"é€😀\\t\""), 10);
}

TEST(GuidedJson, UnionsWithDisjointFirstBytes) {
  const auto sn = schema(R"({"type":["string","null"]})");
  EXPECT_EQ(refused_at(sn, "null"), -1);
  EXPECT_EQ(refused_at(sn, "\"x\""), -1);
  EXPECT_EQ(refused_at(sn, "1"), 0);
  const auto u = schema(k_union);
  for (const char* doc :
       {"{}", "{\"kind\":\"b\"}", "[1,2]", "\"ab\"", "null", "true", "7", "7.5", "\"zz\"", "\"z\\n\""})
    EXPECT_EQ(refused_at(u, doc), -1) << doc;
  EXPECT_EQ(refused_at(u, "false"), 0);
  EXPECT_EQ(refused_at(u, "8"), 0);
  EXPECT_EQ(refused_at(u, "\"z\""), 2);  // minLength 2: "zz" merged into the wider string
  EXPECT_EQ(refused_at(u, "[1]"), 2);
  EXPECT_EQ(refused_at(u, "7.25"), 2);
  const auto num = schema(R"({"type":["integer","number"]})");
  EXPECT_EQ(refused_at(num, "1.5"), -1);
  const auto merged = schema(R"({"anyOf":[{"type":"integer"},{"type":"number"},{"enum":["p","q"]},{"const":"r"}]})");
  EXPECT_EQ(refused_at(merged, "-2.5e3"), -1);
  EXPECT_EQ(refused_at(merged, "\"r\""), -1);
  EXPECT_EQ(refused_at(merged, "\"s\""), 1);
  const auto any = schema("{}");
  for (const char* doc : {"1", "\"x\"", "[{}]", "null", "false", "{\"a\":[]}"})
    EXPECT_EQ(refused_at(any, doc), -1) << doc;
  EXPECT_EQ(refused_at(schema("true"), "[1]"), -1);
}

TEST(GuidedJson, OverlappingAlternativesAreRefused) {
  EXPECT_EQ(expect_guided_error(R"({"anyOf":[{"type":"object"},{"type":"object","properties":{"a":{}}}]})"), "anyOf");
  EXPECT_EQ(
      expect_guided_error(R"({"type":"object","properties":{"x":{"oneOf":[{"type":"integer"},{"type":"number"}]}}})"),
      "properties.x.oneOf");
  EXPECT_EQ(expect_guided_error(
                R"({"items":{"anyOf":[{"type":"number"},{"enum":["a",1.5,"x"]},{"type":"string","minLength":3}]}})"),
            "items.anyOf");
  EXPECT_EQ(expect_guided_error(R"({"anyOf":[{"type":"string","minLength":1},{"type":"string","maxLength":3}]})"),
            "anyOf");
  EXPECT_EQ(expect_guided_error(R"({"anyOf":[{"type":"array"},{"enum":[[1]]}]})"), "anyOf");
}

TEST(GuidedJson, UnsupportedKeywordsNameTheirPath) {
  // clang-format off
  const std::vector<std::pair<std::string, std::string>> kws = {
      {"pattern", "\"^a\""}, {"format", "\"date\""}, {"minimum", "0"}, {"maximum", "9"}, {"exclusiveMinimum", "0"},
      {"exclusiveMaximum", "0"}, {"multipleOf", "2"}, {"uniqueItems", "true"}, {"patternProperties", "{}"},
      {"not", "{}"}, {"if", "{}"}, {"then", "{}"}, {"else", "{}"}, {"allOf", "[{}]"}, {"dependentRequired", "{}"},
      {"dependentSchemas", "{}"}, {"prefixItems", "[{}]"}, {"contains", "{}"}, {"propertyNames", "{}"},
      {"minProperties", "1"}, {"maxProperties", "1"}, {"unevaluatedProperties", "false"}, {"nullable", "true"}};
  // clang-format on
  for (const auto& [k, v] : kws) {
    EXPECT_EQ(expect_guided_error(("{\"" + k + "\":" + v + "}").c_str()), k);
    EXPECT_EQ(expect_guided_error(("{\"type\":\"object\",\"properties\":{\"age\":{\"" + k + "\":" + v + "}}}").c_str()),
              "properties.age." + k);
    EXPECT_EQ(expect_guided_error(("{\"items\":{\"anyOf\":[{\"type\":\"null\"},{\"" + k + "\":" + v + "}]}}").c_str()),
              "items.anyOf[1]." + k);
  }
  EXPECT_EQ(expect_guided_error(R"({"$defs":{"x":{"type":"integer","minimum":1}},"type":"null"})"), "$defs.x.minimum");
  EXPECT_EQ(expect_guided_error(R"({"additionalProperties":{"format":"email"}})"), "additionalProperties.format");
  try {
    schema(R"({"type":"string","pattern":"a+"})");
    ADD_FAILURE() << "pattern accepted";
  } catch (const guided_error& e) {
    EXPECT_NE(std::string(e.what()).find("not supported for guided decoding"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("minLength"), std::string::npos);  // says what is supported
  }
  // Annotations are accepted and ignored.
  const auto g = schema(R"({"title":"t","description":"d","default":{},"examples":[{}],"$schema":"x","$id":"y",
      "$comment":"c","strict":true,"type":"object","properties":{"a":{"type":"integer","deprecated":true,
      "readOnly":true,"writeOnly":false}},"additionalProperties":false})");
  EXPECT_EQ(refused_at(g, R"({"a":1})"), -1);
}

TEST(GuidedJson, MalformedSchemasThrow) {
  const std::vector<std::pair<const char*, const char*>> cases = {
      {R"({"type":5})", "type"},
      {R"({"type":"str"})", "type"},
      {R"({"type":["string",3]})", "type[1]"},
      {R"({"type":[]})", "type"},
      {R"({"required":"a"})", "required"},
      {R"({"required":[1]})", "required"},
      {R"({"properties":[]})", "properties"},
      {R"({"properties":{"a":3}})", "properties.a"},
      {R"({"additionalProperties":3})", "additionalProperties"},
      {R"({"items":[{}]})", "items"},
      {R"({"minItems":-1})", "minItems"},
      {R"({"maxItems":1.5})", "maxItems"},
      {R"({"minLength":"a"})", "minLength"},
      {R"({"minItems":3,"maxItems":2})", "minItems"},
      {R"({"minLength":3,"maxLength":2})", "minLength"},
      {R"({"enum":[]})", "enum"},
      {R"({"enum":1})", "enum"},
      {R"({"enum":[1,2],"const":3})", "const"},
      {R"({"type":"string","enum":[1,2]})", "enum"},
      {R"({"anyOf":[]})", "anyOf"},
      {R"({"anyOf":[{}],"oneOf":[{}]})", "oneOf"},
      {R"({"anyOf":[{"type":"null"}],"type":"null"})", "type"},
      {R"({"$ref":"#/$defs/missing"})", "$ref"},
      {R"({"$ref":"http://example.com/s.json"})", "$ref"},
      {R"({"$ref":3})", "$ref"},
      {R"({"$ref":"#/$defs/a","type":"null","$defs":{"a":{}}})", "type"},
      {R"({"$defs":5})", "$defs"},
      {R"({"type":"object","properties":{"x":{"$ref":"#/$defs/a"}},"$defs":{"a":{"$ref":"#/$defs/b"},"b":{"$ref":"#/$defs/a"}}})",
       "$defs.b.$ref"},
      {R"({"type":"object","required":["x"],"additionalProperties":false})", "required"},
      {R"({"$defs":{"n":{"type":"object","properties":{"c":{"$ref":"#/$defs/n"}},"required":["c"]}},"$ref":"#/$defs/n"})",
       ""},
      {"false", ""},
      {"3", ""},
  };
  for (const auto& [s, path] : cases) EXPECT_EQ(expect_guided_error(s), path) << s;
}

TEST(GuidedJson, UnsatisfiableBranchesAreNeverStarted) {
  // items: false -> only the empty array; an optional property whose schema accepts nothing never appears.
  const auto g = schema(R"({"type":"object","properties":{"a":{"type":"array","items":false},
      "b":{"$ref":"#/$defs/inf"}},"$defs":{"inf":{"type":"object","properties":{"c":{"$ref":"#/$defs/inf"}},
      "required":["c"]}},"additionalProperties":false})");
  EXPECT_EQ(refused_at(g, R"({"a":[]})"), -1);
  EXPECT_EQ(refused_at(g, R"({"a":[1)"), 6);
  EXPECT_EQ(refused_at(g, R"({"b":)"), 2);
}

// --- the token mask ---------------------------------------------------------------------------------------

TEST(GuidedJson, TokenTrieBasics) {
  const std::vector<std::string> vocab = {"", "{", "{\"", "{", "\"", "}", "", "{}", "x"};
  const token_trie t(vocab);
  EXPECT_EQ(t.vocab_size(), 9);
  EXPECT_EQ(t.num_nodes(), 7);  // the empty prefix, {, {", {}, ", }, x
  json_matcher m(json_grammar::any_object());
  std::vector<uint8_t> mask;
  json_allowed_tokens(m, t, mask);
  EXPECT_EQ(mask, (std::vector<uint8_t>{0, 1, 1, 1, 0, 0, 0, 1, 0}));  // duplicates share a node
  ASSERT_TRUE(m.advance("{\"a\":1"));
  json_allowed_tokens(m, t, mask);
  EXPECT_EQ(mask, (std::vector<uint8_t>{0, 0, 0, 0, 0, 1, 0, 0, 0}));
  ASSERT_TRUE(m.advance("}"));
  json_allowed_tokens(m, t, mask);
  EXPECT_EQ(std::count(mask.begin(), mask.end(), 1), 0);
}

TEST(GuidedJson, MaskEqualsBruteForceAndWalksEndValid_ObjectMode) {
  walk_and_check(json_grammar::any_object(), json{{"type", "object"}}, 1, 25, 40);
}

TEST(GuidedJson, MaskEqualsBruteForceAndWalksEndValid_Person) {
  walk_and_check(schema(k_person), json::parse(k_person), 2, 25, 40);
}

TEST(GuidedJson, MaskEqualsBruteForceAndWalksEndValid_Tree) {
  walk_and_check(schema(k_tree), json::parse(k_tree), 3, 25, 40);
}

TEST(GuidedJson, MaskEqualsBruteForceAndWalksEndValid_MixedKeys) {
  walk_and_check(schema(k_mixed), json::parse(k_mixed), 4, 25, 40);
}

TEST(GuidedJson, MaskEqualsBruteForceAndWalksEndValid_Union) {
  walk_and_check(schema(k_union), json::parse(k_union), 5, 25, 30);
}

TEST(GuidedJson, MaskEqualsBruteForceAndWalksEndValid_AnyAndNumber) {
  walk_and_check(schema("{}"), json::object(), 6, 25, 30);
  walk_and_check(schema(R"({"type":"number"})"), json::parse(R"({"type":"number"})"), 7, 10, 10);
}

TEST(GuidedJson, GrammarIsSharedAcrossThreads) {
  const auto g = schema(k_person);
  const auto vocab = random_vocab(9, 2000);
  const token_trie trie(vocab);
  std::vector<std::vector<uint8_t>> masks(4);
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k)
    threads.emplace_back([&, k] {
      json_matcher m(g);
      m.advance(std::string_view(R"({"name":"a)"));
      for (int r = 0; r < 20; ++r) json_allowed_tokens(m, trie, masks[k]);
    });
  for (auto& t : threads) t.join();
  json_matcher m(g);
  ASSERT_TRUE(m.advance(std::string_view(R"({"name":"a)")));
  const auto expected = brute_force_mask(m, vocab);
  for (const auto& mk : masks) EXPECT_EQ(mk, expected);
}
