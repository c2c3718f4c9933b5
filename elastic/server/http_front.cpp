// elastic/server/http_front.cpp — see http_front.h.
//
// A connection always has one read pending (while it is not paused): the bytes go to its input
// buffer, and the Beast request parser is fed from there whenever no answer is pending. So a
// client that leaves mid-answer is seen at once (the read fails), pipelined requests wait in the
// buffer, and an idle keep-alive connection is nothing but a pending read and a timer.
#include "elastic/server/http_front.h"

#include <fmt/format.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <array>
#include <deque>
#include <future>
#include <map>
#include <optional>
#include <thread>
#include <unordered_map>

#include "runtime/error.h"
#include "runtime/log.h"
#include "runtime/process_limits.h"

namespace troupe::elastic {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = net::ip::tcp;
namespace log = runtime::log;
using runtime::errc;

namespace {

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::tolower(static_cast<unsigned char>(a[i])) != std::tolower(static_cast<unsigned char>(b[i]))) return false;
  return true;
}

std::string reason_phrase(int status) {
  const auto r = http::obsolete_reason(http::int_to_status(static_cast<unsigned>(status)));
  return r.empty() ? std::string("Unknown") : std::string(r);
}


}  // namespace

std::string http_request::header(std::string_view name) const {
  for (const auto& [k, v] : headers)
    if (iequals(k, name)) return v;
  return {};
}

// ---- the front's shared state ------------------------------------------------------------------

struct http_front::impl : std::enable_shared_from_this<http_front::impl> {
  http_front_options o;
  net::io_context ioc;
  std::optional<net::executor_work_guard<net::io_context::executor_type>> guard;
  std::optional<tcp::acceptor> acceptor;  // on a strand of its own
  std::vector<std::thread> threads;
  std::unique_ptr<net::thread_pool> pool;
  std::map<std::string, std::map<std::string, http_handler>> routes;  // path -> method -> handler
  int port = 0;
  bool started = false, stopped = false;
  bool stopping = false;  // under mu: accepted sockets are closed at once
  std::optional<net::steady_timer> accept_retry;  // backs off after a failed accept (out of descriptors)

  mutable std::mutex mu;  // conns and the counters below
  std::unordered_map<uint64_t, std::weak_ptr<http_connection>> conns;
  uint64_t next_conn = 1;
  http_front_stats st;

  explicit impl(http_front_options opt) : o(std::move(opt)) {}
  std::string error_body(int status, const std::string& message) const {
    if (o.error_body) return o.error_body(status, message);
    return fmt::format("{{\"error\": {{\"message\": \"{}\", \"code\": {}}}}}", message, status);
  }
  void do_accept();
  void forget(uint64_t id) {
    std::lock_guard<std::mutex> g(mu);
    conns.erase(id);
    st.connections_open = static_cast<int64_t>(conns.size());
  }
  void count(int64_t http_front_stats::*field) {
    std::lock_guard<std::mutex> g(mu);
    ++(st.*field);
  }
};

// ---- one connection ----------------------------------------------------------------------------

struct http_connection : std::enable_shared_from_this<http_connection> {
  using strand_t = net::strand<net::io_context::executor_type>;

  http_front::impl* front;  // outlives every connection: its io_context destroys the last handlers
  uint64_t id;
  strand_t strand;
  tcp::socket sock;
  net::steady_timer timer;
  uint64_t timer_gen = 0;
  beast::flat_buffer in;               // bytes received and not parsed yet
  std::array<char, 16384> rbuf{};      // the pending read's target (never `in`: parse() consumes it meanwhile)
  std::optional<http::request_parser<http::string_body>> parser;
  bool continue_sent = false;
  std::deque<std::string> out;
  size_t out_bytes = 0;
  bool writing = false, reading = false;
  std::shared_ptr<http_exchange> active;  // the request being answered
  bool streaming = false, chunked = false;
  bool keep_alive = true, closing = false, gone = false;
  std::string peer;

  http_connection(http_front::impl* f, uint64_t cid, tcp::socket s)
      : front(f), id(cid), strand(net::make_strand(front->ioc)), sock(std::move(s)), timer(strand) {
    beast::error_code ec;
    const auto ep = sock.remote_endpoint(ec);
    if (!ec) peer = fmt::format("{}:{}", ep.address().to_string(), ep.port());
  }

