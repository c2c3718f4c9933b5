#include "launch/commands.h"

namespace troupe::launch {

void register_commands(CLI::App& app) {
  register_info(app);
  register_init(app);
  register_inspect(app);
  register_generate(app);
  register_selftest(app);
  register_report(app);
  register_plan(app);
  register_membench(app);
  register_train(app);
  register_serve(app);
}

}  // namespace troupe::launch
