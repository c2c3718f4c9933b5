// actors/messages.h — how control-plane messages ride in CAF 0.17 messages.
//
// Every message type is a protobuf message from runtime/proto/control.proto. CAF sees
// it through one generic `inspect`: serializers get the protobuf wire bytes, the
// stringification inspector gets the protobuf text form (so CAF logs and to_string are
// readable). A type must be registered with add_control_messages() to cross a process
// boundary; in-process delivery needs no registration (CAF moves the object), which is
// why an unregistered type fails only across the network (tests/unit/actors_messages_test).
//
//   caf::actor_system_config cfg;
//   troupe::actors::add_control_messages(cfg);     // before constructing the system
//   self->send(supervisor, control::Heartbeat{...});
#pragma once
#include <caf/all.hpp>
#include <google/protobuf/message.h>

#include <string>
#include <type_traits>

#include "runtime/proto/control.pb.h"

namespace troupe::control {

// ADL finds this for every generated message type (they live in troupe::control).
template <class Inspector, class T>
std::enable_if_t<std::is_base_of_v<google::protobuf::Message, T>, typename Inspector::result_type> inspect(
    Inspector& f, T& x) {
  if constexpr (std::is_same_v<Inspector, caf::detail::stringification_inspector>) {
    std::string text = x.ShortDebugString();
    return f(caf::meta::type_name(T::descriptor()->name().c_str()), text);
  } else {
    std::string wire;
    if constexpr (Inspector::reads_state) wire = x.SerializeAsString();
    auto load = [&]() -> caf::error {
      if (!x.ParseFromString(wire)) return caf::make_error(caf::sec::invalid_argument, "malformed protobuf");
      return caf::none;
    };
    return f(caf::meta::type_name(T::descriptor()->name().c_str()), wire, caf::meta::load_callback(load));
  }
}

}  // namespace troupe::control

namespace troupe::actors {

// Atoms for messages that never leave a process (timers, the local job driver).
using heartbeat_tick_atom = caf::atom_constant<caf::atom("hb_tick")>;
using check_tick_atom = caf::atom_constant<caf::atom("chk_tick")>;
using wait_group_atom = caf::atom_constant<caf::atom("wait_grp")>;
using run_command_atom = caf::atom_constant<caf::atom("run_cmd")>;
using shutdown_atom = caf::atom_constant<caf::atom("shutdown")>;
using report_atom = caf::atom_constant<caf::atom("report")>;
using progress_atom = caf::atom_constant<caf::atom("progress")>;
using members_atom = caf::atom_constant<caf::atom("members")>;
using expert_loads_atom = caf::atom_constant<caf::atom("exp_loads")>;
using placements_atom = caf::atom_constant<caf::atom("placements")>;
using late_join_atom = caf::atom_constant<caf::atom("late_join")>;

// Registers every control message (control.proto) under "troupe.<Name>".
void add_control_messages(caf::actor_system_config& cfg);

// The names registered, in a fixed order (tests send one of each).
const std::vector<std::string>& control_message_names();

}  // namespace troupe::actors