  // Everything below runs on the strand.
  void start() {
    arm_timer(front->o.idle_timeout_ms);
    do_read();
  }

  // The watch limit: while an answer is pending, pipelined bytes collect up to this much.
  static constexpr size_t watch_limit = 64 * 1024;

  void do_read() {
    if (reading || gone) return;
    if (active && in.size() >= watch_limit) return;  // paused until the answer ends
    reading = true;
    sock.async_read_some(net::buffer(rbuf), net::bind_executor(strand, [self = shared_from_this()](
                                                                           beast::error_code ec, size_t n) {
                           self->on_read(ec, n);
                         }));
  }

  void on_read(beast::error_code ec, size_t n) {
    reading = false;
    if (gone) return;
    if (ec) {
      close_now(ec == net::error::eof ? "the client closed the connection" : ec.message());
      return;
    }
    net::buffer_copy(in.prepare(n), net::buffer(rbuf.data(), n));
    in.commit(n);
    if (!active && !closing) parse();
    if (!closing) do_read();
  }

  void parse() {
    while (!active && !closing && !gone && in.size() > 0) {
      if (!parser) {
        parser.emplace();
        parser->header_limit(static_cast<uint32_t>(front->o.max_header_bytes));
        parser->body_limit(static_cast<uint64_t>(front->o.max_body_bytes));
        parser->eager(true);
        continue_sent = false;
        arm_timer(front->o.request_timeout_ms);
      }
      beast::error_code ec;
      const size_t used = parser->put(in.data(), ec);
      in.consume(used);
      if (ec && ec != http::error::need_more) {
        const bool body = ec == http::error::body_limit;
        const bool head = ec == http::error::header_limit;
        const int status = body ? 413 : head ? 431 : 400;
        const std::string msg =
            body   ? fmt::format("the request body is larger than this server accepts ({} bytes)",
                                 front->o.max_body_bytes)
            : head ? fmt::format("the request head is larger than {} bytes", front->o.max_header_bytes)
                   : fmt::format("the request is not valid HTTP/1.1: {}", ec.message());
        parser.reset();
        keep_alive = false;
        send_whole(status, "application/json", front->error_body(status, msg), {});
        closing = true;
        return;
      }
      if (parser->is_header_done() && !continue_sent &&
          iequals(std::string(parser->get()[http::field::expect]), "100-continue")) {
        continue_sent = true;
        if (!parser->is_done()) enqueue("HTTP/1.1 100 Continue\r\n\r\n");
      }
      if (!parser->is_done() && (ec || used == 0)) return;  // more bytes needed
      if (!parser->is_done()) continue;
      dispatch(parser->release());
      parser.reset();
    }
  }

  void dispatch(http::request<http::string_body> req) {
    front->count(&http_front_stats::requests);
    http_request r;
    r.method = std::string(req.method_string());
    r.target = std::string(req.target());
    const auto q = r.target.find('?');
    r.path = q == std::string::npos ? r.target : r.target.substr(0, q);
    r.version = static_cast<int>(req.version());
    r.peer = peer;
    for (const auto& f : req) r.headers.emplace_back(std::string(f.name_string()), std::string(f.value()));
    r.body = std::move(req.body());
    keep_alive = req.keep_alive();
    streaming = false;
    auto ex = std::make_shared<http_exchange>(weak_from_this(), std::move(r));
    active = ex;
    cancel_timer();
    const auto path = front->routes.find(ex->request().path);
    if (path == front->routes.end()) {
      ex->respond(404, "application/json",
                  front->error_body(404, fmt::format("no route {} {}", ex->request().method, ex->request().path)));
      return;
    }
    const auto h = path->second.find(ex->request().method);
    if (h == path->second.end()) {
      std::string allow;
      for (const auto& [m, _] : path->second) allow += (allow.empty() ? "" : ", ") + m;
      ex->respond(405, "application/json",
                  front->error_body(405, fmt::format("{} does not take {}; it takes {}", ex->request().path,
                                                     ex->request().method, allow)),
                  {{"Allow", allow}});
      return;
    }
    try {
      h->second(ex);
    } catch (const std::exception& e) {
      log::error("http: handler of {} {} threw: {}", ex->request().method, ex->request().path, e.what());
      ex->respond(500, "application/json", front->error_body(500, e.what()));
    }
  }

