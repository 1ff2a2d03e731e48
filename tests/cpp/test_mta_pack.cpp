// Host self-check of the multi-tensor-apply packer (csrc/cuda/multi_tensor_apply.cuh, the part
// outside __CUDACC__). Simulates what the kernels would see: each launch's slot table and block
// table, and checks that every work unit of every tensor is handled exactly once, by a block whose
// slot was filled in that same launch, within the metadata limits.
#include "multi_tensor_apply.cuh"  // the host part (outside __CUDACC__): the launch packer

#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <set>
#include <utility>

using namespace slimops::cuda;

static int failures = 0;
static int checks = 0;
#define CHECK(c, ...) do { ++checks; if (!(c)) { ++failures; std::printf("FAIL %s:%d: ", __FILE__, __LINE__); std::printf(__VA_ARGS__); std::printf("\n"); } } while (0)

static void run_case(const std::vector<int64_t>& units, int max_tensors, int max_blocks) {
  std::vector<int64_t> slot_tensor(max_tensors, -1);
  std::vector<bool> slot_fresh(max_tensors, false);
  std::vector<std::pair<int, int64_t>> blocks(max_blocks, {-1, -1});
  std::vector<int> filled(max_blocks, 0);
  std::map<int64_t, std::set<int64_t>> seen;
  int launches = 0;
  int expected_blocks = 0;
  pack_units(
      units, max_tensors, max_blocks,
      [&](int slot, int64_t i) {
        CHECK(slot >= 0 && slot < max_tensors, "slot %d out of range", slot);
        slot_tensor[slot] = i;
        slot_fresh[slot] = true;
      },
      [&](int b, int slot, int64_t unit) {
        CHECK(b == expected_blocks, "block %d out of order (expected %d)", b, expected_blocks);
        CHECK(b >= 0 && b < max_blocks, "block %d out of range", b);
        CHECK(slot >= 0 && slot < max_tensors, "slot %d out of range", slot);
        blocks[b] = {slot, unit};
        ++expected_blocks;
      },
      [&](int n_blocks) {
        ++launches;
        CHECK(n_blocks > 0 && n_blocks <= max_blocks, "launch with %d blocks", n_blocks);
        CHECK(n_blocks == expected_blocks, "launch of %d blocks but %d were set", n_blocks, expected_blocks);
        for (int b = 0; b < n_blocks; ++b) {
          const int slot = blocks[b].first;
          CHECK(slot_fresh[slot], "block %d reads slot %d not set in this launch", b, slot);
          const int64_t t = slot_tensor[slot];
          CHECK(t >= 0 && t < (int64_t)units.size(), "slot %d has no tensor", slot);
          CHECK(blocks[b].second >= 0 && blocks[b].second < units[t], "unit %lld out of range for tensor %lld",
                (long long)blocks[b].second, (long long)t);
          CHECK(seen[t].insert(blocks[b].second).second, "tensor %lld unit %lld done twice", (long long)t,
                (long long)blocks[b].second);
        }
        std::fill(slot_fresh.begin(), slot_fresh.end(), false);
        expected_blocks = 0;
      });
  CHECK(expected_blocks == 0, "%d blocks never launched", expected_blocks);
  int64_t total = 0;
  for (size_t i = 0; i < units.size(); ++i) {
    const int64_t n = units[i] > 0 ? units[i] : 0;
    total += n;
    CHECK((int64_t)seen[i].size() == n, "tensor %zu: %zu of %lld units done", i, seen[i].size(), (long long)n);
  }
  // Lower bound on launches: blocks / max_blocks; the packer must not launch more often than
  // once per full block table or full slot table.
  CHECK(total > 0 || launches == 0, "launch with no work");
}

int main() {
  // Metadata sizes against the 4 KiB kernel-argument limit.
  static_assert(sizeof(ListMeta<1>) <= kMaxParamBytes - kOpParamBudget, "depth 1");
  static_assert(sizeof(ListMeta<2>) <= kMaxParamBytes - kOpParamBudget, "depth 2");
  static_assert(sizeof(ListMeta<3>) <= kMaxParamBytes - kOpParamBudget, "depth 3");
  static_assert(sizeof(ListMeta<6>) <= kMaxParamBytes - kOpParamBudget, "depth 6");
  for (int d = 1; d <= 8; ++d) std::printf("depth %d: %d tensors per launch\n", d, max_tensors_for_depth(d));
  std::printf("sizeof ListMeta<2>=%zu <3>=%zu <6>=%zu\n", sizeof(ListMeta<2>), sizeof(ListMeta<3>), sizeof(ListMeta<6>));

  // Fixed edge cases.
  run_case({}, 4, 8);
  run_case({0, 0, 0}, 4, 8);
  run_case({1}, 1, 1);
  run_case({5}, 1, 1);                  // one tensor over five launches
  run_case({3, 0, 2, 7, 1}, 2, 3);
  run_case({8, 8, 8}, 3, 8);            // table full exactly at tensor ends
  run_case({4, 4, 4, 4}, 2, 4);
  run_case({1, 1, 1, 1, 1, 1, 1}, 3, 320);  // slot-limited launches
  // Random cases.
  std::mt19937_64 rng(1234);
  for (int it = 0; it < 20000; ++it) {
    const int n = rng() % 12;
    std::vector<int64_t> units(n);
    for (auto& u : units) u = (rng() % 4 == 0) ? 0 : 1 + rng() % 20;
    run_case(units, 1 + rng() % 5, 1 + rng() % 16);
  }

  // Row geometry: teams divide a warp or are the whole block; units cover every row.
  for (int64_t len : {1, 2, 3, 9, 31, 32, 33, 1023, 1024, 5000}) {
    const int team = row_team(len);
    CHECK(team == kRowThreads || (team <= 32 && (32 % team) == 0), "row_len %lld team %d", (long long)len, team);
    CHECK(team == kRowThreads || team >= len || team == 32, "row_len %lld team %d too small", (long long)len, team);
    for (int64_t rows : {1, 2, 7, 255, 256, 257, 100000}) {
      const int64_t u = work_units(rows * len, len);
      CHECK(u * rows_per_unit(len) >= rows && (u - 1) * rows_per_unit(len) < rows, "rows %lld len %lld units %lld",
            (long long)rows, (long long)len, (long long)u);
    }
  }
  CHECK(work_units(0, 0) == 0 && work_units(0, 5) == 0, "empty tensor has units");
  CHECK(work_units(kChunkSize, 0) == 1 && work_units(kChunkSize + 1, 0) == 2, "chunk count");
  CHECK(work_units(int64_t(3) << 33, 0) == ceil_div(int64_t(3) << 33, kChunkSize), "large tensor chunk count");

  std::printf("%d passed, %d failed\n", checks - failures, failures);
  return failures ? 1 : 0;
}
