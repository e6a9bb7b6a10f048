// CPU entry points of dense M-FAC's window passes (csrc/cpu/mfac.h): check the arguments again
// (the Python wrapper already validated the tensors), then run the ISA-specific kernel body.
#include "mfac.h"

#include <stdexcept>
#include <string>

#include "fastopt/common.h"
#include "isa.h"

namespace fastopt {
FASTOPT_CPU_KERNEL_DECL(void mfac_dots_run(const MfacArgs& a))
FASTOPT_CPU_KERNEL_DECL(void mfac_update_run(const MfacArgs& a))

void check_mfac(const MfacArgs& a, bool update) {
  auto fail = [](const std::string& s) { throw std::invalid_argument("fastopt::mfac: " + s); };
  if (a.gdtype != kFloat32 && a.gdtype != kBFloat16) fail("the window is fp32 or bf16");
  if (a.rows < 1 || a.ld < 0 || a.nrows < 1 || a.nrows > a.rows) fail("bad window shape or nrows");
  if (!update && (a.slot < 0 || a.slot >= a.nrows)) fail("slot out of range");
  if (a.params.size() != a.grads.size() || a.params.size() != a.numels.size()) fail("list lengths differ");
  if (update && !a.momentum.empty() && a.momentum.size() != a.params.size()) fail("momentum list length");
  int64_t total = 0;
  for (size_t i = 0; i < a.numels.size(); ++i) {
    if (a.numels[i] < 0) fail("negative numel");
    if (a.numels[i] > 0 && (a.params[i] == 0 || a.grads[i] == 0)) fail("null tensor address");
    if (update && !a.momentum.empty() && a.numels[i] > 0 && a.momentum[i] == 0) fail("null momentum address");
    total += a.numels[i];
  }
  if (total != a.ld) fail("the numels do not sum to the window's columns");
  if (a.ld > 0 && a.window == 0) fail("null window");
  if (!update && a.dots_x == 0) fail("null dots_x");
  if (update && a.coef == 0) fail("null coef");
}

void mfac_dots_cpu(const MfacArgs& a) {
  check_mfac(a, false);
  FASTOPT_CPU_KERNEL_CALL(mfac_dots_run, a);
}

void mfac_update_cpu(const MfacArgs& a) {
  check_mfac(a, true);
  if (a.ld == 0) return;
  FASTOPT_CPU_KERNEL_CALL(mfac_update_run, a);
}

}  // namespace fastopt