  std::string head(int status, std::string_view content_type, const http_headers& extra, std::string_view length) {
    std::string h = fmt::format("HTTP/1.1 {} {}\r\nContent-Type: {}\r\n", status, reason_phrase(status), content_type);
    h += length;
    if (!keep_alive) h += "Connection: close\r\n";
    for (const auto& [k, v] : extra) h += fmt::format("{}: {}\r\n", k, v);
    h += "\r\n";
    return h;
  }

  void send_whole(int status, std::string_view content_type, const std::string& body, const http_headers& extra) {
    std::string msg = head(status, content_type, extra, fmt::format("Content-Length: {}\r\n", body.size()));
    msg += body;
    enqueue(std::move(msg));
  }

  void respond(const std::shared_ptr<http_exchange>& ex, int status, const std::string& ct, std::string body,
               const http_headers& extra) {
    if (gone || ex != active) return;
    send_whole(status, ct, body, extra);
    if (!gone) finish_exchange();
  }

  void start_stream(const std::shared_ptr<http_exchange>& ex, int status, const std::string& ct,
                    const http_headers& extra) {
    if (gone || ex != active) return;
    streaming = true;
    chunked = ex->request().version >= 11;
    if (!chunked) keep_alive = false;  // HTTP/1.0: the end of the body is the end of the connection
    enqueue(head(status, ct, extra, chunked ? "Transfer-Encoding: chunked\r\n" : ""));
  }

  void write(const std::shared_ptr<http_exchange>& ex, std::string data) {
    if (gone || ex != active || !streaming || data.empty()) return;
    if (chunked) enqueue(fmt::format("{:x}\r\n", data.size()) + data + "\r\n");
    else enqueue(std::move(data));
  }

  void end(const std::shared_ptr<http_exchange>& ex) {
    if (gone || ex != active || !streaming) return;
    if (chunked) enqueue("0\r\n\r\n");
    if (!gone) finish_exchange();
  }

  // The answer is queued whole: settle the exchange, then the next request (or close).
  void finish_exchange() {
    if (!active || gone) return;
    auto ex = std::move(active);
    active.reset();
    streaming = false;
    {
      std::lock_guard<std::mutex> g(ex->mu_);
      ex->done_ = true;
      ex->on_disconnect_ = nullptr;
    }
    if (!keep_alive) {
      closing = true;
      if (!writing && out.empty()) close_now("");
      return;
    }
    arm_idle_if_quiet();
    parse();
    do_read();
  }

  // A keep-alive connection with nothing pending, nothing to write and no request begun: the idle timeout runs.
  void arm_idle_if_quiet() {
    if (!active && !parser && out.empty() && !writing && !closing) arm_timer(front->o.idle_timeout_ms);
  }

  // A reader is too slow when a new piece finds max_buffered_bytes still unsent before it (one large
  // answer alone never trips it).
  void enqueue(std::string bytes) {
    if (gone) return;
    if (out_bytes > front->o.max_buffered_bytes) {
      close_now(fmt::format("the client reads too slowly ({} answer bytes wait for it)", out_bytes));
      return;
    }
    out_bytes += bytes.size();
    out.push_back(std::move(bytes));
    if (!writing) do_write();
  }

  void do_write() {
    writing = true;
    net::async_write(sock, net::buffer(out.front()),
                     net::bind_executor(strand, [self = shared_from_this()](beast::error_code ec, size_t) {
                       self->on_write(ec);
                     }));
  }

  void on_write(beast::error_code ec) {
    writing = false;
    if (gone) return;
    if (ec) {
      close_now(ec.message());
      return;
    }
    out_bytes -= out.front().size();
    out.pop_front();
    if (!out.empty()) do_write();
    else if (closing) close_now("");
    else arm_idle_if_quiet();
  }

  void arm_timer(int ms) {
    const uint64_t gen = ++timer_gen;
    timer.expires_after(std::chrono::milliseconds(ms));
    timer.async_wait(net::bind_executor(strand, [self = shared_from_this(), gen](beast::error_code ec) {
      if (ec || gen != self->timer_gen || self->gone) return;
      self->on_timer();
    }));
  }
  void cancel_timer() {
    ++timer_gen;
    timer.cancel();
  }

  void on_timer() {
    if (active) return;  // an answer is pending: no timeout applies
    if (parser) {        // a request started and did not arrive whole in time
      parser.reset();
      keep_alive = false;
      closing = true;
      send_whole(408, "application/json",
                 front->error_body(408, fmt::format("the request did not arrive whole within {} ms",
                                                    front->o.request_timeout_ms)),
                 {});
      return;
    }
    close_now("");  // idle keep-alive connection
  }

