#pragma once
#include "../common/views.h"

namespace anomfast {
void fused_cpu(const FusedArgs& a);
void fit_sml_cpu(const FitArgs& a);
const char* cpu_isa();
}  // namespace anomfast
