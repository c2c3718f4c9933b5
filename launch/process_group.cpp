#include "launch/process_group.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <fstream>
#include <optional>

#include "runtime/error.h"

namespace troupe::launch {

namespace {
using runtime::errc;
using clk = std::chrono::steady_clock;

std::atomic<int> g_forward_signal{0};
void on_signal(int sig) { g_forward_signal.store(sig); }

struct child {
  int rank = 0;
  pid_t pid = -1;
  int out_fd = -1, err_fd = -1;
  std::string out_buf, err_buf;
  bool done = false;
  rank_exit exit;
};

void write_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = ::write(fd, s.data() + off, s.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    off += static_cast<size_t>(n);
  }
}

// Emits every complete line of buf to fd with the rank prefix; keeps the rest.
void flush_lines(std::string& buf, int fd, int rank, bool prefix, bool final, bool joining = false) {
  size_t start = 0, nl;
  std::string out;
  const char* label = joining ? "join" : "rank";
  while ((nl = buf.find('\n', start)) != std::string::npos) {
    if (prefix) out += fmt::format("[{} {}] ", label, rank);
    out.append(buf, start, nl - start + 1);
    start = nl + 1;
  }
  buf.erase(0, start);
  if (final && !buf.empty()) {
    if (prefix) out += fmt::format("[{} {}] ", label, rank);
    out += buf + "\n";
    buf.clear();
  }
  if (!out.empty()) write_all(fd, out);
}

// Reads what is available on fd; returns false at EOF.
bool drain(int fd, std::string& buf) {
  char tmp[4096];
  while (true) {
    ssize_t n = ::read(fd, tmp, sizeof tmp);
    if (n > 0) {
      buf.append(tmp, static_cast<size_t>(n));
      continue;
    }
    if (n == 0) return false;
    if (errno == EINTR) continue;
    return errno == EAGAIN || errno == EWOULDBLOCK;
  }
}

void signal_all(std::vector<child>& kids, int sig) {
  for (auto& c : kids)
    if (!c.done && c.pid > 0) ::kill(-c.pid, sig);  // the rank's whole process group
}

pid_t spawn(const launch_options& o, int rank, const std::string& supervisor, const std::string& token, int out_w,
            int err_w, int out_r, int err_r) {
  pid_t pid = ::fork();
  TROUPE_CHECK(pid >= 0, errc::io, "troupe-launch: fork for rank {} failed: {}", rank, std::strerror(errno));
  if (pid > 0) return pid;
  // child
  ::setpgid(0, 0);
  ::signal(SIGINT, SIG_DFL);
  ::signal(SIGTERM, SIG_DFL);
  ::signal(SIGHUP, SIG_DFL);
  ::dup2(out_w, STDOUT_FILENO);
  ::dup2(err_w, STDERR_FILENO);
  ::close(out_r);
  ::close(err_r);
  ::close(out_w);
  ::close(err_w);
  const std::string n = std::to_string(o.nprocs), r = std::to_string(rank);
  if (o.join.empty()) {
    ::setenv("TROUPE_RANK", r.c_str(), 1);
    ::setenv("TROUPE_WORLD_SIZE", n.c_str(), 1);
    ::unsetenv("TROUPE_JOIN");
  } else {  // invariant 6: the running group's settings are its own
    for (const char* k : {"TROUPE_RANK", "TROUPE_WORLD_SIZE", "TROUPE_MIN_RANKS", "TROUPE_MAX_RANKS", "TROUPE_OPEN_SLOTS"})
      ::unsetenv(k);
    ::setenv("TROUPE_JOIN", "1", 1);
  }
  ::setenv("TROUPE_LOCAL_RANK", r.c_str(), 1);
  ::setenv("TROUPE_LOCAL_WORLD_SIZE", n.c_str(), 1);
  ::setenv("TROUPE_SUPERVISOR", supervisor.c_str(), 1);
  ::setenv("TROUPE_CLUSTER_TOKEN", token.c_str(), 1);
  if (o.max_ranks > 0) {
    ::setenv("TROUPE_MIN_RANKS", std::to_string(o.min_ranks).c_str(), 1);
    ::setenv("TROUPE_MAX_RANKS", std::to_string(o.max_ranks).c_str(), 1);
    ::setenv("TROUPE_OPEN_SLOTS", std::to_string(o.open_slots).c_str(), 1);
  }
  std::vector<char*> argv;
  for (const auto& a : o.command) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  ::execvp(argv[0], argv.data());
  const std::string msg = fmt::format("troupe-launch: cannot run '{}': {}\n", o.command[0], std::strerror(errno));
  write_all(STDERR_FILENO, msg);
  ::_exit(127);
}

const char* signal_name(int sig) {
  switch (sig) {
    case SIGKILL: return "SIGKILL";
    case SIGTERM: return "SIGTERM";
    case SIGINT: return "SIGINT";
    case SIGSEGV: return "SIGSEGV";
    case SIGABRT: return "SIGABRT";
    case SIGBUS: return "SIGBUS";
    case SIGFPE: return "SIGFPE";
    case SIGHUP: return "SIGHUP";
    case SIGPIPE: return "SIGPIPE";
    default: return "?";
  }
}
}  // namespace

