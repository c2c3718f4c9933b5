// The event-driven HTTP front (elastic/server/http_front.h) over real sockets on 127.0.0.1: a
// thousand idle, keep-alive and streaming connections that never read do not keep a new request
// from being answered; every disconnect (before a whole answer, mid-stream, a reset, a reader too
// slow) fires on_disconnect; routing errors, limits and timeouts answer with the error body;
// Expect: 100-continue, pipelining, HTTP/1.0 and the connection limit.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "elastic/server/http_front.h"
#include "http_test_client.h"

namespace {

using namespace troupe::elastic;
using troupe_test::http_get;
using troupe_test::http_post;
using troupe_test::eventually;
using troupe_test::raw_conn;

// Streams that the test feeds from one thread (a ticker), like the engine's events.
struct streams {
  std::mutex mu;
  std::vector<std::shared_ptr<http_exchange>> open;
  std::atomic<int> disconnects{0};
  std::atomic<bool> stop{false};
  std::thread ticker;
  explicit streams(int every_ms, size_t bytes = 16) {
    ticker = std::thread([this, every_ms, bytes] {
      while (!stop) {
        std::this_thread::sleep_for(std::chrono::milliseconds(every_ms));
        std::lock_guard<std::mutex> g(mu);
        for (auto& x : open) x->write("data: " + std::string(bytes, 'x') + "\n\n");
      }
    });
  }
  ~streams() {
    stop = true;
    ticker.join();
  }
  void add(std::shared_ptr<http_exchange> x) {
    x->on_disconnect([this] { ++disconnects; });
    x->start_stream(200, "text/event-stream");
    std::lock_guard<std::mutex> g(mu);
    open.push_back(std::move(x));
  }
};

struct front_fixture {
  std::unique_ptr<http_front> front;
  std::atomic<int> pending_disconnects{0};
  std::mutex mu;
  std::vector<std::shared_ptr<http_exchange>> held;  // answers that never come (until the client leaves)
  explicit front_fixture(http_front_options o, streams* st = nullptr) {
    o.host = "127.0.0.1";
    o.port = 0;
    o.error_body = [](int status, const std::string& m) {
      return "{\"error\": {\"message\": \"" + m + "\", \"status\": " + std::to_string(status) + "}}";
    };
    front = std::make_unique<http_front>(o);
    front->route("GET", "/health", [](std::shared_ptr<http_exchange> x) { x->respond(200, "text/plain", "ok\n"); });
    front->route("POST", "/echo", [](std::shared_ptr<http_exchange> x) {
      x->respond(200, "application/octet-stream", x->request().body);
    });
    front->route("POST", "/later", [this](std::shared_ptr<http_exchange> x) {  // answered from the work pool
      front->post_work([x] {
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        x->respond(200, "text/plain", "later:" + x->request().body);
      });
    });
    front->route("POST", "/hold", [this](std::shared_ptr<http_exchange> x) {
      x->on_disconnect([this] { ++pending_disconnects; });
      std::lock_guard<std::mutex> g(mu);
      held.push_back(std::move(x));
    });
    if (st) front->route("GET", "/stream", [st](std::shared_ptr<http_exchange> x) { st->add(std::move(x)); });
    front->start();
  }
  int port() const { return front->port(); }
  // Waits until n /hold requests are held (their answers pending).
  bool holding(size_t n) {
    return eventually([&] {
      std::lock_guard<std::mutex> g(mu);
      return held.size() == n;
    });
  }
};

TEST(HttpFront, AThousandIdleKeepAliveAndNeverReadingStreamsLeaveNewRequestsAnswered) {
  streams st(/*every_ms=*/5, /*bytes=*/512);
  http_front_options o;
  o.io_threads = 1;  // one event loop for everything
  front_fixture f(o, &st);
  std::vector<std::unique_ptr<raw_conn>> conns;
  // 400 connected and silent, 300 keep-alive after one answer, 300 streams nobody reads.
  for (int i = 0; i < 400; ++i) conns.push_back(std::make_unique<raw_conn>(f.port()));
  for (int i = 0; i < 300; ++i) {
    auto c = std::make_unique<raw_conn>(f.port());
    ASSERT_TRUE(c->send(http_get("/health")));
    ASSERT_EQ(c->read_reply(10000).status, 200) << "keep-alive client " << i;
    conns.push_back(std::move(c));
  }
  for (int i = 0; i < 300; ++i) {
    auto c = std::make_unique<raw_conn>(f.port(), /*rcvbuf=*/4096);
    ASSERT_TRUE(c->send(http_get("/stream")));
    conns.push_back(std::move(c));
  }
  ASSERT_TRUE(eventually([&] { return f.front->stats().connections_open == 1000; }, 20000))
      << f.front->stats().connections_open;
  ASSERT_TRUE(eventually([&] {
    std::lock_guard<std::mutex> g(st.mu);
    return st.open.size() == 300;
  }, 20000));
  // A new client, and a second request on a connection that sat idle: both answered while the
  // thousand stay open. A thread-per-connection server with fewer threads never answers them.
  for (int k = 0; k < 5; ++k) {
    raw_conn fresh(f.port());
    ASSERT_TRUE(fresh.send(http_get("/health")));
    const auto h = fresh.read_reply(10000);
    EXPECT_EQ(h.status, 200);
    EXPECT_EQ(h.body, "ok\n");
    ASSERT_TRUE(fresh.send(http_post("/later", "abc")));
    const auto l = fresh.read_reply(10000);
    EXPECT_EQ(l.status, 200);
    EXPECT_EQ(l.body, "later:abc");
  }
  auto& idle_keepalive = *conns[400];
  ASSERT_TRUE(idle_keepalive.send(http_post("/echo", "again")));
  EXPECT_EQ(idle_keepalive.read_reply(10000).body, "again");
  EXPECT_EQ(f.front->stats().connections_open, 1000);  // the fresh clients have left
  EXPECT_EQ(st.disconnects.load(), 0);
  // Every stream's client leaves: each one fires on_disconnect.
  for (size_t i = 700; i < conns.size(); ++i) conns[i]->close();
  EXPECT_TRUE(eventually([&] { return st.disconnects.load() == 300; }, 20000)) << st.disconnects.load();
  {
    std::lock_guard<std::mutex> g(st.mu);
    st.open.clear();
  }
  conns.clear();
  EXPECT_TRUE(eventually([&] { return f.front->stats().connections_open == 0; }, 20000));
}

TEST(HttpFront, AClientLeavingBeforeAWholeAnswerFiresOnDisconnect) {
  front_fixture f({});
  raw_conn a(f.port());
  ASSERT_TRUE(a.send(http_post("/hold", "x")));
  ASSERT_TRUE(f.holding(1));
  EXPECT_EQ(f.pending_disconnects.load(), 0);
  a.close();  // a non-streamed answer still pending
  EXPECT_TRUE(eventually([&] { return f.pending_disconnects.load() == 1; }));
  raw_conn b(f.port());
  ASSERT_TRUE(b.send(http_post("/hold", "y")));
  ASSERT_TRUE(f.holding(2));
  b.reset();
  EXPECT_TRUE(eventually([&] { return f.pending_disconnects.load() == 2; }));
  EXPECT_EQ(f.front->stats().disconnects, 2);
  // An answer given after the client left goes nowhere, and on_disconnect registered late runs at once.
  std::atomic<int> late{0};
  f.held[0]->respond(200, "text/plain", "too late");
  f.held[0]->on_disconnect([&] { ++late; });
  EXPECT_EQ(late.load(), 1);
  EXPECT_TRUE(f.held[0]->disconnected());
}

TEST(HttpFront, AStreamCutByItsClientFiresOnDisconnectAndAWholeAnswerNever) {
  streams st(2);
  front_fixture f({}, &st);
  raw_conn a(f.port());
  ASSERT_TRUE(a.send(http_get("/stream")));
  ASSERT_TRUE(a.read_until([](const std::string& b) { return b.find("data: ") != std::string::npos; }, 5000));
  a.close();
  EXPECT_TRUE(eventually([&] { return st.disconnects.load() == 1; }));
  // A whole answer, then the client closes: nothing fires.
  raw_conn b(f.port());
  ASSERT_TRUE(b.send(http_post("/echo", "done")));
  EXPECT_EQ(b.read_reply(5000).body, "done");
  b.close();
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(st.disconnects.load(), 1);
  EXPECT_EQ(f.front->stats().disconnects, 1);
}

TEST(HttpFront, AReaderTooSlowIsCutAndItsAnswerDropped) {
  streams st(1, /*bytes=*/32768);
  http_front_options o;
  o.max_buffered_bytes = 256 << 10;
  front_fixture f(o, &st);
  raw_conn a(f.port(), /*rcvbuf=*/4096);
  ASSERT_TRUE(a.send(http_get("/stream")));
  // Never reads: the kernel buffers fill, then the queued answer passes the limit.
  EXPECT_TRUE(eventually([&] { return st.disconnects.load() == 1; }, 20000));
  EXPECT_TRUE(a.closed_within(5000));
}

TEST(HttpFront, UnknownRoutesAndMethodsGetJsonErrors) {
  front_fixture f({});
  raw_conn c(f.port());
  ASSERT_TRUE(c.send(http_get("/nope")));
  const auto nf = c.read_reply(5000);
  EXPECT_EQ(nf.status, 404);
  EXPECT_EQ(nf.headers.at("content-type"), "application/json");
  EXPECT_NE(nf.body.find("\"status\": 404"), std::string::npos) << nf.body;
  ASSERT_TRUE(c.send(http_get("/echo")));
  const auto na = c.read_reply(5000);
  EXPECT_EQ(na.status, 405);
  EXPECT_EQ(na.headers.at("allow"), "POST");
  EXPECT_NE(na.body.find("/echo does not take GET"), std::string::npos) << na.body;
  ASSERT_TRUE(c.send(http_post("/echo", "still open")));  // the connection survives both
  EXPECT_EQ(c.read_reply(5000).body, "still open");
}

TEST(HttpFront, PipelinedRequestsAreAnsweredInOrder) {
  front_fixture f({});
  raw_conn c(f.port());
  ASSERT_TRUE(c.send(http_post("/later", "1") + http_post("/echo", "2") + http_get("/health")));
  EXPECT_EQ(c.read_reply(5000).body, "later:1");
  EXPECT_EQ(c.read_reply(5000).body, "2");
  EXPECT_EQ(c.read_reply(5000).body, "ok\n");
  // Two in one write, answered from the work pool while a read is pending, then a third: each its own.
  ASSERT_TRUE(c.send(http_post("/later", "AAAA") + http_post("/later", "BBBB")));
  EXPECT_EQ(c.read_reply(5000).body, "later:AAAA");
  EXPECT_EQ(c.read_reply(5000).body, "later:BBBB");
  ASSERT_TRUE(c.send(http_post("/later", "CCCC")));
  EXPECT_EQ(c.read_reply(5000).body, "later:CCCC");
}

TEST(HttpFront, AnAnswerLargerThanTheSlowReaderLimitIsSentWhole) {
  http_front_options o;
  o.max_buffered_bytes = 64 << 10;
  o.max_body_bytes = 1 << 20;
  front_fixture f(o);
  raw_conn c(f.port());
  const std::string big(900 << 10, 'z');  // 14x the limit, one answer
  ASSERT_TRUE(c.send(http_post("/echo", big)));
  const auto r = c.read_reply(10000);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.body.size(), big.size());
  ASSERT_TRUE(c.send(http_get("/health")));  // and the connection lives on
  EXPECT_EQ(c.read_reply(5000).status, 200);
}

