// tests/unit/http_test_client.h — a raw-socket HTTP/1.1 client for the front's tests: it can hold a
// connection idle, send half a request, never read, pipeline, or close mid-answer, which a
// library client hides.
//
//   raw_conn c(port);                                 // connects to 127.0.0.1:port (blocking socket)
//   c.send(http_get("/health"));
//   http_reply r = c.read_reply(5000);                // status, headers, body (length or chunked)
//   c.close();
#pragma once
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <map>
#include <thread>
#include <stdexcept>
#include <string>

namespace troupe_test {

struct http_reply {
  int status = 0;  // 0: no complete reply in time (or the connection closed first)
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;
  bool closed = false;  // the server closed the connection
};

inline std::string http_get(const std::string& path, const std::string& extra = "") {
  return "GET " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + "\r\n";
}

inline std::string http_post(const std::string& path, const std::string& body, const std::string& extra = "") {
  return "POST " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: " +
         std::to_string(body.size()) + "\r\n" + extra + "\r\n" + body;
}

class raw_conn {
 public:
  explicit raw_conn(int port, int rcvbuf = 0) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    if (fd_ < 0) throw std::runtime_error("socket() failed");
    if (rcvbuf > 0) ::setsockopt(fd_, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
      ::close(fd_);
      throw std::runtime_error("connect() failed");
    }
  }
  ~raw_conn() { close(); }
  raw_conn(const raw_conn&) = delete;
  raw_conn& operator=(const raw_conn&) = delete;

  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  // Closes with a reset (SO_LINGER 0): the server sees ECONNRESET at once.
  void reset() {
    linger l{1, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    close();
  }
  bool send(const std::string& bytes) {
    size_t off = 0;
    while (off < bytes.size()) {
      const ssize_t n = ::send(fd_, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return false;
      off += static_cast<size_t>(n);
    }
    return true;
  }
  // Reads what arrives within ms (at least one byte unless the time runs out); "" on close/timeout.
  std::string read_some(int ms, bool* closed = nullptr) {
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, ms) <= 0) return {};
    char buf[65536];
    const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
    if (n <= 0) {
      if (closed) *closed = true;
      return {};
    }
    return std::string(buf, static_cast<size_t>(n));
  }
  // Reads until `pred(buffered)` or ms elapse or the server closes.
  template <typename Pred>
  bool read_until(Pred pred, int ms) {
    const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
    while (!pred(buf_)) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(end - std::chrono::steady_clock::now());
      if (left.count() <= 0 || closed_) return false;
      buf_ += read_some(static_cast<int>(left.count()), &closed_);
    }
    return true;
  }
  // One whole reply (Content-Length, chunked, or until close); status 0 when it did not come in time.
  http_reply read_reply(int ms) {
    http_reply r;
    if (!read_until([](const std::string& b) { return b.find("\r\n\r\n") != std::string::npos; }, ms)) {
      r.closed = closed_;
      return r;
    }
    const size_t head_end = buf_.find("\r\n\r\n");
    const std::string head = buf_.substr(0, head_end);
    std::string rest = buf_.substr(head_end + 4);
    r.status = std::stoi(head.substr(9, 3));
    size_t pos = head.find("\r\n");
    while (pos != std::string::npos && pos + 2 < head.size()) {
      const size_t next = head.find("\r\n", pos + 2);
      const std::string line = head.substr(pos + 2, next == std::string::npos ? std::string::npos : next - pos - 2);
      const size_t colon = line.find(':');
      if (colon != std::string::npos) {
        std::string k = line.substr(0, colon);
        for (auto& ch : k) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
        std::string v = line.substr(colon + 1);
        while (!v.empty() && v.front() == ' ') v.erase(0, 1);
        r.headers[k] = v;
      }
      pos = next;
    }
    buf_ = rest;
    if (r.status == 100) return r;
    if (r.headers.count("content-length")) {
      const size_t n = std::stoul(r.headers["content-length"]);
      if (!read_until([n](const std::string& b) { return b.size() >= n; }, ms)) {
        r.status = 0;
        return r;
      }
      r.body = buf_.substr(0, n);
      buf_.erase(0, n);
    } else if (r.headers["transfer-encoding"] == "chunked") {
      for (;;) {
        if (!read_until([](const std::string& b) { return b.find("\r\n") != std::string::npos; }, ms)) {
          r.status = 0;
          return r;
        }
        const size_t eol = buf_.find("\r\n");
        const size_t n = std::stoul(buf_.substr(0, eol), nullptr, 16);
        if (!read_until([&](const std::string& b) { return b.size() >= eol + 2 + n + 2; }, ms)) {
          r.status = 0;
          return r;
        }
        r.body += buf_.substr(eol + 2, n);
        buf_.erase(0, eol + 2 + n + 2);
        if (n == 0) break;
      }
    } else {  // until the server closes
      read_until([](const std::string&) { return false; }, ms);
      r.body = buf_;
      buf_.clear();
    }
    r.closed = closed_;
    return r;
  }
  // True when the server closed the connection within ms (EOF or reset).
  bool closed_within(int ms) {
    read_until([](const std::string&) { return false; }, ms);
    return closed_;
  }
  int fd() const { return fd_; }
  // What was read and not yet taken by read_reply.
  const std::string& buffered() const { return buf_; }
  bool starts_with(const std::string& prefix) const { return buf_.compare(0, prefix.size(), prefix) == 0; }

 private:
  int fd_ = -1;
  std::string buf_;
  bool closed_ = false;
};

// Polls f every 5 ms until it is true (true) or ms pass (false).
template <typename F>
bool eventually(F f, int ms = 5000) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  while (!f()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

}  // namespace troupe_test
