// The tensor-core planner (cuda/tc_problem.h, plain C++) against brute force.
// max_tile_rows must be the most phase rows that any of a grid's kTcBlockM-pixel tiles spans, and for forward
// and grad_input problems the planned max_patch_pixels must be exactly the largest staged patch of any tile
// (rows spanned plus the taps' halo, times the phase width plus the halo, as the kernel's patch_of sizes
// it): smaller and a tile would overrun its shared-memory stage; larger and shapes that fit fall back to
// the slow gather kernel (the sweep's k5 s1 point did, at twice eager's time). Also: the epilogue's staged
// tile layout (a permutation, free of shared-memory bank conflicts for the kernel's accesses) and the
// planner's refusal of problems whose 32-bit in-image or in-group offsets would overflow. And the forward's
// epilogue clusters (tc_epilogue_cluster): the kernel's row-order pixel map must be each phase's own pixels,
// every output pixel once.
#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

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

// The largest staged patch over every tile of every phase, walking the tiles one by one; box_w / box_h (when
// given): the widest patch row and the most patch rows, which the TMA's one box size must cover.
int largest_patch(const TcProblem& pr, int* box_w = nullptr, int* box_h = nullptr) {
  int largest = 0;
  if (box_w) *box_w = *box_h = 0;
  for (int i = 0; i < pr.phases; ++i) {
    const TcPhase& ph = pr.phase[i];
    const int halo_h = *std::max_element(ph.off_h, ph.off_h + ph.taps_h) - *std::min_element(ph.off_h, ph.off_h + ph.taps_h);
    const int halo_w = *std::max_element(ph.off_w, ph.off_w + ph.taps_w) - *std::min_element(ph.off_w, ph.off_w + ph.taps_w);
    const int count = ph.extent_h * ph.extent_w;
    for (int m0 = 0; m0 < count; m0 += kTcBlockM) {
      const int rows = (std::min(m0 + kTcBlockM, count) - 1) / ph.extent_w - m0 / ph.extent_w + 1;
      largest = std::max(largest, (rows + halo_h) * (ph.extent_w + halo_w));
      if (box_w) {
        *box_w = std::max(*box_w, ph.extent_w + halo_w);
        *box_h = std::max(*box_h, rows + halo_h);
      }
    }
  }
  return largest;
}

void check_plan(const char* which, bool planned, const TcProblem& pr, const fused_convt::ConvTransposeParams& p,
                int* accepted) {
  if (!planned) return;  // outside the fast path's limits: the gather kernel runs it
  ++*accepted;
  int box_w = 0, box_h = 0;
  const int largest = largest_patch(pr, &box_w, &box_h);
  CHECK_MSG(pr.patch_box_w == box_w && pr.patch_box_h == box_h,
            std::string(which) + " " + test::describe(p) + ": TMA box " + std::to_string(pr.patch_box_w) + " x " +
                std::to_string(pr.patch_box_h) + ", tiles need " + std::to_string(box_w) + " x " + std::to_string(box_h));
  CHECK_MSG(largest == pr.max_patch_pixels, std::string(which) + " " + test::describe(p) + ": planned " +
                                                std::to_string(pr.max_patch_pixels) + ", tiles need " +
                                                std::to_string(largest));
  CHECK_MSG(pr.max_patch_pixels <= kTcMaxPatchPixels, std::string(which) + " " + test::describe(p));
}

// Most words any one of the 32 banks serves in one shared-memory wavefront group: the accesses of `lanes`
// (word address, width in words; a negative address: an inactive lane), split the way the hardware splits them (8-byte accesses by half-warp,
// 16-byte ones by quarter-warp). 1 means conflict-free.
int bank_conflict_ways(const std::vector<std::pair<int, int>>& lanes) {
  const int width = lanes.front().second, group = width == 4 ? 8 : width == 2 ? 16 : 32;
  int worst = 0;
  for (size_t first = 0; first < lanes.size(); first += group) {
    std::vector<std::vector<int>> words(32);
    for (size_t lane = first; lane < first + group && lane < lanes.size(); ++lane)
      for (int k = 0; lanes[lane].first >= 0 && k < lanes[lane].second; ++k) {
        const int word = lanes[lane].first + k;
        std::vector<int>& bank = words[word % 32];
        if (std::find(bank.begin(), bank.end(), word) == bank.end()) bank.push_back(word);
      }
    for (const std::vector<int>& bank : words) worst = std::max(worst, int(bank.size()));
  }
  return worst;
}