  // The connection ends: a pending answer sees on_disconnect (invariant 3).
  void close_now(const std::string& why) {
    if (gone) return;
    gone = true;
    if (active) {
      front->count(&http_front_stats::disconnects);
      if (!why.empty())
        log::debug("http: {} {} from {}: {}; the answer is dropped", active->request().method,
                   active->request().path, peer, why);
      auto ex = std::move(active);
      active.reset();
      ex->fire_disconnect();
    }
    ++timer_gen;
    timer.cancel();
    beast::error_code ec;
    sock.shutdown(tcp::socket::shutdown_both, ec);
    sock.close(ec);
    out.clear();
    out_bytes = 0;
    front->forget(id);
  }
};

// ---- exchange ----------------------------------------------------------------------------------

http_exchange::http_exchange(std::weak_ptr<http_connection> c, http_request r)
    : conn_(std::move(c)), req_(std::move(r)) {}

void http_exchange::respond(int status, std::string_view content_type, std::string body, http_headers extra) {
  if (answered_.exchange(true)) return;
  auto c = conn_.lock();
  if (!c) return;
  net::post(c->strand, [c, self = shared_from_this(), status, ct = std::string(content_type), body = std::move(body),
                        extra = std::move(extra)]() mutable { c->respond(self, status, ct, std::move(body), extra); });
}

void http_exchange::start_stream(int status, std::string_view content_type, http_headers extra) {
  if (answered_.exchange(true)) return;
  auto c = conn_.lock();
  if (!c) return;
  net::post(c->strand, [c, self = shared_from_this(), status, ct = std::string(content_type),
                        extra = std::move(extra)] { c->start_stream(self, status, ct, extra); });
}

void http_exchange::write(std::string data) {
  auto c = conn_.lock();
  if (!c || data.empty()) return;
  net::post(c->strand, [c, self = shared_from_this(), data = std::move(data)]() mutable {
    c->write(self, std::move(data));
  });
}

void http_exchange::end() {
  auto c = conn_.lock();
  if (!c) return;
  net::post(c->strand, [c, self = shared_from_this()] { c->end(self); });
}

void http_exchange::on_disconnect(std::function<void()> f) {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (!done_) {
      on_disconnect_ = std::move(f);
      return;
    }
    if (!gone_) return;  // answered whole: nothing will fire
  }
  f();  // already gone
}

void http_exchange::fire_disconnect() {
  std::function<void()> f;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (done_) return;
    done_ = true;
    gone_ = true;
    f = std::move(on_disconnect_);
  }
  if (f) f();
}

// ---- the front ---------------------------------------------------------------------------------

void http_front::impl::do_accept() {
  acceptor->async_accept(net::make_strand(ioc), [self = shared_from_this()](beast::error_code ec, tcp::socket s) {
    if (ec) {
      if (ec == net::error::operation_aborted || !self->acceptor->is_open()) return;
      // e.g. out of descriptors: the connection stays in the backlog, so retry after a pause, not at once
      log::warn("http: accept failed: {}; retrying in 100 ms", ec.message());
      self->accept_retry->expires_after(std::chrono::milliseconds(100));
      self->accept_retry->async_wait([self](beast::error_code tec) {
        if (!tec && self->acceptor->is_open()) self->do_accept();
      });
      return;
    }
    uint64_t cid = 0;
    bool refuse = false;
    {
      std::lock_guard<std::mutex> g(self->mu);
      if (self->stopping) {
        beast::error_code cec;
        s.close(cec);
        return;
      }
      refuse = static_cast<int64_t>(self->conns.size()) >= self->o.max_connections;
      if (refuse) {
        ++self->st.refused_connections;
      } else {
        cid = self->next_conn++;
        ++self->st.connections_total;
      }
    }
    if (refuse) {
      const std::string body = self->error_body(503, "the server has too many open connections; retry later");
      const std::string msg = fmt::format("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                          "Content-Length: {}\r\nConnection: close\r\n\r\n{}",
                                          body.size(), body);
      beast::error_code wec;
      s.non_blocking(true, wec);
      net::write(s, net::buffer(msg), wec);  // best effort: a fresh socket takes a few hundred bytes
      s.close(wec);
    } else {
      auto c = std::make_shared<http_connection>(self.get(), cid, std::move(s));
      {
        std::lock_guard<std::mutex> g(self->mu);
        self->conns[cid] = c;
        self->st.connections_open = static_cast<int64_t>(self->conns.size());
      }
      net::dispatch(c->strand, [c] { c->start(); });
    }
    self->do_accept();
  });
}