std::string rank_exit::reason() const {
  if (exited) return fmt::format("exit code {}", code);
  return fmt::format("killed by signal {} ({})", signal, signal_name(signal));
}

int launch_result::exit_code() const {
  if (first_failed < 0) return interrupted ? 130 : 0;
  const rank_exit& e = ranks[static_cast<size_t>(first_failed)];
  return e.exited ? (e.code != 0 ? e.code : 1) : 128 + e.signal;
}

int pick_free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  TROUPE_CHECK(fd >= 0, errc::io, "troupe-launch: socket() failed: {}", std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof addr;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    const int e = errno;
    ::close(fd);
    TROUPE_THROW(errc::io, "troupe-launch: cannot find a free port on 127.0.0.1: {}", std::strerror(e));
  }
  ::close(fd);
  return ntohs(addr.sin_port);
}

std::string random_token() {
  std::ifstream f("/dev/urandom", std::ios::binary);
  unsigned char b[16] = {};
  f.read(reinterpret_cast<char*>(b), sizeof b);
  TROUPE_CHECK(f.gcount() == sizeof b, errc::io, "troupe-launch: cannot read /dev/urandom for the cluster token");
  std::string s;
  for (unsigned char c : b) s += fmt::format("{:02x}", c);
  return s;
}

std::vector<std::string> mpirun_command(const launch_options& o, const std::vector<std::string>& hosts) {
  TROUPE_CHECK(!hosts.empty(), errc::invalid_argument, "troupe-launch: --hosts is empty");
  std::string host_list;
  for (const auto& h : hosts) host_list += (host_list.empty() ? "" : ",") + h;
  const std::string token = o.cluster_token.empty() ? random_token() : o.cluster_token;
  const std::string sup = o.supervisor.empty() ? fmt::format("{}:{}", hosts[0], 29400) : o.supervisor;
  std::vector<std::string> argv = {"mpirun", "-H", host_list, "-np", std::to_string(o.nprocs),
                                   "--tag-output", "-x", "TROUPE_CLUSTER_TOKEN=" + token,
                                   "-x", "TROUPE_SUPERVISOR=" + sup};
  if (o.max_ranks > 0) {
    for (const std::string& kv : {"TROUPE_MIN_RANKS=" + std::to_string(o.min_ranks),
                                 "TROUPE_MAX_RANKS=" + std::to_string(o.max_ranks)}) {
      argv.push_back("-x");
      argv.push_back(kv);
    }
  }
  argv.insert(argv.end(), o.command.begin(), o.command.end());
  return argv;
}