// The staged rows of 16 channels (tc_stage_offset), row_bytes 32 (16-bit) or 64 (float): each row's pieces are
// a permutation of its own 16-byte slots; ldmatrix's eight 16-byte row reads of rows r..r+7 (any r, any
// piece) are conflict-free; a warp's 16-byte copies of consecutive rows' pieces fill whole 128-byte lines.
void check_stage_layout(int row_bytes) {
  const std::string label = "staged rows of " + std::to_string(row_bytes) + " bytes";
  const int pieces = row_bytes / 16;
  for (int row = 0; row < 64; ++row) {
    std::vector<int> seen(pieces, 0);
    for (int q = 0; q < pieces; ++q) {
      const int offset = fused_convt::tc_stage_offset(row, q, row_bytes);
      CHECK_MSG(offset % 16 == 0 && offset / row_bytes == row, label + ": a piece left its row");
      if (offset / row_bytes == row) ++seen[(offset % row_bytes) / 16];
    }
    CHECK_MSG(std::count(seen.begin(), seen.end(), 1) == pieces, label + ": pieces of a row collide");
  }
  for (int first = 0; first < 64; ++first)
    for (int q = 0; q < pieces; ++q) {
      std::vector<std::pair<int, int>> reads;
      for (int r = 0; r < 8; ++r) reads.push_back({fused_convt::tc_stage_offset(first + r, q, row_bytes) / 4, 4});
      CHECK_MSG(bank_conflict_ways(reads) == 1, label + ": ldmatrix rows from " + std::to_string(first) + " conflict");
    }
  std::vector<int> lines;
  for (int lane = 0; lane < 32; ++lane)
    lines.push_back(fused_convt::tc_stage_offset(lane / pieces, lane % pieces, row_bytes) / 128);
  std::sort(lines.begin(), lines.end());
  CHECK_MSG(std::unique(lines.begin(), lines.end()) - lines.begin() == 4, label + ": a warp's copies span more than 4 lines");
}

// The epilogue's staged tile for a channel tile of BN: `columns` = min(BN, 32) per part, rows of stride floats.
// Writes: lane (g = lane / 4, t = lane % 4) stores columns 2t, 2t + 1 of fragment j at row g (+ 8); reads:
// lane l loads the four columns of a group at row l.
void check_epilogue_layout(int columns, int stride, int max_write_ways) {
  const std::string label = std::to_string(columns) + " columns, stride " + std::to_string(stride);
  std::vector<int> seen(columns, 0);
  for (int c = 0; c < columns; ++c) {
    const int slot = fused_convt::tc_epilogue_slot(c, columns);
    CHECK_MSG(slot >= 0 && slot < columns, label);
    if (slot >= 0 && slot < columns) ++seen[slot];
    CHECK_MSG(slot % 4 == c % 4, label + ": a group of four columns stays contiguous");
  }
  CHECK_MSG(std::count(seen.begin(), seen.end(), 1) == columns, label + ": slots are a permutation");
  for (int j = 0; j < columns / 8; ++j)
    for (int h = 0; h < 2; ++h) {
      std::vector<std::pair<int, int>> writes;
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, t = lane % 4;
        writes.push_back({(g + 8 * h) * stride + fused_convt::tc_epilogue_slot(j * 8 + 2 * t, columns), 2});
      }
      const int ways = bank_conflict_ways(writes);
      CHECK_MSG(ways <= max_write_ways, label + ": fragment writes " + std::to_string(ways) + "-way");
    }
  for (int c = 0; c < columns; c += 4) {
    std::vector<std::pair<int, int>> reads;
    for (int lane = 0; lane < 32; ++lane) reads.push_back({lane * stride + fused_convt::tc_epilogue_slot(c, columns), 4});
    CHECK_MSG(bank_conflict_ways(reads) == 1, label + ": 16-byte reads conflict");
  }
}

