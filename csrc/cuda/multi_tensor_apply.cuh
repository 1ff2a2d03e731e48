// Chunked multi-tensor apply: one kernel launch works on many tensors of a list at once.
//
// The idea (PyTorch's / apex's multi_tensor_apply): the addresses and sizes of up to N tensors of
// every list ("depth" lists updated together: params, grads, state ...) travel as a by-value
// kernel argument, together with a block table that says which tensor and which work unit each
// block handles. Kernel arguments are limited to 4 KiB, so a long list takes several launches: the
// host packer starts a new launch whenever the tensor slots or the block table are full, and a
// tensor whose units do not all fit continues in the next launch.
//
// Two kinds of work unit:
//   chunks  kChunkSize consecutive elements of a tensor (elementwise updates), processed by
//           kChunkThreads threads with 16-byte vector loads when every pointer allows it;
//   rows    groups of rows of the tensor's group view (slices along dim 0, a 0-d tensor is one
//           row): a "team" of threads per row reduces over the row (warp shuffles, or the whole
//           block for long rows) and then rewrites it. Used by the group penalties (l21, l0_l21).
//
// Single-tensor ops (prox, prox_backward) reuse the same op code through grid-stride kernels that
// walk the whole tensor with a one-tensor metadata block (no block table limit).
//
// The part above `#ifdef __CUDACC__` is plain C++ (the packer and the metadata layout), so that it
// can be tested on a host without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "slimops/prox_math.h"

