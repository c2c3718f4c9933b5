// The serving spec (runtime/serve_spec.h): defaults, overrides, located errors, describe round trip.
#include <gtest/gtest.h>

#include <cstdlib>
#include <google/protobuf/util/message_differencer.h>

#include "runtime/error.h"
#include "runtime/serve_spec.h"

namespace {

using namespace troupe::runtime;

std::string error_of(const std::string& yaml) {
  try {
    parse_serve_spec(yaml, "serve.yaml");
  } catch (const error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no error for " << yaml;
  return "";
}

TEST(ServeSpec, DefaultsOverridesAndRoundTrip) {
  const auto s = parse_serve_spec("model: tests/fixtures/mixtral_moe\nengine: {ranks: 2, block_size: 8}\n",
                                  "serve.yaml", {"server.port=0"});
  EXPECT_EQ(s.model(), "tests/fixtures/mixtral_moe");
  EXPECT_EQ(s.server().host(), "127.0.0.1");
  EXPECT_EQ(s.server().port(), 0);
  EXPECT_EQ(s.engine().ranks(), 2);
  EXPECT_EQ(s.engine().block_size(), 8);
  EXPECT_EQ(s.engine().max_batch_tokens(), 512);
  EXPECT_TRUE(s.engine().prefix_caching());
  EXPECT_EQ(s.engine().batching(), "continuous");
  EXPECT_EQ(s.expert().mode(), "llep");
  EXPECT_EQ(s.engine().weight_memory(), "shared");
  EXPECT_EQ(serve_max_body_bytes(s), 1 << 20);
  EXPECT_EQ(serve_kv_cache_bytes(s), 0);
  const auto back = parse_serve_spec(describe(s), "described.yaml");
  EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(s, back)) << describe(s);
}

TEST(ServeSpec, ErrorsNameTheKeyAndWhere) {
  EXPECT_NE(error_of("engine: {ranks: 2}\n").find("`model` at serve.yaml (default) is required"), std::string::npos)
      << error_of("engine: {ranks: 2}\n");
  EXPECT_NE(error_of("model: m\nserver: {port: 70000}\n").find("`server.port` at serve.yaml:2:"), std::string::npos);
  EXPECT_NE(error_of("model: m\nengine: {batching: dynamic}\n").find("'dynamic' is not one of continuous, static"),
            std::string::npos);
  EXPECT_NE(error_of("model: m\nengine: {weight_memory: pooled}\n").find("`engine.weight_memory`"), std::string::npos);
  EXPECT_NE(error_of("model: m\nengine: {kv_cache_memory: lots}\n").find("`engine.kv_cache_memory`"),
            std::string::npos);
  EXPECT_NE(error_of("model: m\nengine: {block_size: 0}\n").find("= 0 must be >= 1"), std::string::npos);
  EXPECT_NE(error_of("model: m\nengin: {}\n").find("unknown key `engin`"), std::string::npos);
  EXPECT_NE(error_of("model: m\nexpert: {mode: random}\n").find("`expert.mode`"), std::string::npos);
}

TEST(ServeSpec, ApiKeyFromTheEnvironment) {
  auto s = parse_serve_spec("model: m\nserver: {api_key: 'env:TROUPE_TEST_KEY_XYZ'}\n", "serve.yaml");
  ::unsetenv("TROUPE_TEST_KEY_XYZ");
  EXPECT_THROW(serve_api_key(s), error);
  ::setenv("TROUPE_TEST_KEY_XYZ", "sk-1", 1);
  EXPECT_EQ(serve_api_key(s), "sk-1");
  ::unsetenv("TROUPE_TEST_KEY_XYZ");
}

}  // namespace