// The staged tile of an epilogue cluster of S blocks (tc_cluster_stride): every block (slot s) puts column c of
// its tile row m into block c / share's tile at row m * S + s, column c % share. Each place of each block's
// tile must be written exactly once and fit tc_epilogue_tile_floats; the owner's 16-byte reads of 32
// consecutive rows must be conflict-free, and the fragment writes at most max_write_ways.
template <int BN>
void check_cluster_layout(int cluster, int max_write_ways) {
  const int columns = BN < 32 ? BN : 32, share = columns / cluster;
  const int stride = fused_convt::tc_cluster_stride(columns, cluster);
  const std::string label = "BN " + std::to_string(BN) + ", cluster " + std::to_string(cluster);
  const int floats = fused_convt::tc_epilogue_tile_floats<BN>();
  std::vector<int> written(size_t(cluster) * floats, 0);
  for (int slot = 0; slot < cluster; ++slot)
    for (int m = 0; m < kTcBlockM; ++m)
      for (int c = 0; c < columns; ++c) {
        const int at = (m * cluster + slot) * stride + c % share;
        CHECK_MSG(at + 1 <= floats, label + ": the tile overflows");
        if (at < floats) ++written[size_t(c / share) * floats + at];
      }
  CHECK_MSG(std::count(written.begin(), written.end(), 1) == cluster * kTcBlockM * columns &&
                std::count(written.begin(), written.end(), 0) == int(written.size()) - cluster * kTcBlockM * columns,
            label + ": places written other than once");
  for (int c = 0; c < share; c += 4) {
    std::vector<std::pair<int, int>> reads;
    for (int lane = 0; lane < 32; ++lane) reads.push_back({lane * stride + c, 4});
    CHECK_MSG(bank_conflict_ways(reads) == 1, label + ": 16-byte reads conflict");
  }
  for (int j = 0; j < columns / 8; ++j)
    for (int h = 0; h < 2; ++h)
      for (int owner = 0; owner < cluster; ++owner) {  // each destination's banks
        std::vector<std::pair<int, int>> writes;
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane / 4, c = j * 8 + 2 * (lane % 4);
          writes.push_back(c / share == owner ? std::make_pair((g + 8 * h) * cluster * stride + c % share, 2)
                                              : std::make_pair(-1, 2));
        }
        const int ways = bank_conflict_ways(writes);
        CHECK_MSG(ways <= max_write_ways, label + ": fragment writes " + std::to_string(ways) + "-way");
      }
}

// The kernel's store map under a cluster of S column phases (store_cluster in implicit_gemm_conv.cuh): any
// block (rank r) of the cluster of row phase `lead` stores place q of the cluster's row order, m = q / S and
// slot = q % S, at output (first_h + a * step_h) * dst_w + b * S + slot, where (a, b) is m in its own phase's
// grid, from the staged row m of the tile of rank (slot - first_w of rank 0) mod S. That must be the pixel
// that rank's phase computes at m, and the clusters together must write every output pixel exactly once.
void check_epilogue_cluster(const TcProblem& pr, const fused_convt::ConvTransposeParams& p, int* clustered) {
  const int s = fused_convt::tc_epilogue_cluster(pr);
  if (s == 1) return;
  ++*clustered;
  const std::string label = test::describe(p);
  std::vector<int> written(size_t(pr.dst_h) * pr.dst_w, 0);
  for (int lead = 0; lead < pr.phases; lead += s)
    for (int rank = 0; rank < s; ++rank) {
      const TcPhase& mine = pr.phase[lead + rank];
      for (int m = 0; m < mine.extent_h * mine.extent_w; ++m)
        for (int slot = 0; slot < s; ++slot) {
          const int at = (mine.first_h + m / mine.extent_w * pr.dst_step_h) * pr.dst_w + m % mine.extent_w * s + slot;
          const TcPhase& owner = pr.phase[lead + (slot - pr.phase[lead].first_w + s) % s];
          const int own = (owner.first_h + m / owner.extent_w * pr.dst_step_h) * pr.dst_w + owner.first_w +
                          m % owner.extent_w * pr.dst_step_w;
          CHECK_MSG(at == own, label + ": a cluster stores another phase's pixel");
          if (rank == 0 && at >= 0 && at < int(written.size())) ++written[at];
        }
    }
  CHECK_MSG(std::count(written.begin(), written.end(), 1) == int(written.size()),
            label + ": the clusters do not write every output pixel once");
}

