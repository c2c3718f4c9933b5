// launch/main.cpp — the `troupe` command line.
//
//   troupe --version
//   troupe info
//
// Each subcommand lives in launch/cmd_<name>.cpp and registers itself here.
#include <CLI/CLI.hpp>

#include <cstdio>

#include "launch/commands.h"
#include "runtime/error.h"
#include "runtime/log.h"

int main(int argc, char** argv) {
  CLI::App app{"troupe — actors that stand for accelerator workers"};
  app.set_version_flag("--version", std::string("troupe ") + TROUPE_VERSION);
  app.require_subcommand(1);
  troupe::launch::register_commands(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const troupe::runtime::error& e) {
    troupe::runtime::log::error("{}", e.what());
    return 1;
  } catch (const std::exception& e) {
    troupe::runtime::log::error("{}", e.what());
    return 1;
  }
  return 0;
}