namespace slimops {
namespace cuda {

constexpr int kMaxParamBytes = 4096;    // portable kernel-argument limit
constexpr int kOpParamBudget = 512;     // left for the op functor's own fields
constexpr int kMaxBlocksPerLaunch = 320;
constexpr int64_t kChunkSize = 65536;   // elements per chunk work unit
constexpr int kChunkThreads = 512;
constexpr int kRowThreads = 256;
constexpr int64_t kBlockRowMin = 1024;  // rows at least this long get a whole block

// Tensor slots per launch for `depth` lists: what is left of the argument budget after the block
// table, divided by the per-tensor cost (one pointer per list, numel, row_len). The block table
// indexes slots with uint8_t, hence the cap.
constexpr int max_tensors_for_depth(int depth) {
  const int bytes = kMaxParamBytes - kOpParamBudget - kMaxBlocksPerLaunch * (1 + 4);
  const int n = bytes / (8 * depth + 16);
  return n < 255 ? n : 255;
}

// The kernel argument. Fields ordered largest-alignment first so the struct has no padding holes.
template <int kDepth>
struct ListMeta {
  static constexpr int kMaxTensors = max_tensors_for_depth(kDepth);
  void* ptr[kDepth][kMaxTensors];            // nullptr: that list is unused (e.g. no momentum)
  int64_t numel[kMaxTensors];
  int64_t row_len[kMaxTensors];              // group length (rows work); 1 for chunks work
  int32_t block_unit[kMaxBlocksPerLaunch];   // work unit of block b within its tensor
  uint8_t block_tensor[kMaxBlocksPerLaunch]; // slot of block b's tensor
};

// Threads that share one row: a power of two up to a warp for short rows (so the reduction is a
// few shuffles and a warp serves several rows), the whole block for long rows.
SLIMOPS_HD int row_team(int64_t row_len) {
  if (row_len >= kBlockRowMin) return kRowThreads;
  int team = 1;
  while (team < row_len && team < 32) team <<= 1;
  return team;
}

SLIMOPS_HD int64_t rows_per_unit(int64_t row_len) { return kRowThreads / row_team(row_len); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Work units of a tensor with `numel` elements and group rows of `row_len` (rows work) or in
// chunks (row_len <= 0).
inline int64_t work_units(int64_t numel, int64_t row_len) {
  if (numel == 0) return 0;
  if (row_len <= 0) return ceil_div(numel, kChunkSize);
  return ceil_div(numel / row_len, rows_per_unit(row_len));
}

// Packs the work units of a list into launches (host only, GPU-free).
//   units[i]                 work units of tensor i (0: the tensor is skipped)
//   on_tensor(slot, i)       tensor i occupies metadata slot `slot` of the launch being built
//   on_block(b, slot, unit)  block b of that launch works on unit `unit` of the tensor in `slot`
//   on_launch(n_blocks)      the metadata is complete: launch n_blocks blocks
// A launch is made when the block table is full, or when the tensor slots are full and the last
// tensor is complete. A tensor cut by a full block table is re-registered in slot 0 of the next
// launch, so its remaining units stay addressable.
template <typename OnTensor, typename OnBlock, typename OnLaunch>
void pack_units(const std::vector<int64_t>& units, int max_tensors, int max_blocks, OnTensor&& on_tensor,
                OnBlock&& on_block, OnLaunch&& on_launch) {
  int slots = 0;   // slots used in the launch being built
  int blocks = 0;  // blocks in the launch being built
  for (int64_t i = 0; i < static_cast<int64_t>(units.size()); ++i) {
    if (units[i] <= 0) continue;
    int slot = slots++;
    on_tensor(slot, i);
    for (int64_t u = 0; u < units[i]; ++u) {
      on_block(blocks++, slot, u);
      const bool tensor_done = u + 1 == units[i];
      if (blocks < max_blocks && !(tensor_done && slots == max_tensors)) continue;
      on_launch(blocks);
      blocks = 0;
      if (tensor_done) {
        slots = 0;
      } else {
        slot = 0;
        slots = 1;
        on_tensor(slot, i);
      }
    }
  }
  if (blocks > 0) on_launch(blocks);
}

}  // namespace cuda
}  // namespace slimops

#ifdef __CUDACC__

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <array>
#include <limits>

namespace slimops {
namespace cuda {

// ---- device helpers -------------------------------------------------------------------------

// Elements per 16-byte vector: 4 fp32, 2 fp64, 8 bf16/fp16.
template <typename T>
constexpr int vec_width() {
  return sizeof(T) >= 16 ? 1 : static_cast<int>(16 / sizeof(T));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) VecOf {
  T v[N];
};

// Pointer of list d for the tensor in `slot`, advanced by `offset` elements (nullptr stays).
template <typename T, typename Meta>
__device__ __forceinline__ T* slot_ptr(const Meta& m, int d, int slot, int64_t offset) {
  T* p = static_cast<T*>(m.ptr[d][slot]);
  return p == nullptr ? nullptr : p + offset;
}

// Applies fn(e) to the elements [0, n) of the kArrays arrays p[k]: e[k] holds element j of array k
// (storage type; loaded only for the bits of kLoads, so write-only outputs cost no read), fn updates
// e in place, and the slots set in kWrites are stored back. Arrays with p[k] == nullptr are neither
// loaded nor stored (fn must not read them). Thread `tid` of `nthreads`
// takes a strided share: a block over a chunk (tid = threadIdx.x) or a grid over a tensor.
//
// When every non-null pointer is 16-byte aligned (a chunk starts at a multiple of kChunkSize, so
// that is the alignment of the tensor's storage), the body moves one 16-byte vector per array per
// step; the remainder (n not a multiple of the vector width, or misaligned pointers: all of n)
// takes the scalar path, which loads kVec strided elements per thread before computing so that
// several loads are in flight.
template <typename scalar_t, int kArrays, unsigned kLoads, unsigned kWrites, typename Fn>
__device__ __forceinline__ void foreach_elements(scalar_t* const (&p)[kArrays], int64_t n, int64_t tid,
                                                 int64_t nthreads, Fn&& fn) {
  constexpr int kVec = vec_width<scalar_t>();
  using Vec = VecOf<scalar_t, kVec>;
  bool aligned = true;
#pragma unroll
  for (int k = 0; k < kArrays; ++k)
    aligned = aligned && (p[k] == nullptr || reinterpret_cast<uintptr_t>(p[k]) % sizeof(Vec) == 0);

  int64_t done = 0;
  if (aligned) {
    const int64_t n_vec = n / kVec;
    for (int64_t i = tid; i < n_vec; i += nthreads) {
      Vec r[kArrays] = {};
#pragma unroll
      for (int k = 0; k < kArrays; ++k)
        if (((kLoads >> k) & 1u) && p[k] != nullptr) r[k] = reinterpret_cast<const Vec*>(p[k])[i];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        scalar_t e[kArrays];
#pragma unroll
        for (int k = 0; k < kArrays; ++k) e[k] = r[k].v[j];
        fn(e);
#pragma unroll
        for (int k = 0; k < kArrays; ++k)
          if ((kWrites >> k) & 1u) r[k].v[j] = e[k];
      }
#pragma unroll
      for (int k = 0; k < kArrays; ++k)
        if (((kWrites >> k) & 1u) && p[k] != nullptr) reinterpret_cast<Vec*>(p[k])[i] = r[k];
    }
    done = n_vec * kVec;
  }