TEST(HttpFront, ExpectContinueIsAnswered) {
  front_fixture f({});
  raw_conn c(f.port());
  const std::string body(5000, 'b');
  ASSERT_TRUE(c.send("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"));
  EXPECT_EQ(c.read_reply(5000).status, 100);
  ASSERT_TRUE(c.send(body));
  const auto r = c.read_reply(5000);
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.body, body);
}

TEST(HttpFront, LimitsAndMalformedRequestsAreRefusedAndTheConnectionClosed) {
  http_front_options o;
  o.max_body_bytes = 1000;
  o.max_header_bytes = 2048;
  front_fixture f(o);
  {
    raw_conn c(f.port());
    ASSERT_TRUE(c.send(http_post("/echo", std::string(1001, 'x'))));
    const auto r = c.read_reply(5000);
    EXPECT_EQ(r.status, 413);
    EXPECT_NE(r.body.find("1000 bytes"), std::string::npos) << r.body;
    EXPECT_TRUE(c.closed_within(5000));
  }
  {
    raw_conn c(f.port());
    ASSERT_TRUE(c.send(http_get("/health", "X-Big: " + std::string(4000, 'h') + "\r\n")));
    EXPECT_EQ(c.read_reply(5000).status, 431);
  }
  {
    raw_conn c(f.port());
    ASSERT_TRUE(c.send("NOT HTTP AT ALL\r\n\r\n"));
    EXPECT_EQ(c.read_reply(5000).status, 400);
  }
  raw_conn ok(f.port());
  ASSERT_TRUE(ok.send(http_post("/echo", std::string(1000, 'y'))));
  EXPECT_EQ(ok.read_reply(5000).status, 200);
}

