// actors/messages.cpp — registration of the control messages with CAF.
#include "actors/messages.h"

namespace troupe::actors {

namespace {
template <class T>
void add(caf::actor_system_config& cfg) {
  cfg.add_message_type<T>("troupe." + T::descriptor()->name());
}
}  // namespace

void add_control_messages(caf::actor_system_config& cfg) {
  add<control::Join>(cfg);
  add<control::JoinReply>(cfg);
  add<control::Heartbeat>(cfg);
  add<control::Command>(cfg);
  add<control::StatsReport>(cfg);
  add<control::PlacementUpdate>(cfg);
  add<control::Scale>(cfg);
  add<control::Shutdown>(cfg);
  add<control::Exchange>(cfg);
  add<control::ExchangeResult>(cfg);
  add<control::Progress>(cfg);
  add<control::ExpertLoads>(cfg);
  add<control::MemberLost>(cfg);
  add<control::Publish>(cfg);
  add<control::Lookup>(cfg);
  add<control::Published>(cfg);
}

const std::vector<std::string>& control_message_names() {
  static const std::vector<std::string> names{"Join",  "JoinReply", "Heartbeat", "Command",  "StatsReport",
                                              "PlacementUpdate", "Scale", "Shutdown", "Exchange", "ExchangeResult", "Progress",
                                              "ExpertLoads", "MemberLost", "Publish", "Lookup", "Published"};
  return names;
}

}  // namespace troupe::actors
