// One parallel pass over a list of tensors for the CPU prox family.
//
// The work is cut into chunks (a range of elements of one tensor, or whole rows when the penalty
// couples a group = a slice along dim 0) and the chunks of all tensors are shared out by a single
// at::parallel_for: small tensors do not each pay a thread fork, large ones are split.
//
// The elementwise loops run in the ISA copy for this CPU (isa.h): isa_for_range compiles the loop body, inlined, in
// a base x86-64, an AVX2 and an AVX-512 function and calls the one cpu_isa() picks. The base copy is SSE2: 4 floats
// a vector and no 32 -> 16-bit pack for bfloat16 stores, which left the bf16 SGD step at 0.8x of torch's plain loop
// on 25M parameters and AdamW's divide and square root at 4 lanes. The copies do not contract a * b + c into an FMA
// (AVX-512F implies FMA; the base copy has none), so every copy rounds the same way: results are bit-identical across
// ISAs (tested). These loops are memory-bound; the FMA would buy nothing.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "convert16.h"
#include "isa.h"
#include "slimops/dispatch.h"
#include "slimops/prox_math.h"

namespace slimops {
namespace cpu {

#define SLIMOPS_ALWAYS_INLINE inline __attribute__((always_inline))

// ---- a piece of work in this CPU's ISA copy: isa_run(body), isa_for_range(begin, end, body) -------------------

// isa_run(body) calls body() compiled three times, into a base x86-64, an AVX2 and an AVX-512 function, and runs the
// one cpu_isa() picks. The copies are not inlined into their caller (that would compile them with the caller's ISA);
// the body lambda is inlined into each. It must be marked SLIMOPS_LAMBDA_INLINE: the copies' optimize("fp-contract=off")
// differs from the lambda's options, and GCC then declines to inline a large body (the group rows' body stayed an
// out-of-line base-ISA function, 3x slower). The body is copied into a local (and bodies capture by value): reached
// through a reference to the caller's frame, its captured floats (AdamW's step size, the thresholds) could alias the
// float arrays the loop stores to, and the loop stayed scalar (prox_adamw_ 3x slower); a local whose address never
// escapes lives in registers.
#define SLIMOPS_LAMBDA_INLINE __attribute__((always_inline))
template <typename Body>
__attribute__((noinline)) void run_base(const Body& body) {
  const Body local = body;
  local();
}
#if defined(__x86_64__) && defined(__GNUC__)
#define SLIMOPS_HAS_RANGE_COPIES 1
template <typename Body>
__attribute__((noinline, target("avx2"), optimize("fp-contract=off"))) void run_avx2(const Body& body) {
  const Body local = body;
  local();
}
template <typename Body>
__attribute__((noinline, target("avx512f,avx512bw,avx512vl"), optimize("fp-contract=off"))) void run_avx512(
    const Body& body) {
  const Body local = body;
  local();
}
#endif

template <typename Body>
inline void isa_run(const Body& body) {
#ifdef SLIMOPS_HAS_RANGE_COPIES
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return run_avx512(body);
    case CpuIsa::kAvx2: return run_avx2(body);
    default: break;
  }
#endif
  run_base(body);
}

// body(j) for j in [begin, end), in this CPU's ISA copy (the elementwise loops).
template <typename Body>
inline void isa_for_range(int64_t begin, int64_t end, const Body& body) {
  isa_run([=]() SLIMOPS_LAMBDA_INLINE {
    const Body local = body;
    for (int64_t j = begin; j < end; ++j) local(j);
  });
}

// Row sums in kSumLanes fixed lanes: lane l sums the terms k = l mod 16 in order, in blocks of 16 consecutive k, so
// that `lane[l] += ...` is a vector accumulator (a single running sum is a reduction GCC keeps scalar without
// -ffast-math), then the lanes are added in a fixed tree. Every ISA copy thus adds in the same order (16 floats are
// one zmm, two ymm or four xmm): the sums, and everything after them, are bit-identical across the copies. The
// terms are read from arrays already computed (the row's prox values): with the optimizer step inside the blocked
// loop, GCC unrolled the 16 lanes and vectorised little of it (3x slower than one scalar pass).
constexpr int kSumLanes = 16;

template <typename T>
SLIMOPS_ALWAYS_INLINE T lane_total(const T* lane) {
  T s[kSumLanes / 2];
  for (int i = 0; i < kSumLanes / 2; ++i) s[i] = lane[i] + lane[i + kSumLanes / 2];
  for (int w = kSumLanes / 4; w >= 1; w /= 2) {
    for (int i = 0; i < w; ++i) s[i] = s[i] + s[i + w];
  }
  return s[0];
}

// Σ_k x[k] y[k] over k in [0, n) (x, y in the math type), in lanes.
template <typename T>
SLIMOPS_ALWAYS_INLINE T lane_dot(const T* __restrict x, const T* __restrict y, int64_t n) {
  T lane[kSumLanes] = {};
  int64_t k = 0;
  for (; k + kSumLanes <= n; k += kSumLanes) {
    for (int l = 0; l < kSumLanes; ++l) lane[l] += x[k + l] * y[k + l];
  }
  for (int l = 0; k < n; ++k, ++l) lane[l] += x[k] * y[k];
  return lane_total(lane);
}

// Storage <-> math conversions that the compiler can vectorise: for bfloat16, convert16.h's branch-free
// rounding (c10's branches on NaN and keeps a fused loop scalar). Other types convert as static_cast does.
template <typename acc_t, typename T>
inline acc_t load(T v) {
  return static_cast<acc_t>(v);
}
template <>
inline float load<float, c10::BFloat16>(c10::BFloat16 v) {
  return bf16_bits_to_float(v.x);
}
template <typename scalar_t, typename acc_t>
inline scalar_t store(acc_t v) {
  return static_cast<scalar_t>(v);
}
template <>
inline c10::BFloat16 store<c10::BFloat16, float>(float f) {
  return c10::BFloat16(float_to_bf16_bits(f), c10::BFloat16::from_bits());
}

// dst = v rounded to the storage type. For bfloat16 it writes the bits, not the struct: GCC does not
// vectorise an aggregate copy of c10::BFloat16 into memory.
template <typename scalar_t, typename acc_t>
inline void put(scalar_t& dst, acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    dst.x = store<scalar_t>(v).x;
  } else {
    dst = store<scalar_t>(v);
  }
}

