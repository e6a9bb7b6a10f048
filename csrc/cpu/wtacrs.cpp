// CPU entry point of the WTA-CRS row pass (wtacrs.h): validates, runs the ISA-specific kernel.
#include "wtacrs.h"

#include "fastopt/api.h"
#include "fastopt/dispatch.h"
#include "isa.h"

namespace fastopt {
FASTOPT_CPU_KERNEL_DECL(void wtacrs_rows_run(const WtacrsArgs& a))

void wtacrs_rows_cpu(const WtacrsArgs& a) {
  check_wtacrs_args(a);
  if (a.rows == 0) return;
  check_arg(a.src != 0 || a.cols == 0, "wtacrs_rows: null tensor address");
  if (a.pos == 0 && a.norms == 0) return;
  FASTOPT_CPU_KERNEL_CALL(wtacrs_rows_run, a);
}

}  // namespace fastopt
