// What the three parts of the service config share (service_config_toml.cpp,
// service_config_resolve.cpp, tenant_access.cpp); not for other users.
#pragma once

#include <string>

#include "api/server/service_config.h"
#include "kvtier/status.h"

namespace kvtier::config_detail {

/// Cross-field checks shared by parsing and resolve().
Status validate_fields(const ServiceConfig& c);
/// The whole file; kNotFound when it does not exist.
Result<std::string> read_file(const std::string& what, const std::string& path);

}  // namespace kvtier::config_detail
