#pragma once
#include "../common/views.h"

namespace anomfast {
int fused_cpu(const FusedArgs& a);  // FusedStatus (views.h)
void fit_sml_cpu(const FitArgs& a);
const char* cpu_isa();
}  // namespace anomfast