// grad_input's sources pointed at the g pass's phase-split copy (grad_input_copy_layout): sample (a, b) of a
// source reads grad_output pixel (a * s_h + r_h, b * s_w + r_w); the kernel's index into the copy, pixel (a, b)
// of the source's plane, must be that pixel's row in the layout (PhaseSplitLayout::pixel_row), and lie in the
// plane exactly when the pixel lies in grad_output.
void check_grad_input_copy(TcProblem pr, const fused_convt::ConvTransposeParams& p, int* checked) {
  const int64_t out_h = p.out_h(), out_w = p.out_w();
  const fused_convt::PhaseSplitLayout g{p.batch, fused_convt::PhaseAxis{int(out_h), int(p.stride_h), int(p.pad_h)},
                                        fused_convt::PhaseAxis{int(out_w), int(p.stride_w), int(p.pad_w)},
                                        int64_t(pr.groups) * pr.src_padded};
  const std::string label = test::describe(p);
  fused_convt::PhaseSplitLayout eight = g;  // the g pass's own padding to 8 channels, where it differs
  eight.row = int64_t(pr.groups) * ((pr.src_per_group + 7) / 8 * 8);
  if (eight.row != g.row) CHECK_MSG(!fused_convt::grad_input_copy_layout(&pr, eight), label + ": 8-channel padding taken");
  if (!fused_convt::grad_input_copy_layout(&pr, g)) {
    CHECK_MSG(false, label + ": 16-channel padding refused");
    return;
  }
  ++*checked;
  // The TMA's view of the copy: one regular [plane][image][h'][w'] tensor exactly where every axis divides.
  const bool uniform = out_h % p.stride_h == 0 && out_w % p.stride_w == 0;
  CHECK_MSG((pr.copy_planes > 0) == uniform, label + ": uniform planes");
  if (pr.copy_planes > 0) {
    CHECK_MSG(pr.copy_planes == p.stride_h * p.stride_w, label + ": plane count");
    for (int i = 0; i < pr.phases; ++i)
      CHECK_MSG(pr.copy_extent_h[i] == pr.copy_plane_h && pr.copy_extent_w[i] == pr.copy_plane_w &&
                    pr.copy_first_row[i] == int64_t(pr.copy_plane[i]) * p.batch * pr.copy_plane_h * pr.copy_plane_w,
                label + ": plane " + std::to_string(i) + " is not where the TMA map puts it");
  }
  const int64_t n = p.batch - 1;
  for (int i = 0; i < pr.phases; ++i) {
    const TcPhase& ph = pr.phase[i];
    for (int a = -2; a * p.stride_h + ph.src_offset_h < out_h + 2 * p.stride_h; ++a)
      for (int b = -2; b * p.stride_w + ph.src_offset_w < out_w + 2 * p.stride_w; ++b) {
        const int o_h = a * int(p.stride_h) + ph.src_offset_h, o_w = b * int(p.stride_w) + ph.src_offset_w;
        const int ca = a, cb = b;
        const bool inside = o_h >= 0 && o_h < out_h && o_w >= 0 && o_w < out_w;
        const bool in_plane = ca >= 0 && ca < pr.copy_extent_h[i] && cb >= 0 && cb < pr.copy_extent_w[i];
        CHECK_MSG(inside == in_plane, label + ": copy plane bounds");
        if (inside)
          CHECK_MSG(pr.copy_first_row[i] + (n * pr.copy_extent_h[i] + ca) * pr.copy_extent_w[i] + cb ==
                        g.pixel_row(n, o_h, o_w),
                    label + ": copy index");
      }
  }
}

}  // namespace