  for (int64_t base = done; base < n; base += nthreads * kVec) {
    scalar_t r[kVec][kArrays] = {};
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t idx = base + tid + j * nthreads;
      if (idx < n) {
#pragma unroll
        for (int k = 0; k < kArrays; ++k)
          if (((kLoads >> k) & 1u) && p[k] != nullptr) r[j][k] = p[k][idx];
      }
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t idx = base + tid + j * nthreads;
      if (idx < n) {
        fn(r[j]);
#pragma unroll
        for (int k = 0; k < kArrays; ++k)
          if (((kWrites >> k) & 1u) && p[k] != nullptr) p[k][idx] = r[j][k];
      }
    }
  }
}

// Loads (kLoads) / stores (kWrites) element j of the non-null arrays (row kernels: plain strided
// access, coalesced across the lanes of a team).
template <unsigned kLoads, typename scalar_t, int kArrays>
__device__ __forceinline__ void load_slots(scalar_t* const (&p)[kArrays], int64_t j, scalar_t (&e)[kArrays]) {
#pragma unroll
  for (int k = 0; k < kArrays; ++k)
    if (((kLoads >> k) & 1u) && p[k] != nullptr) e[k] = p[k][j];
}

template <unsigned kWrites, typename scalar_t, int kArrays>
__device__ __forceinline__ void store_slots(scalar_t* const (&p)[kArrays], int64_t j, const scalar_t (&e)[kArrays]) {
#pragma unroll
  for (int k = 0; k < kArrays; ++k)
    if (((kWrites >> k) & 1u) && p[k] != nullptr) p[k][j] = e[k];
}

// Sums v over the `team` aligned lanes of a warp (team a power of two <= 32). Every lane of the
// warp must call it. The xor butterfly leaves every lane with the bitwise-same total (each step
// adds the same two numbers, in either order).
template <typename T, int K>
__device__ __forceinline__ void team_sum(T (&v)[K], int team) {
  for (int off = team >> 1; off > 0; off >>= 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);
  }
}

// Sums v over the block; every thread gets the same total. Every thread must call it.
template <typename T, int K>
__device__ __forceinline__ void block_sum(T (&v)[K]) {
  __shared__ T partial[K][32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n_warps = (blockDim.x + 31) >> 5;
  team_sum(v, 32);
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) partial[k][warp] = v[k];
  }
  __syncthreads();
  // Every warp reduces the partials itself: no broadcast step, same order hence same result.
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = lane < n_warps ? partial[k][lane] : T(0);
  team_sum(v, 32);
  __syncthreads();  // `partial` is rewritten by the next call
}

// ---- kernels --------------------------------------------------------------------------------
//
// An Op provides:
//   bool skip() const                               true: return without writing (found_inf)
//   Ctx context(const Meta&, int slot) const        per-tensor values (bias corrections ...)
// chunk work:
//   void chunk(meta, slot, ctx, begin, n, tid, nthreads) const
// row work:
//   using acc_t; static constexpr int kSums;        the row reduction's values
//   void row_partial(meta, slot, ctx, base, row_len, lane, team, acc_t (&sums)[kSums]) const
//   void row_finish(meta, slot, ctx, base, row_len, lane, team, const acc_t (&sums)[kSums]) const
// (`base` = first element of the row, `lane` in [0, team)).