launch_result run_local(const launch_options& o) {
  TROUPE_CHECK(o.nprocs >= 1, errc::invalid_argument, "troupe-launch: -n {} must be >= 1", o.nprocs);
  TROUPE_CHECK(!o.command.empty(), errc::invalid_argument, "troupe-launch: no command given (usage: -n N -- CMD ...)");
  const char* env_token = std::getenv("TROUPE_CLUSTER_TOKEN");
  const std::string given = !o.cluster_token.empty() ? o.cluster_token : env_token ? env_token : "";  // invariant 7
  TROUPE_CHECK(o.join.empty() || !given.empty(), errc::invalid_argument,
               "troupe-launch --join {}: set TROUPE_CLUSTER_TOKEN to the running group's cluster token", o.join);
  TROUPE_CHECK(o.join.empty() || o.max_ranks == 0, errc::invalid_argument,
               "troupe-launch: --join adds processes to a running group; --max-ranks belongs to the launcher that "
               "started it");
  const std::string supervisor = !o.join.empty()        ? o.join
                                 : o.supervisor.empty() ? fmt::format("127.0.0.1:{}", pick_free_port())
                                                        : o.supervisor;
  const std::string token = given.empty() ? random_token() : given;
  if (o.open_slots > 0) {
    const bool loopback = supervisor.rfind("127.", 0) == 0 || supervisor.rfind("localhost:", 0) == 0;
    write_all(STDERR_FILENO,
              fmt::format("troupe-launch: {} open slot(s): add processes with\n  TROUPE_CLUSTER_TOKEN={} troupe-launch "
                          "--join {} -n N -- <the same command>\n{}",
                          o.open_slots, given.empty() ? token : "<the token you set>", supervisor,
                          loopback ? "  (from this host only: --supervisor HOST:PORT listens where other hosts "
                                     "reach it)\n"
                                   : ""));
  }

  struct sigaction sa{}, old_int{}, old_term{}, old_hup{};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  g_forward_signal.store(0);
  ::sigaction(SIGINT, &sa, &old_int);
  ::sigaction(SIGTERM, &sa, &old_term);
  ::sigaction(SIGHUP, &sa, &old_hup);

  std::vector<child> kids(static_cast<size_t>(o.nprocs));
  launch_result res;
  bool tearing_down = false;
  std::optional<clk::time_point> settle_until;  // after a failure: when the others get SIGTERM
  clk::time_point teardown_at{};
  for (int r = 0; r < o.nprocs; ++r) {
    int out_p[2], err_p[2];
    TROUPE_CHECK(::pipe2(out_p, O_CLOEXEC) == 0 && ::pipe2(err_p, O_CLOEXEC) == 0, errc::io,
                 "troupe-launch: pipe failed: {}", std::strerror(errno));
    child& c = kids[static_cast<size_t>(r)];
    c.rank = r;
    c.pid = spawn(o, r, supervisor, token, out_p[1], err_p[1], out_p[0], err_p[0]);
    ::setpgid(c.pid, c.pid);  // also from the parent: no race with signal_all
    ::close(out_p[1]);
    ::close(err_p[1]);
    c.out_fd = out_p[0];
    c.err_fd = err_p[0];
    ::fcntl(c.out_fd, F_SETFL, O_NONBLOCK);
    ::fcntl(c.err_fd, F_SETFL, O_NONBLOCK);
  }

  size_t remaining = kids.size();
  while (remaining > 0) {
    std::vector<pollfd> fds;
    std::vector<std::pair<child*, bool>> owner;  // (child, is_stdout)
    for (auto& c : kids) {
      if (c.out_fd >= 0) fds.push_back({c.out_fd, POLLIN, 0}), owner.push_back({&c, true});
      if (c.err_fd >= 0) fds.push_back({c.err_fd, POLLIN, 0}), owner.push_back({&c, false});
    }
    ::poll(fds.data(), fds.size(), 100);
    for (size_t i = 0; i < fds.size(); ++i) {
      if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      child& c = *owner[i].first;
      const bool is_out = owner[i].second;
      std::string& buf = is_out ? c.out_buf : c.err_buf;
      const bool open = drain(fds[i].fd, buf);
      flush_lines(buf, is_out ? STDOUT_FILENO : STDERR_FILENO, c.rank, o.prefix_output, !open, !o.join.empty());
      if (!open) {
        ::close(fds[i].fd);
        (is_out ? c.out_fd : c.err_fd) = -1;
      }
    }
    if (int sig = g_forward_signal.exchange(0); sig != 0) {
      res.interrupted = true;
      signal_all(kids, sig);
      if (!tearing_down) tearing_down = true, teardown_at = clk::now();
    }
    for (auto& c : kids) {
      if (c.done) continue;
      int status = 0;
      pid_t p = ::waitpid(c.pid, &status, WNOHANG);
      if (p != c.pid) continue;
      c.done = true;
      --remaining;
      c.exit.rank = c.rank;
      c.exit.exited = WIFEXITED(status);
      c.exit.code = WIFEXITED(status) ? WEXITSTATUS(status) : 0;
      c.exit.signal = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
      const bool failed = !c.exit.exited || c.exit.code != 0;
      if (failed && (o.max_ranks > 0 || !o.join.empty()) && (c.rank != 0 || !o.join.empty()) &&
          res.first_failed < 0 && !res.interrupted) {
        res.lost.push_back(c.rank);  // invariants 5 and 6
        write_all(STDERR_FILENO, fmt::format("troupe-launch: {} {} lost: {}; the elastic group goes on without it\n",
                                             o.join.empty() ? "rank" : "joined process", c.rank, c.exit.reason()));
      } else if (failed && res.first_failed < 0 && !res.interrupted) {
        res.first_failed = c.rank;
        if (remaining == 0) {
          write_all(STDERR_FILENO, fmt::format("troupe-launch: rank {} failed: {}\n", c.rank, c.exit.reason()));
        } else if (o.settle_ms > 0) {
          write_all(STDERR_FILENO, fmt::format("troupe-launch: rank {} failed: {}; the other {} rank(s) get {} ms to "
                                               "stop on their own\n",
                                               c.rank, c.exit.reason(), remaining, o.settle_ms));
          settle_until = clk::now() + std::chrono::milliseconds(o.settle_ms);
        } else {
          write_all(STDERR_FILENO, fmt::format("troupe-launch: rank {} failed: {}; stopping the other {} rank(s)\n",
                                               c.rank, c.exit.reason(), remaining));
          signal_all(kids, SIGTERM);
          tearing_down = true;
          teardown_at = clk::now();
        }
      } else if (res.first_failed >= 0 || res.interrupted) {
        write_all(STDERR_FILENO, fmt::format("troupe-launch: rank {} exited: {}\n", c.rank, c.exit.reason()));
      }
    }
    if (settle_until && !tearing_down && remaining > 0 && clk::now() > *settle_until) {
      write_all(STDERR_FILENO, fmt::format("troupe-launch: stopping the remaining {} rank(s)\n", remaining));
      signal_all(kids, SIGTERM);
      tearing_down = true;
      teardown_at = clk::now();
    }
    if (tearing_down && remaining > 0 &&
        clk::now() - teardown_at > std::chrono::milliseconds(o.grace_ms)) {
      signal_all(kids, SIGKILL);
      teardown_at = clk::now() + std::chrono::hours(1);  // once
    }
  }
  for (auto& c : kids) {
    // Output still buffered in closed pipes was flushed above; flush partial lines.
    if (c.out_fd >= 0) drain(c.out_fd, c.out_buf), ::close(c.out_fd);
    if (c.err_fd >= 0) drain(c.err_fd, c.err_buf), ::close(c.err_fd);
    flush_lines(c.out_buf, STDOUT_FILENO, c.rank, o.prefix_output, true, !o.join.empty());
    flush_lines(c.err_buf, STDERR_FILENO, c.rank, o.prefix_output, true, !o.join.empty());
    res.ranks.push_back(c.exit);
  }
  ::sigaction(SIGINT, &old_int, nullptr);
  ::sigaction(SIGTERM, &old_term, nullptr);
  ::sigaction(SIGHUP, &old_hup, nullptr);
  if (!o.join.empty() && res.first_failed < 0 && !res.lost.empty() && res.lost.size() == kids.size()) {
    res.first_failed = res.lost.front();  // invariant 6: not one process joined and stayed
    res.lost.clear();
  }
  if (res.first_failed >= 0) {
    res.summary = fmt::format("rank {} failed: {}", res.first_failed,
                              res.ranks[static_cast<size_t>(res.first_failed)].reason());
  } else if (res.interrupted) {
    res.summary = "interrupted: the signal was forwarded to every rank";
  } else if (!res.lost.empty()) {
    res.summary = fmt::format("the other rank(s) exited with code 0");
  } else {
    res.summary = fmt::format("all {} rank(s) exited with code 0", o.nprocs);
  }
  if (!res.lost.empty()) res.summary += fmt::format("; rank(s) {} lost on the way", fmt::join(res.lost, ", "));
  return res;
}

}  // namespace troupe::launch
