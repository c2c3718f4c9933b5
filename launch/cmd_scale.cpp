// `troupe scale URL --ranks M`: grows or shrinks a running `troupe serve` group (its /admin/scale,
// elastic/server/http_server.h invariant 7) and waits until the group serves on M ranks.
//
//   troupe scale http://127.0.0.1:8000 --ranks 4                  # admin key from TROUPE_ADMIN_KEY
//   troupe scale http://127.0.0.1:8000 --ranks 1 --admin-key k --no-wait
//
// Exit codes: 0 the group serves on M ranks (or the change was accepted, with --no-wait); 1 the
// server refused the change or it failed (its message is printed); 2 bad arguments; 3 no answer.
#include <fmt/format.h>
#include <httplib.h>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>

#include "launch/commands.h"

namespace troupe::launch {

namespace {

struct scale_options {
  std::string url;
  int ranks = 0;
  std::string admin_key;
  bool no_wait = false;
  double timeout_s = 600;
};

std::string message_of(const httplib::Result& res) {
  try {
    const auto j = nlohmann::json::parse(res->body);
    if (j.contains("error") && j["error"].contains("message")) return j["error"]["message"].get<std::string>();
  } catch (const std::exception&) {
  }
  return res->body;
}

int scale(const scale_options& o) {
  std::string key = o.admin_key;
  if (key.empty())
    if (const char* k = std::getenv("TROUPE_ADMIN_KEY")) key = k;
  std::unique_ptr<httplib::Client> cli;
  try {
    cli = std::make_unique<httplib::Client>(o.url);
  } catch (const std::exception& e) {
    fmt::print(stderr, "troupe scale: {}: {}\n", o.url, e.what());
    return 2;
  }
  if (!cli->is_valid()) {
    fmt::print(stderr, "troupe scale: {} is not a URL this client can reach (http://host:port)\n", o.url);
    return 2;
  }
  cli->set_connection_timeout(10);
  cli->set_read_timeout(60);
  httplib::Headers h;
  if (!key.empty()) h.emplace("Authorization", "Bearer " + key);
  const auto t0 = std::chrono::steady_clock::now();
  auto res = cli->Post("/admin/scale", h, nlohmann::json{{"ranks", o.ranks}}.dump(), "application/json");
  if (!res) {
    fmt::print(stderr, "troupe scale: no answer from {}: {}\n", o.url, httplib::to_string(res.error()));
    return 3;
  }
  if (res->status != 202) {
    fmt::print(stderr, "troupe scale: {} refused ({}): {}\n", o.url, res->status, message_of(res));
    return 1;
  }
  nlohmann::json st = nlohmann::json::parse(res->body, nullptr, false);
  fmt::print("troupe scale: {} accepted: {} -> {} ranks\n", o.url, st.value("ranks", 0), o.ranks);
  if (o.no_wait) return 0;
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    res = cli->Get("/admin/scale", h);
    if (!res || res->status != 200) {
      fmt::print(stderr, "troupe scale: {} stopped answering: {}\n", o.url,
                 res ? fmt::format("HTTP {}", res->status) : httplib::to_string(res.error()));
      return 3;
    }
    st = nlohmann::json::parse(res->body, nullptr, false);
    const std::string state = st.is_object() ? st.value("state", "") : "";
    if (state == "failed") {
      fmt::print(stderr, "troupe scale: the change failed: {}\n", st.value("error", std::string("(no reason given)")));
      return 1;
    }
    if (state == "done" && st.value("ranks", 0) == o.ranks) break;
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > o.timeout_s) {
      fmt::print(stderr, "troupe scale: no result after {} s (state {})\n", o.timeout_s, state);
      return 3;
    }
  }
  const auto& last = st["last_seconds"];
  fmt::print("troupe scale: {} serves on {} ranks (layout {}); the change took {:.3f} s: {:.3f} s to the iteration "
             "boundary, {:.3f} s moving weights beside serving, {:.3f} s switching (iterations paused); {} samples "
             "moved\n",
             o.url, st.value("ranks", 0), st.value("layout", 0), last.value("total", 0.0), last.value("wait", 0.0),
             last.value("move", 0.0), last.value("switch", 0.0), st.value("moved_samples", 0));
  return 0;
}

}  // namespace

void register_scale(CLI::App& app) {
  auto o = std::make_shared<scale_options>();
  auto* cmd = app.add_subcommand("scale", "grow or shrink a running troupe serve group (its /admin/scale)");
  cmd->add_option("url", o->url, "the server, http://127.0.0.1:8000")->required();
  cmd->add_option("--ranks", o->ranks, "the group's new size")->required()->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--admin-key", o->admin_key, "the server's server.admin_key (default: $TROUPE_ADMIN_KEY)");
  cmd->add_flag("--no-wait", o->no_wait, "return once the change is accepted");
  cmd->add_option("--timeout", o->timeout_s, "seconds to wait for the change (default 600)")->check(CLI::Range(1.0, 1e6));
  cmd->callback([o] {
    const int code = scale(*o);
    if (code != 0) throw CLI::RuntimeError(code);
  });
}

}  // namespace troupe::launch
