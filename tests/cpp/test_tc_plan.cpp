// The tensor-core planner (cuda/tc_problem.h, plain C++) against brute force.
// max_tile_rows must be the most phase rows that any of a grid's kTcBlockM-pixel tiles spans, and for forward
// and grad_input problems the planned max_patch_pixels must be exactly the largest staged patch of any tile
// (rows spanned plus the taps' halo, times the phase width plus the halo, as the kernel's patch_of sizes
// it): smaller and a tile would overrun its shared-memory stage; larger and shapes that fit fall back to
// the slow gather kernel (the sweep's k5 s1 point did, at twice eager's time).
#include <algorithm>
#include <cstdint>
#include <string>

#include "tc_problem.h"
#include "test_util.h"

namespace {

using fused_convt::kTcBlockM;
using fused_convt::kTcMaxPatchPixels;
using fused_convt::TcPhase;
using fused_convt::TcProblem;

int brute_force_tile_rows(int extent_h, int extent_w) {
  const int64_t count = int64_t(extent_h) * extent_w;
  int rows = 0;
  for (int64_t first = 0; first < count; first += kTcBlockM) {
    const int64_t last = std::min<int64_t>(first + kTcBlockM, count) - 1;
    rows = std::max(rows, int(last / extent_w - first / extent_w + 1));
  }
  return rows;
}

// The largest staged patch over every tile of every phase, walking the tiles one by one.
int largest_patch(const TcProblem& pr) {
  int largest = 0;
  for (int i = 0; i < pr.phases; ++i) {
    const TcPhase& ph = pr.phase[i];
    const int halo_h = *std::max_element(ph.off_h, ph.off_h + ph.taps_h) - *std::min_element(ph.off_h, ph.off_h + ph.taps_h);
    const int halo_w = *std::max_element(ph.off_w, ph.off_w + ph.taps_w) - *std::min_element(ph.off_w, ph.off_w + ph.taps_w);
    const int count = ph.extent_h * ph.extent_w;
    for (int m0 = 0; m0 < count; m0 += kTcBlockM) {
      const int rows = (std::min(m0 + kTcBlockM, count) - 1) / ph.extent_w - m0 / ph.extent_w + 1;
      largest = std::max(largest, (rows + halo_h) * (ph.extent_w + halo_w));
    }
  }
  return largest;
}

void check_plan(const char* which, bool planned, const TcProblem& pr, const fused_convt::ConvTransposeParams& p,
                int* accepted) {
  if (!planned) return;  // outside the fast path's limits: the gather kernel runs it
  ++*accepted;
  const int largest = largest_patch(pr);
  CHECK_MSG(largest == pr.max_patch_pixels, std::string(which) + " " + test::describe(p) + ": planned " +
                                                std::to_string(pr.max_patch_pixels) + ", tiles need " +
                                                std::to_string(largest));
  CHECK_MSG(pr.max_patch_pixels <= kTcMaxPatchPixels, std::string(which) + " " + test::describe(p));
}

}  // namespace

int main() {
  for (int extent_h = 1; extent_h <= 40; ++extent_h)
    for (int extent_w = 1; extent_w <= 700; extent_w += extent_w < 300 ? 1 : 37)
      CHECK_MSG(fused_convt::max_tile_rows(extent_h, extent_w) == brute_force_tile_rows(extent_h, extent_w),
                std::to_string(extent_h) + " x " + std::to_string(extent_w));

  // Random problems, images up to 80 pixels a side and kernels up to 7 taps: many fit the fast path, some
  // (wide halos, long rows) do not.
  test::Rng rng(20261125);
  int accepted_forward = 0, accepted_grad_input = 0;
  for (int trial = 0; trial < 4000; ++trial) {
    fused_convt::ConvTransposeParams p = test::random_params(rng, 80);
    p.kernel_h = rng.integer(1, 7);
    p.kernel_w = rng.integer(1, 7);
    if (!test::is_valid(p)) continue;
    TcProblem pr;
    check_plan("forward", fused_convt::forward_tc_problem(p, &pr), pr, p, &accepted_forward);
    check_plan("grad_input", fused_convt::grad_input_tc_problem(p, &pr), pr, p, &accepted_grad_input);
  }
  // The sweep's k5 s1 point (36 x 36 outputs): 8 rows of 36 plus a 4-row halo, 40 columns = 480 pixels.
  fused_convt::ConvTransposeParams k5;
  k5.batch = 32;
  k5.in_channels = k5.out_channels = 32;
  k5.in_h = k5.in_w = 32;
  k5.kernel_h = k5.kernel_w = 5;
  TcProblem pr;
  CHECK(fused_convt::forward_tc_problem(k5, &pr) && pr.max_patch_pixels == 480);
  CHECK_MSG(accepted_forward > 1000 && accepted_grad_input > 1000,
            "too few problems on the fast path: " + std::to_string(accepted_forward) + " forward, " +
                std::to_string(accepted_grad_input) + " grad_input");
  return test::summary("test_tc_plan");
}