template <typename Meta, typename Op>
__global__ void __launch_bounds__(kChunkThreads) chunk_kernel(const __grid_constant__ Meta meta, const Op op) {
  if (op.skip()) return;
  const int slot = meta.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_unit[blockIdx.x]) * kChunkSize;
  const int64_t left = meta.numel[slot] - begin;
  const int64_t n = left < kChunkSize ? left : kChunkSize;
  const auto ctx = op.context(meta, slot);
  op.chunk(meta, slot, ctx, begin, n, threadIdx.x, blockDim.x);
}

// Elementwise op over the whole tensor in slot 0, grid-stride.
template <typename Meta, typename Op>
__global__ void __launch_bounds__(kChunkThreads) elementwise_grid_kernel(const __grid_constant__ Meta meta,
                                                                          const Op op) {
  if (op.skip()) return;
  const auto ctx = op.context(meta, 0);
  op.chunk(meta, 0, ctx, 0, meta.numel[0], static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
           static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// One row unit: rows_per_unit(row_len) consecutive rows of the tensor in `slot`, one team each.
// Block-uniform control flow around the reductions (teams past the last row still take part).
template <typename Meta, typename Op, typename Ctx>
__device__ __forceinline__ void process_row_unit(const Meta& meta, const Op& op, const Ctx& ctx, int slot,
                                                 int64_t unit) {
  const int64_t row_len = meta.row_len[slot];
  const int64_t rows = meta.numel[slot] / row_len;
  const int team = row_team(row_len);
  const int64_t row = unit * (kRowThreads / team) + threadIdx.x / team;
  const int lane = threadIdx.x % team;
  const bool valid = row < rows;
  typename Op::acc_t sums[Op::kSums];
#pragma unroll
  for (int k = 0; k < Op::kSums; ++k) sums[k] = 0;
  if (valid) op.row_partial(meta, slot, ctx, row * row_len, row_len, lane, team, sums);
  if (team == kRowThreads) {
    block_sum(sums);
  } else {
    team_sum(sums, team);
  }
  if (valid) op.row_finish(meta, slot, ctx, row * row_len, row_len, lane, team, sums);
}

template <typename Meta, typename Op>
__global__ void __launch_bounds__(kRowThreads) row_kernel(const __grid_constant__ Meta meta, const Op op) {
  if (op.skip()) return;
  const int slot = meta.block_tensor[blockIdx.x];
  const auto ctx = op.context(meta, slot);
  process_row_unit(meta, op, ctx, slot, meta.block_unit[blockIdx.x]);
}

// Row op over the whole tensor in slot 0: blocks stride over its row units.
template <typename Meta, typename Op>
__global__ void __launch_bounds__(kRowThreads) row_grid_kernel(const __grid_constant__ Meta meta, const Op op,
                                                                int64_t units) {
  if (op.skip()) return;
  const auto ctx = op.context(meta, 0);
  for (int64_t u = blockIdx.x; u < units; u += gridDim.x) process_row_unit(meta, op, ctx, 0, u);
}

// ---- host launchers -------------------------------------------------------------------------

// Rows of the group view of t (slices along dim 0; a 0-d tensor is one group).
inline int64_t group_rows(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.size(0); }
inline int64_t group_row_len(const at::Tensor& t) { return t.numel() == 0 ? 1 : t.numel() / group_rows(t); }

// lists[d][i]: tensor i of list d (contiguous, same numel as lists[0][i]); an empty list d puts
// nullptr in its slots. lists[0] gives the sizes. kRows: row work (row_kernel), else chunk work.
template <int kDepth, bool kRows, typename Op>
void launch_list(const std::array<at::TensorList, kDepth>& lists, const Op& op) {
  using Meta = ListMeta<kDepth>;
  static_assert(sizeof(Meta) + sizeof(Op) + 16 <= kMaxParamBytes, "kernel arguments exceed 4 KiB");
  const at::TensorList ref = lists[0];
  std::vector<int64_t> units(ref.size());
  for (size_t i = 0; i < ref.size(); ++i) {
    units[i] = work_units(ref[i].numel(), kRows ? group_row_len(ref[i]) : 0);
    TORCH_CHECK(units[i] <= std::numeric_limits<int32_t>::max(), "slimops: tensor too large (", ref[i].numel(),
                " elements)");
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  Meta meta{};
  pack_units(
      units, Meta::kMaxTensors, kMaxBlocksPerLaunch,
      [&](int slot, int64_t i) {
        for (int d = 0; d < kDepth; ++d) meta.ptr[d][slot] = lists[d].empty() ? nullptr : lists[d][i].data_ptr();
        meta.numel[slot] = ref[i].numel();
        meta.row_len[slot] = kRows ? group_row_len(ref[i]) : 1;
      },
      [&](int b, int slot, int64_t unit) {
        meta.block_tensor[b] = static_cast<uint8_t>(slot);
        meta.block_unit[b] = static_cast<int32_t>(unit);
      },
      [&](int n_blocks) {
        if constexpr (kRows) {
          row_kernel<Meta, Op><<<n_blocks, kRowThreads, 0, stream>>>(meta, op);
        } else {
          chunk_kernel<Meta, Op><<<n_blocks, kChunkThreads, 0, stream>>>(meta, op);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

template <int kDepth, typename Op>
void launch_list_chunks(const std::array<at::TensorList, kDepth>& lists, const Op& op) {
  launch_list<kDepth, false>(lists, op);
}

template <int kDepth, typename Op>
void launch_list_rows(const std::array<at::TensorList, kDepth>& lists, const Op& op) {
  launch_list<kDepth, true>(lists, op);
}

// Metadata for one tensor (slot 0) of each list: the single-tensor ops.
template <int kDepth>
ListMeta<kDepth> single_meta(const std::array<at::Tensor, kDepth>& ts, bool rows) {
  ListMeta<kDepth> meta{};
  for (int d = 0; d < kDepth; ++d) meta.ptr[d][0] = ts[d].defined() ? ts[d].data_ptr() : nullptr;
  meta.numel[0] = ts[0].numel();
  meta.row_len[0] = rows ? group_row_len(ts[0]) : 1;
  return meta;
}

// Enough blocks to fill the device a few times over; the kernels stride over the rest.
inline int64_t grid_cap(int threads) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int64_t>(sms) * (2048 / threads) * 2;
}

template <int kDepth, typename Op>
void launch_tensor_elementwise(const std::array<at::Tensor, kDepth>& ts, const Op& op) {
  using Meta = ListMeta<kDepth>;
  static_assert(sizeof(Meta) + sizeof(Op) + 16 <= kMaxParamBytes, "kernel arguments exceed 4 KiB");
  const int64_t n = ts[0].numel();
  if (n == 0) return;
  // about four elements per thread before the grid-stride loop wraps, capped at a few waves
  const int64_t blocks = std::min(ceil_div(n, int64_t{kChunkThreads} * 4), grid_cap(kChunkThreads));
  const unsigned grid = static_cast<unsigned>(blocks);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  elementwise_grid_kernel<Meta, Op><<<grid, kChunkThreads, 0, stream>>>(single_meta<kDepth>(ts, false), op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int kDepth, typename Op>
void launch_tensor_rows(const std::array<at::Tensor, kDepth>& ts, const Op& op) {
  using Meta = ListMeta<kDepth>;
  static_assert(sizeof(Meta) + sizeof(Op) + 16 <= kMaxParamBytes, "kernel arguments exceed 4 KiB");
  const int64_t units = work_units(ts[0].numel(), group_row_len(ts[0]));
  if (units == 0) return;
  const unsigned grid = static_cast<unsigned>(std::min(units, grid_cap(kRowThreads)));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  row_grid_kernel<Meta, Op><<<grid, kRowThreads, 0, stream>>>(single_meta<kDepth>(ts, true), op, units);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace slimops

#endif  // __CUDACC__
