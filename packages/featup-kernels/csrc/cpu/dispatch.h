// Which CPU kernel build runs: the best the CPU supports, or one forced (tests run both).
#pragma once

#include <string>

namespace featup::cpu {

// "avx2" or "default".
std::string active_isa();
// "auto", "avx2" or "default"; throws a ValueError for anything else or an unsupported choice.
void set_isa(const std::string& isa);

}  // namespace featup::cpu
