// runtime/process_limits.h — the process's resource limits that troupe depends on.
//
//   runtime::raise_open_file_limit();   // before opening many descriptors (connections, memfds)
//
// Invariants:
//   1. raise_open_file_limit sets RLIMIT_NOFILE's soft limit to its hard limit, once per process;
//      it never lowers a limit and never throws (a limit it cannot raise stays, logged at debug).
#pragma once

namespace troupe::runtime {

void raise_open_file_limit();

}  // namespace troupe::runtime