TEST(HttpFront, IdleAndUnfinishedRequestsTimeOut) {
  http_front_options o;
  o.idle_timeout_ms = 200;
  o.request_timeout_ms = 300;
  front_fixture f(o);
  raw_conn idle(f.port());
  ASSERT_TRUE(idle.send(http_get("/health")));
  EXPECT_EQ(idle.read_reply(5000).status, 200);
  EXPECT_TRUE(idle.closed_within(5000));  // keep-alive, then nothing: closed
  raw_conn half(f.port());
  ASSERT_TRUE(half.send("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"));
  const auto r = half.read_reply(5000);
  EXPECT_EQ(r.status, 408);
  EXPECT_TRUE(half.closed_within(5000));
  // A pending answer is never timed out.
  raw_conn held(f.port());
  ASSERT_TRUE(held.send(http_post("/hold", "z")));
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  EXPECT_EQ(f.pending_disconnects.load(), 0);
  EXPECT_FALSE(held.closed_within(10));
}

TEST(HttpFront, Http10AndConnectionCloseEndTheConnectionAfterTheAnswer) {
  streams st(2);
  front_fixture f({}, &st);
  raw_conn a(f.port());
  ASSERT_TRUE(a.send("GET /health HTTP/1.0\r\n\r\n"));
  const auto r = a.read_reply(5000);
  EXPECT_EQ(r.status, 200);
  EXPECT_TRUE(a.closed_within(5000));
  raw_conn b(f.port());
  ASSERT_TRUE(b.send(http_get("/health", "Connection: close\r\n")));
  EXPECT_EQ(b.read_reply(5000).headers.at("connection"), "close");
  EXPECT_TRUE(b.closed_within(5000));
}