// v rounded to the storage type and back: for a step that reads back the value it stores (SGD's momentum buffer).
template <typename scalar_t, typename acc_t>
inline acc_t round_to(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::Half> && std::is_same_v<acc_t, float>) {
    return round_through_half(v);
  } else {
    return load<acc_t>(store<scalar_t>(v));
  }
}

// (mask ? a : b) for a mask of all ones or all zeros, as bit operations on values already computed. GCC leaves a
// loop scalar where a ?: on floats has a loop-invariant condition (the bfloat16 AdamW step ran 5x slower than
// float32) or where it moves a float operation into one arm (it keeps that a branch under -ftrapping-math: the
// quant family's FDA gradient); and / or on the bits vectorise, and give the same value.
template <typename T>
inline T select_bits(uint64_t mask, T a, T b) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8);
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  U ua, ub;
  std::memcpy(&ua, &a, sizeof(T));
  std::memcpy(&ub, &b, sizeof(T));
  const U m = static_cast<U>(mask);
  const U r = (ua & m) | (ub & ~m);
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

struct Chunk {
  int64_t tensor;  // index into the list
  int64_t begin;   // first element (elementwise) or first row (group penalties)
  int64_t end;     // one past the last
};

constexpr int64_t kChunkElems = 1 << 15;  // 128 KiB of fp32 per chunk: fits L2, amortises scheduling
constexpr int64_t kSerialBelow = 1 << 16; // fewer elements than this: one thread, no fork