http_front::http_front(http_front_options o) : impl_(std::make_shared<impl>(std::move(o))) {}

http_front::~http_front() {
  try {
    stop();
  } catch (const std::exception& e) {
    log::error("http: stopping: {}", e.what());
  }
}

void http_front::route(const std::string& method, const std::string& path, http_handler h) {
  TROUPE_CHECK(!impl_->started, errc::invalid_argument, "http_front: route {} {} after start()", method, path);
  impl_->routes[path][method] = std::move(h);
}

void http_front::start() {
  auto& m = *impl_;
  TROUPE_CHECK(!m.started, errc::invalid_argument, "http_front: already started");
  runtime::raise_open_file_limit();
  beast::error_code ec;
  const auto addr = net::ip::make_address(m.o.host, ec);
  TROUPE_CHECK(!ec, errc::io, "serve: cannot listen on {}:{}: '{}' is not an IP address ({})", m.o.host, m.o.port,
               m.o.host, ec.message());
  const tcp::endpoint ep(addr, static_cast<unsigned short>(m.o.port));
  m.acceptor.emplace(net::make_strand(m.ioc));
  m.accept_retry.emplace(m.acceptor->get_executor());
  m.acceptor->open(ep.protocol(), ec);
  if (!ec) m.acceptor->set_option(net::socket_base::reuse_address(true), ec);
  if (!ec) m.acceptor->bind(ep, ec);
  if (!ec) m.acceptor->listen(net::socket_base::max_listen_connections, ec);
  TROUPE_CHECK(!ec, errc::io, "serve: cannot listen on {}:{} ({}; in use? another host name?)", m.o.host, m.o.port,
               ec.message());
  m.port = m.acceptor->local_endpoint().port();
  m.started = true;
  m.pool = std::make_unique<net::thread_pool>(static_cast<size_t>(std::max(1, m.o.work_threads)));
  m.guard.emplace(m.ioc.get_executor());
  m.do_accept();
  for (int i = 0; i < std::max(1, m.o.io_threads); ++i)
    m.threads.emplace_back([&m] {
      for (;;) {
        try {
          m.ioc.run();
          return;
        } catch (const std::exception& e) {
          log::error("http: an I/O handler threw: {}", e.what());
        }
      }
    });
  log::info("serve: listening on http://{}:{}", m.o.host, m.port);
}

int http_front::port() const { return impl_->port; }

void http_front::stop() {
  auto& m = *impl_;
  if (!m.started || m.stopped) return;
  m.stopped = true;
  // Close the acceptor and every connection on their strands, then let the loop run dry.
  std::promise<void> closed;
  net::post(m.acceptor->get_executor(), [&] {
    beast::error_code ec;
    m.acceptor->close(ec);
    m.accept_retry->cancel();
    closed.set_value();
  });
  closed.get_future().wait();
  std::vector<std::shared_ptr<http_connection>> open;
  {
    std::lock_guard<std::mutex> g(m.mu);
    m.stopping = true;  // an accept completing now closes its socket (the snapshot below misses it)
    for (auto& [_, w] : m.conns)
      if (auto c = w.lock()) open.push_back(std::move(c));
  }
  for (auto& c : open) net::post(c->strand, [c] { c->close_now("the server is stopping"); });
  m.guard.reset();
  for (auto& t : m.threads) t.join();
  m.threads.clear();
  m.pool->join();
}

void http_front::post_work(std::function<void()> f) {
  TROUPE_CHECK(impl_->pool, errc::invalid_argument, "http_front: post_work before start()");
  net::post(*impl_->pool, [f = std::move(f)] {
    try {
      f();
    } catch (const std::exception& e) {
      log::error("http: work item threw: {}", e.what());
    }
  });
}

http_front_stats http_front::stats() const {
  std::lock_guard<std::mutex> g(impl_->mu);
  return impl_->st;
}

const http_front_options& http_front::options() const { return impl_->o; }

}  // namespace troupe::elastic
