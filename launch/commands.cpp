#include "launch/commands.h"

#include "parallel/model/model_weights.h"

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
  register_scale(app);
}

int64_t total_parameters(const runtime::model_config& c) {
  int64_t n = 0;
  for (const auto& [name, shape] : parallel::model_weights::specs(c)) {
    int64_t k = 1;
    for (int64_t d : shape) k *= d;
    n += k;
  }
  return n;
}

}  // namespace troupe::launch