// Rows of the group view of t: dim 0 (a 0-d tensor is one group of one element).
inline int64_t group_rows(const at::Tensor& t) { return t.dim() == 0 ? 1 : (t.numel() == 0 ? 0 : t.size(0)); }

inline std::vector<Chunk> make_chunks(at::TensorList tensors, bool by_rows) {
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < static_cast<int64_t>(tensors.size()); ++i) {
    const int64_t n = tensors[i].numel();
    if (n == 0) continue;
    if (!by_rows) {
      for (int64_t b = 0; b < n; b += kChunkElems) chunks.push_back({i, b, std::min(n, b + kChunkElems)});
    } else {
      const int64_t rows = group_rows(tensors[i]);
      const int64_t row_len = n / rows;
      const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElems / row_len);
      for (int64_t r = 0; r < rows; r += rows_per_chunk) chunks.push_back({i, r, std::min(rows, r + rows_per_chunk)});
    }
  }
  return chunks;
}

inline int64_t total_numel(at::TensorList tensors) {
  int64_t n = 0;
  for (const auto& t : tensors) n += t.numel();
  return n;
}

// Runs f(chunk) for every chunk in one parallel region.
template <typename F>
void parallel_chunks(at::TensorList tensors, bool by_rows, const F& f) {
  const std::vector<Chunk> chunks = make_chunks(tensors, by_rows);
  const int64_t n = static_cast<int64_t>(chunks.size());
  const int64_t grain = total_numel(tensors) < kSerialBelow ? std::max<int64_t>(n, 1) : 1;
  at::parallel_for(0, n, grain, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) f(chunks[c]);
  });
}

// The arrays an op's step reads or writes for one tensor of the list, besides the target: N streams of the
// target's numel elements (nullptr: not used in this call), and which of them the step reads and writes (bit s for
// stream s). target_read says whether the step reads the target's old value.
template <typename scalar_t, int N>
struct Streams {
  std::array<scalar_t*, N> ptr{};
  unsigned reads = 0;
  unsigned writes = 0;
  bool target_read = true;
};

// Staged 16-bit loops run in stages of this many elements (the buffers, 5 x 512 bytes at most, stay in L1).
constexpr int64_t kStageElems = 128;
// Read kStagePrefetch elements (four stages) ahead by software prefetch, one line per 32 elements. Without it, the
// staged AVX2 loop on 2 threads took 14.7-15.6 ms in three processes of five and 8.6 in the others (bf16 prox_adamw_,
// 25M); with it, 8.4-8.9 in all five (256 ahead: 8.4-9.0, 1024: 8.7-9.5).
constexpr int64_t kStagePrefetch = 512;