TEST(HttpFront, ConnectionsBeyondTheLimitGet503) {
  http_front_options o;
  o.max_connections = 3;
  front_fixture f(o);
  std::vector<std::unique_ptr<raw_conn>> held;
  for (int i = 0; i < 3; ++i) held.push_back(std::make_unique<raw_conn>(f.port()));
  ASSERT_TRUE(eventually([&] { return f.front->stats().connections_open == 3; }));
  raw_conn extra(f.port());
  const auto r = extra.read_reply(5000);
  EXPECT_EQ(r.status, 503);
  EXPECT_EQ(f.front->stats().refused_connections, 1);
  held.pop_back();
  ASSERT_TRUE(eventually([&] { return f.front->stats().connections_open == 2; }));
  raw_conn again(f.port());
  ASSERT_TRUE(again.send(http_get("/health")));
  EXPECT_EQ(again.read_reply(5000).status, 200);
}

TEST(HttpFront, StopClosesEveryConnectionAndPendingAnswersSeeTheDisconnect) {
  front_fixture f({});
  raw_conn a(f.port());
  ASSERT_TRUE(a.send(http_post("/hold", "x")));
  ASSERT_TRUE(f.holding(1));
  f.front->stop();
  EXPECT_EQ(f.pending_disconnects.load(), 1);
  EXPECT_TRUE(a.closed_within(5000));
}

}  // namespace
