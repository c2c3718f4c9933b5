#include "launch/commands.h"

namespace troupe::launch {

void register_commands(CLI::App& app) {
  register_info(app);
}

}  // namespace troupe::launch