// The fused "update then prox" pass shared by every op of the family.
//
// For each tensor i of `targets` (storage scalar_t, updated in place):
//   streams(i) returns the op's Streams<scalar_t, N> for tensor i;
//   make_step(i, target, arrays) returns step(j) -> acc_t: performs the optimizer step for element j (writing any
//   state it owns to its streams) and returns the new value before the prox. It is generic in the element type of
//   `target` and `arrays` (std::array of N pointers, in stream order): the storage type, or float for the staged
//   16-bit loops below, so it reads with load<acc_t> and writes with put. It reads the target's old value through
//   `target`: with one pointer the compiler sees the same-index read/write and vectorises without alias checks;
//   make_post(i) returns post(j, v): called with the final value (after the prox), for ops that update a second
//   tensor from it (split_step_); it works on the storage directly.
// Elementwise penalties finish each element in one go; group penalties buffer a row in acc_t, take its norm, then
// store the block-soft-thresholded row.
//
// Staged loops: for float16 storage (every copy, elementwise and group rows) and bfloat16 (elementwise, in the AVX2
// and base copies), kStageElems elements of the target and of each stream read are converted to float buffers
// (convert16.h's array copies), the step and the prox run on the buffers, and what was written is converted back.
// The values are the same as converting element by element.
//   - bfloat16, AVX2 and base: the loop is compute-bound and staging is faster (convert16.h says why; prox_adamw_
//     on 25M, 1 thread: AVX2 20.8 -> 16.7 ms, base 43 -> 39).
//   - bfloat16, AVX-512: memory-bound, converted element by element. Staged it took 12 ms against 9.2-10.4, and in
//     some processes 25-30 (the stage's bursts of loads stalled on memory; a software prefetch removed that, not
//     the 12).
//   - float16: F16C converts where the copy has it. Element by element, c10's software conversion kept the loops
//     scalar (prox_adamw_ on 25M, 2 threads: AVX-512 9.8 -> 5.1-5.6 ms, AVX2 134 -> 8.1; prox_sgd_ with momentum,
//     which reads back the rounded buffer inside the step through round_to, AVX-512 11.2 -> 4.8, AVX2 119 -> 8.0;
//     l21 rows AVX2 85 -> 7.7).
template <typename scalar_t, typename acc_t, typename MakeStreams, typename MakeStep, typename MakePost>
void fused_update_prox(at::TensorList targets, const ProxParams& pp, const MakeStreams& streams,
                       const MakeStep& make_step, const MakePost& make_post) {
  const acc_t lam = static_cast<acc_t>(pp.lam);
  const acc_t a = static_cast<acc_t>(pp.a);
  const acc_t thresh = static_cast<acc_t>(pp.thresh);
  const acc_t gthresh = group_threshold<acc_t>(pp.penalty, lam, a);
  constexpr bool kBf16 = std::is_same_v<scalar_t, c10::BFloat16>;
  constexpr bool kStaged = (kBf16 || std::is_same_v<scalar_t, c10::Half>) && std::is_same_v<acc_t, float>;
  // float16 everywhere; bfloat16 elementwise outside the AVX-512 copy (see above), group rows never (staged, the l21
  // SGD step on 25M took 8.2 against 6.7 ms as AVX2 and 16.3 against 12.6 base: its row loops vectorise as they are)
  const bool staged_elementwise = !kBf16 || cpu_isa() != CpuIsa::kAvx512, staged_group = !kBf16;
  Converters16 conv{};
  if constexpr (kStaged) conv = converters16<scalar_t>();
  dispatch_penalty(pp.penalty, [&](auto P) {
    constexpr Penalty kP = decltype(P)::value;
    constexpr bool kGroup = kP == Penalty::kL21 || kP == Penalty::kL0L21;
    parallel_chunks(targets, kGroup, [&](const Chunk& ch) {
      scalar_t* out = targets[ch.tensor].data_ptr<scalar_t>();
      const auto st = streams(ch.tensor);
      auto post = make_post(ch.tensor);
      if constexpr (kStaged) {
        if (kGroup ? staged_group : staged_elementwise) {
          constexpr int N = static_cast<int>(std::tuple_size_v<decltype(st.ptr)>);
          const int64_t i = ch.tensor, c0 = ch.begin, c1 = ch.end;
          const int64_t row_len = kGroup ? targets[i].numel() / group_rows(targets[i]) : 1;
          std::vector<float> row_buf(kGroup ? row_len : 0);
          float* row = row_buf.data();
          isa_run([=]() SLIMOPS_LAMBDA_INLINE {
            alignas(64) float buf[N + 1][kStageElems];  // row 0: the target; row s + 1: stream s
            std::array<float*, N> arrays{};
            for (int s = 0; s < N; ++s) arrays[s] = st.ptr[s] != nullptr ? buf[s + 1] : nullptr;
            const auto step = make_step(i, buf[0], arrays);
            auto bits = [](scalar_t* p) { return reinterpret_cast<uint16_t*>(p); };
            // Elements [j0, j0 + len) of the target (if the step reads it) and of the streams it reads into buf, and a
            // prefetch of what follows, up to `end`.
            auto stage_in = [&](int64_t j0, int64_t len, int64_t end) {
              for (int64_t q = j0 + kStagePrefetch; q < std::min(j0 + kStagePrefetch + kStageElems, end); q += 32) {
                if (st.target_read) __builtin_prefetch(out + q, 1);
                for (int s = 0; s < N; ++s)
                  if ((st.reads >> s) & 1u) __builtin_prefetch(st.ptr[s] + q, 1);
              }
              if (st.target_read) conv.to_float(bits(out + j0), buf[0], len);
              for (int s = 0; s < N; ++s)
                if ((st.reads >> s) & 1u) conv.to_float(bits(st.ptr[s] + j0), buf[s + 1], len);
            };
            auto stage_out_streams = [&](int64_t j0, int64_t len) {
              for (int s = 0; s < N; ++s)
                if ((st.writes >> s) & 1u) conv.from_float(buf[s + 1], bits(st.ptr[s] + j0), len);
            };
            if constexpr (!kGroup) {
              for (int64_t j0 = c0; j0 < c1; j0 += kStageElems) {
                const int64_t len = std::min(kStageElems, c1 - j0);
                stage_in(j0, len, c1);
                for (int64_t k = 0; k < len; ++k) buf[0][k] = prox_elementwise<acc_t>(step(k), kP, lam, a, thresh);
                conv.from_float(buf[0], bits(out + j0), len);
                stage_out_streams(j0, len);
                for (int64_t k = 0; k < len; ++k) post(j0 + k, buf[0][k]);
              }
            } else {  // each row in stages: the step into `row`, then the scaled row out
              for (int64_t r = c0; r < c1; ++r) {
                const int64_t base = r * row_len;
                for (int64_t k0 = 0; k0 < row_len; k0 += kStageElems) {
                  const int64_t len = std::min(kStageElems, row_len - k0);
                  stage_in(base + k0, len, c1 * row_len);
                  for (int64_t k = 0; k < len; ++k) row[k0 + k] = prox_elementwise<acc_t>(step(k), kP, lam, a, thresh);
                  stage_out_streams(base + k0, len);
                }
                const float scale = group_scale<float>(lane_dot(row, row, row_len), gthresh);
                for (int64_t k0 = 0; k0 < row_len; k0 += kStageElems) {
                  const int64_t len = std::min(kStageElems, row_len - k0);
                  for (int64_t k = 0; k < len; ++k) buf[0][k] = row[k0 + k] * scale;
                  conv.from_float(buf[0], bits(out + base + k0), len);
                  for (int64_t k = 0; k < len; ++k) post(base + k0 + k, buf[0][k]);
                }
              }
            }
          });
          return;
        }
      }
      if constexpr (!kGroup) {
        auto update = make_step(ch.tensor, out, st.ptr);
        isa_for_range(ch.begin, ch.end, [=](int64_t j) {
          const acc_t v = prox_elementwise<acc_t>(update(j), kP, lam, a, thresh);
          put(out[j], v);
          post(j, v);
        });
      } else {
        auto update = make_step(ch.tensor, out, st.ptr);
        const at::Tensor& t = targets[ch.tensor];
        const int64_t row_len = t.numel() / group_rows(t), r0 = ch.begin, r1 = ch.end;
        std::vector<acc_t> row_buf(row_len);
        acc_t* row = row_buf.data();
        isa_run([=]() SLIMOPS_LAMBDA_INLINE {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t base = r * row_len;
            for (int64_t k = 0; k < row_len; ++k) row[k] = prox_elementwise<acc_t>(update(base + k), kP, lam, a, thresh);
            const acc_t scale = group_scale<acc_t>(lane_dot(row, row, row_len), gthresh);
            for (int64_t k = 0; k < row_len; ++k) {
              const acc_t v = row[k] * scale;
              put(out[base + k], v);
              post(base + k, v);
            }
          }
        });
      }
    });
  });
}

inline auto no_post() {
  return [](int64_t) { return [](int64_t, auto) {}; };
}

}  // namespace cpu
}  // namespace slimops
