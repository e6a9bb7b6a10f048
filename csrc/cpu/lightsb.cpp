// CPU entry point of the fused LightSB pass (lightsb.h): validates, runs the ISA-specific kernel.
#include "lightsb.h"

#include "fastopt/api.h"
#include "isa.h"

namespace fastopt {
FASTOPT_CPU_KERNEL_DECL(void lightsb_run(const LightSbArgs& a))

void lightsb_cpu(const LightSbArgs& a) {
  check_lightsb_args(a);
  check_arg(a.la != 0 && a.cen != 0 && a.sig != 0, "lightsb: null parameter address");
  check_arg(a.n == 0 || (a.pts != 0 && a.out != 0), "lightsb: null tensor address");
  FASTOPT_CPU_KERNEL_CALL(lightsb_run, a);
}

}  // namespace fastopt
