// elastic/server/http_front.h — the event-driven HTTP/1.1 front of `troupe serve` (and of the router):
// Boost.Beast's parser over Asio sockets, a few I/O threads for any number of connections. A
// connection costs a socket and a buffer, never a thread, so idle keep-alive clients, slow readers
// and long streams cannot starve new requests.
//
//   http_front front({.host = "127.0.0.1", .port = 0});
//   front.route("GET", "/health", [](std::shared_ptr<http_exchange> x) { x->respond(200, "text/plain", "ok\n"); });
//   front.route("POST", "/v1/completions", [&](std::shared_ptr<http_exchange> x) {
//     x->on_disconnect([id] { backend.abort(id); });        // the client left before the answer ended
//     front.post_work([x] { /* tokenize, submit ... */ x->start_stream(200, "text/event-stream"); });
//   });
//   front.start();  int port = front.port();  ...  front.stop();
//
// Invariants:
//   1. Handlers run on an I/O thread and must not block: blocking work goes to post_work() (a small
//      pool). An exchange's methods are thread-safe and return at once; what they send is written
//      in call order.
//   2. Every request gets exactly one answer, in request order on its connection (pipelined
//      requests wait for the one before). An unknown path is 404, a known path with another method
//      405 (with Allow), a body over max_body_bytes 413, a header over max_header_bytes 431, a
//      request that does not parse 400, one not received whole within request_timeout_ms 408 — each
//      with error_body's JSON — and a handler that throws 500.
//   3. While an answer is pending the connection keeps reading: a client that closes or resets its
//      connection before the answer ended fires on_disconnect at once (streamed or not), and the
//      same happens when a reader is so slow that max_buffered_bytes of answer wait for it.
//      on_disconnect runs at most once per exchange, never after end()/respond().
//   4. Keep-alive connections stay open idle for idle_timeout_ms; Expect: 100-continue is answered;
//      HTTP/1.0 and `Connection: close` close after the answer.
//   5. At most max_connections are open; one more is answered 503 and closed. start() raises the
//      process's open-file limit to its hard limit. stop() closes every connection (pending answers
//      see on_disconnect), waits for the I/O threads and the work pool.
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace troupe::elastic {

using http_headers = std::vector<std::pair<std::string, std::string>>;

struct http_request {
  std::string method;  // "GET", "POST", ...
  std::string target;  // path and query as sent
  std::string path;    // target without the query
  std::string body;
  std::string peer;    // "127.0.0.1:53422"
  int version = 11;    // 10 or 11
  http_headers headers;
  // Case-insensitive lookup; "" when absent.
  std::string header(std::string_view name) const;
};

struct http_connection;

// One request and its answer. Held by shared_ptr: handlers keep it as long as they answer.
class http_exchange : public std::enable_shared_from_this<http_exchange> {
 public:
  const http_request& request() const { return req_; }
  // A whole answer with Content-Length. The first respond()/start_stream() wins; later calls are ignored.
  void respond(int status, std::string_view content_type, std::string body, http_headers extra = {});
  // A streamed answer (chunked on HTTP/1.1): the head now, then write() pieces, then end().
  void start_stream(int status, std::string_view content_type, http_headers extra = {});
  void write(std::string data);
  void end();
  // Runs once (on an I/O thread) if the client goes away before the answer ended; at once when it already has.
  void on_disconnect(std::function<void()> f);
  bool disconnected() const { return gone_.load(); }

  http_exchange(std::weak_ptr<http_connection> c, http_request r);

 private:
  friend struct http_connection;
  void fire_disconnect();  // I/O thread
  std::weak_ptr<http_connection> conn_;
  http_request req_;
  std::atomic<bool> gone_{false};
  std::atomic<bool> answered_{false};  // respond or start_stream called
  std::mutex mu_;                      // on_disconnect_ and done_
  std::function<void()> on_disconnect_;
  bool done_ = false;                  // ended or disconnected: the callback is settled
};

using http_handler = std::function<void(std::shared_ptr<http_exchange>)>;

struct http_front_options {
  std::string host = "127.0.0.1";
  int port = 8000;                          // 0 = any free port
  int io_threads = 1;                       // threads running the event loop
  int work_threads = 2;                     // post_work() pool
  int max_connections = 16384;
  size_t max_body_bytes = size_t{1} << 20;
  size_t max_header_bytes = size_t{64} << 10;
  size_t max_buffered_bytes = size_t{16} << 20;  // answer bytes waiting on one slow reader
  int idle_timeout_ms = 75000;              // a keep-alive connection with no request
  int request_timeout_ms = 30000;           // from a request's first byte to its last
  // The body of the front's own errors (404, 405, 408, 413, 431, 400, 500, 503), JSON.
  std::function<std::string(int status, const std::string& message)> error_body;
};

struct http_front_stats {
  int64_t connections_open = 0, connections_total = 0, requests = 0;
  int64_t disconnects = 0;  // answers cut by their client (on_disconnect fired)
  int64_t refused_connections = 0;
};

class http_front {
 public:
  explicit http_front(http_front_options o);
  ~http_front();
  http_front(const http_front&) = delete;
  http_front& operator=(const http_front&) = delete;

  // Before start(): the handler of an exact path for one method.
  void route(const std::string& method, const std::string& path, http_handler h);
  // Binds and starts the I/O threads; throws errc::io naming host:port.
  void start();
  int port() const;
  void stop();
  // Runs f on the work pool (blocking calls: tokenizing, the backend).
  void post_work(std::function<void()> f);
  http_front_stats stats() const;
  const http_front_options& options() const;

  struct impl;

 private:
  std::shared_ptr<impl> impl_;
};

}  // namespace troupe::elastic