int main() {
  check_stage_layout(32);
  check_stage_layout(64);
  // BN 32 and 64 stage 32 columns: both access patterns conflict-free. BN 16 (16 columns) reads conflict-free;
  // its writes are 2-way (no stride of 16 + 4k avoids both).
  check_epilogue_layout(32, fused_convt::tc_epilogue_stride<64>(), 1);
  check_epilogue_layout(32, fused_convt::tc_epilogue_stride<32>(), 1);
  check_epilogue_layout(16, fused_convt::tc_epilogue_stride<16>(), 2);
  // Cluster tiles: conflict-free at S = 2; at S = 4 the fragment writes of a group of rows g * 4 are 2-way.
  check_cluster_layout<64>(2, 1);
  check_cluster_layout<32>(2, 1);
  check_cluster_layout<16>(2, 1);
  check_cluster_layout<64>(4, 2);
  check_cluster_layout<16>(4, 2);
  // The model itself: the natural column order at the same stride has 2-way writes (what the permutation fixes).
  {
    std::vector<std::pair<int, int>> writes;
    for (int lane = 0; lane < 32; ++lane) writes.push_back({(lane / 4) * 36 + 2 * (lane % 4), 2});
    CHECK(bank_conflict_ways(writes) == 2);
  }

  // 32-bit offsets: one channel per group padded to 16 in the channels-last source (64 x 16 x 2^18 x 16
  // values = 2^32, although the NCHW input has only 2^28), and a packed weight group of 64 taps x 2^21 output
  // channels x 16: both go to the gather kernel instead. (Narrow images: the patch itself fits.)
  {
    fused_convt::ConvTransposeParams wide;
    wide.batch = 1;
    wide.in_channels = wide.out_channels = wide.groups = 64;
    wide.in_h = int64_t(1) << 18;
    wide.in_w = 16;
    wide.kernel_h = wide.kernel_w = 2;
    wide.stride_h = wide.stride_w = 2;
    TcProblem planned;
    CHECK_MSG(!fused_convt::forward_tc_problem(wide, &planned), "channels-last image offsets overflow int32");
    wide.in_h = int64_t(1) << 14;  // 64 x 16 x 2^14 x 16 = 2^28: fits
    CHECK(fused_convt::forward_tc_problem(wide, &planned));
    fused_convt::ConvTransposeParams many;
    many.batch = 1;
    many.in_channels = 16;
    many.out_channels = int64_t(1) << 21;
    many.in_h = many.in_w = 1;
    many.kernel_h = many.kernel_w = 8;
    CHECK_MSG(!fused_convt::forward_tc_problem(many, &planned), "packed weight group offsets overflow int32");
    many.out_channels = int64_t(1) << 20;  // 64 x 2^20 x 16 = 2^30: fits
    CHECK(fused_convt::forward_tc_problem(many, &planned));
  }

  for (int extent_h = 1; extent_h <= 40; ++extent_h)
    for (int extent_w = 1; extent_w <= 700; extent_w += extent_w < 300 ? 1 : 37)
      CHECK_MSG(fused_convt::max_tile_rows(extent_h, extent_w) == brute_force_tile_rows(extent_h, extent_w),
                std::to_string(extent_h) + " x " + std::to_string(extent_w));

  // Random problems, images up to 80 pixels a side and kernels up to 7 taps: many fit the fast path, some
  // (wide halos, long rows) do not.
  test::Rng rng(20261125);
  int accepted_forward = 0, accepted_grad_input = 0, clustered = 0, copied = 0;
  for (int trial = 0; trial < 4000; ++trial) {
    fused_convt::ConvTransposeParams p = test::random_params(rng, 80);
    p.kernel_h = rng.integer(1, 7);
    p.kernel_w = rng.integer(1, 7);
    if (!test::is_valid(p)) continue;
    TcProblem pr;
    if (fused_convt::forward_tc_problem(p, &pr)) check_epilogue_cluster(pr, p, &clustered);
    check_plan("forward", fused_convt::forward_tc_problem(p, &pr), pr, p, &accepted_forward);
    check_plan("grad_input", fused_convt::grad_input_tc_problem(p, &pr), pr, p, &accepted_grad_input);
    if (fused_convt::grad_input_tc_problem(p, &pr) && p.batch > 0) check_grad_input_copy(pr, p, &copied);
  }
  // The sweep's k5 s1 point (36 x 36 outputs): 8 rows of 36 plus a 4-row halo, 40 columns = 480 pixels.
  fused_convt::ConvTransposeParams k5;
  k5.batch = 32;
  k5.in_channels = k5.out_channels = 32;
  k5.in_h = k5.in_w = 32;
  k5.kernel_h = k5.kernel_w = 5;
  TcProblem pr;
  CHECK(fused_convt::forward_tc_problem(k5, &pr) && pr.max_patch_pixels == 480);
  CHECK_MSG(fused_convt::tc_epilogue_cluster(pr) == 1, "stride 1 has one column phase");
  // kb_v1 (64 x 64 input, k4 s2: 130 output columns, 65 per column phase) stores through clusters of two;
  // not with an NHWC destination (a pixel's channels are contiguous there), nor with 129 output columns
  // (output_padding 1 at padding 1: the column phases hold 65 and 64).
  fused_convt::ConvTransposeParams kb;
  kb.batch = 128;
  kb.in_channels = 64;
  kb.out_channels = 128;
  kb.in_h = kb.in_w = 64;
  kb.kernel_h = kb.kernel_w = 4;
  kb.stride_h = kb.stride_w = 2;
  CHECK(fused_convt::forward_tc_problem(kb, &pr) && fused_convt::tc_epilogue_cluster(pr) == 2);
  pr.dst_channels_last = 1;
  CHECK(fused_convt::tc_epilogue_cluster(pr) == 1);
  kb.pad_h = kb.pad_w = 1;
  kb.out_pad_w = 1;
  CHECK(fused_convt::forward_tc_problem(kb, &pr) && pr.dst_w == 129 && fused_convt::tc_epilogue_cluster(pr) == 1);
  CHECK_MSG(clustered > 100, "too few random problems store through clusters: " + std::to_string(clustered));
  CHECK_MSG(copied > 1000, "too few grad_input problems checked against the g copy: " + std::to_string(copied));
  // The launcher's rule on an H100 (132 SMs, 50 MiB L2): kb_v1's training forward clusters in TF32 (two blocks
  // per SM, 64-channel tiles of 4-byte values) and bf16; kb_v0's (16 output channels) does not.
  const int64_t l2 = int64_t(50) << 20;
  kb.pad_h = kb.pad_w = kb.out_pad_w = 0;
  CHECK(fused_convt::forward_tc_problem(kb, &pr));
  CHECK(fused_convt::tc_training_epilogue_cluster(pr, 64, 4, 2 * 132, l2) == 2);
  CHECK(fused_convt::tc_training_epilogue_cluster(pr, 64, 2, 2 * 132, l2) == 2);
  fused_convt::ConvTransposeParams kb0 = kb;
  kb0.in_channels = 32;
  kb0.out_channels = 16;
  kb0.in_h = kb0.in_w = 32;
  CHECK(fused_convt::forward_tc_problem(kb0, &pr) && fused_convt::tc_epilogue_cluster(pr) == 2);
  CHECK(fused_convt::tc_training_epilogue_cluster(pr, 16, 4, 2 * 132, l2) == 1);
  CHECK(fused_convt::tc_training_epilogue_cluster(pr, 16, 2, 3 * 132, l2) == 1);
  CHECK_MSG(accepted_forward > 1000 && accepted_grad_input > 1000,
            "too few problems on the fast path: " + std::to_string(accepted_forward) + " forward, " +
                std::to_string(accepted_grad_input) + " grad_input");
  return test::summary("test_tc_plan");
}
