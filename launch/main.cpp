// launch/main.cpp — the `troupe` command line.
//
//   troupe --version
//   troupe info
//
// Each subcommand lives in launch/cmd_<name>.cpp and registers itself here.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <string>

#include "launch/commands.h"
#include "runtime/error.h"
#include "runtime/log.h"

int main(int argc, char** argv) {
  CLI::App app{"troupe — actors that stand for accelerator workers"};
  app.set_version_flag("--version", std::string("troupe ") + TROUPE_VERSION);
  app.require_subcommand(1);
  troupe::launch::register_commands(app);
  // The first word that is not an option must name a subcommand.
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a.empty() || a[0] == '-') continue;
    bool known = false;
    std::string names;
    for (const auto* sub : app.get_subcommands([](const CLI::App*) { return true; })) {
      known |= sub->get_name() == a;
      names += (names.empty() ? "" : ", ") + sub->get_name();
    }
    if (!known) {
      std::fprintf(stderr, "troupe: '%s' is not a troupe command (commands: %s); see troupe --help\n", a.c_str(),
                   names.c_str());
      return 2;
    }
    break;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::RuntimeError& e) {  // a command's own exit code (e.g. 3: a rank was lost)
    return e.get_exit_code();
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);  // prints the message (or the help / version text)
    return code == 0 ? 0 : 2;      // a usage error: 2, as getopt and argparse programs exit
  } catch (const troupe::runtime::error& e) {
    troupe::runtime::log::error("{}", e.what());
    return 1;
  } catch (const std::exception& e) {
    troupe::runtime::log::error("{}", e.what());
    return 1;
  }
  return 0;
}
