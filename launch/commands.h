// launch/commands.h — registration of the `troupe` subcommands (one file each).
//
//   CLI::App app;  troupe::launch::register_commands(app);  app.parse(argc, argv);
//
// Subcommands run inside app.parse() via their callbacks and throw runtime::error on
// failure; main() prints it and exits 1.
#pragma once
#include <CLI/CLI.hpp>

#include <cstdint>

#include "runtime/io/hf_config.h"

namespace troupe::launch {

void register_commands(CLI::App& app);

void register_info(CLI::App& app);      // cmd_info.cpp
void register_inspect(CLI::App& app);   // cmd_inspect.cpp
void register_generate(CLI::App& app);  // cmd_generate.cpp
void register_init(CLI::App& app);      // cmd_init.cpp
void register_selftest(CLI::App& app);  // cmd_selftest.cpp
void register_train(CLI::App& app);     // cmd_train.cpp
void register_report(CLI::App& app);    // cmd_report.cpp
void register_plan(CLI::App& app);      // cmd_plan.cpp
void register_membench(CLI::App& app);  // cmd_membench.cpp
void register_serve(CLI::App& app);     // cmd_serve.cpp
void register_scale(CLI::App& app);     // cmd_scale.cpp

// The model's parameters, every rank's (a rank holding only its experts counts them all).
int64_t total_parameters(const runtime::model_config& c);

}  // namespace troupe::launch
