// Argument checks shared by every kernel. User errors raise ValueError (TypeError for dtypes) in Python
// with a message that names the op and the argument: "slimops.<op>: <arg> ...".
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include "slimops/prox_math.h"

namespace slimops {

// Parses a penalty name. `allowed` is the set the op accepts (e.g. the prox op takes no "lp").
inline Penalty parse_penalty(const char* op, const std::string& name,
                             std::initializer_list<Penalty> allowed) {
  Penalty p;
  if (name == "none") p = Penalty::kNone;
  else if (name == "l1") p = Penalty::kL1;
  else if (name == "l0") p = Penalty::kL0;
  else if (name == "tl1") p = Penalty::kTL1;
  else if (name == "l1_2") p = Penalty::kL12;
  else if (name == "l21") p = Penalty::kL21;
  else if (name == "l0_l21") p = Penalty::kL0L21;
  else if (name == "lp") p = Penalty::kLp;
  else p = static_cast<Penalty>(-1);
  bool ok = false;
  std::string names;
  static const char* kNames[] = {"none", "l1", "l0", "tl1", "l1_2", "l21", "l0_l21", "lp"};
  for (Penalty q : allowed) {
    ok = ok || q == p;
    if (!names.empty()) names += ", ";
    names += kNames[static_cast<int>(q)];
  }
  TORCH_CHECK_VALUE(ok, "slimops.", op, ": unknown penalty '", name, "' (expected one of: ", names, ")");
  return p;
}

// Checks lam >= 0 (finite) and, where the penalty uses it, the shape parameter a.
inline void check_penalty_args(const char* op, Penalty p, double lam, double a, const char* lam_name = "lam") {
  TORCH_CHECK_VALUE(std::isfinite(lam) && lam >= 0.0, "slimops.", op, ": ", lam_name,
                    " must be finite and >= 0, got ", lam);
  if (p == Penalty::kTL1) {
    TORCH_CHECK_VALUE(std::isfinite(a) && a > 0.0, "slimops.", op, ": a must be > 0 for penalty 'tl1', got ", a);
  } else if (p == Penalty::kL0L21) {
    TORCH_CHECK_VALUE(std::isfinite(a) && a >= 0.0, "slimops.", op,
                ": a (the group weight mu) must be >= 0 for penalty 'l0_l21', got ", a);
  } else if (p == Penalty::kLp) {
    TORCH_CHECK_VALUE(a > 0.0 && a < 1.0, "slimops.", op, ": a (the exponent p) must be in (0, 1) for penalty 'lp', got ", a);
  }
}

inline void check_floating(const char* op, const char* arg, const at::Tensor& t) {
  // A list, not at::isFloatingType: that also admits the float8 types, which no kernel dispatches.
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, "slimops.", op, ": ", arg,
              " must be a floating-point tensor (float32, float64, bfloat16 or float16), got ",
              t.scalar_type());
}

// q, k and v of an attention op: floating-point strided tensors, k and v of q's dtype and device (their shapes are
// each op's own rule).
inline void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const char* names[] = {"q", "k", "v"};
  const at::Tensor* ts[] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    check_floating(op, names[i], *ts[i]);
    TORCH_CHECK_VALUE(ts[i]->layout() == at::kStrided, "slimops.", op, ": ", names[i],
                      " must be a strided (dense) tensor");
  }
  for (int i = 1; i < 3; ++i) {
    TORCH_CHECK_TYPE(ts[i]->scalar_type() == q.scalar_type(), "slimops.", op, ": ", names[i], " has dtype ",
                     ts[i]->scalar_type(), " but q has dtype ", q.scalar_type(), "; q, k and v must share one dtype");
    TORCH_CHECK_VALUE(ts[i]->device() == q.device(), "slimops.", op, ": ", names[i], " is on ", ts[i]->device(),
                      " but q is on ", q.device());
  }
}

// Checks a list of tensors that goes with `params` (named `params_name`): same length, and every
// tensor the same shape, dtype and device as its parameter, strided; contiguous when `inplace`.
inline void check_tensor_list(const char* op, const char* arg, at::TensorList list, at::TensorList params,
                              bool inplace, bool same_dtype = true, const char* params_name = "params") {
  TORCH_CHECK_VALUE(list.size() == params.size(), "slimops.", op, ": ", arg, " has ", list.size(),
                    " tensors but ", params_name, " has ", params.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, "slimops.", op, ": ", arg, "[", i,
                "] is sparse; sparse gradients are not supported");
    TORCH_CHECK_VALUE(t.device() == p.device(), "slimops.", op, ": ", arg, "[", i, "] is on ", t.device(),
                " but its parameter is on ", p.device());
    TORCH_CHECK_TYPE(!same_dtype || t.scalar_type() == p.scalar_type(), "slimops.", op, ": ", arg, "[", i,
                "] has dtype ", t.scalar_type(), " but its parameter has dtype ", p.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == p.sizes(), "slimops.", op, ": ", arg, "[", i, "] has shape ", t.sizes(),
                " but its parameter has shape ", p.sizes());
    TORCH_CHECK_VALUE(!inplace || t.is_contiguous(), "slimops.", op, ": ", arg, "[", i,
                "] must be contiguous (it is updated in place)");
  }
}

// Checks the parameter list itself: floating, strided, contiguous (updated in place), one dtype
// and one device for the whole list (the optimizers group tensors by device and dtype).
inline void check_param_list(const char* op, const char* arg, at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(p.layout() == at::kStrided, "slimops.", op, ": ", arg, "[", i, "] must be a strided tensor");
    check_floating(op, arg, p);
    TORCH_CHECK_VALUE(p.is_contiguous(), "slimops.", op, ": ", arg, "[", i,
                "] must be contiguous (it is updated in place)");
    TORCH_CHECK_TYPE(p.scalar_type() == params[0].scalar_type(), "slimops.", op, ": ", arg, "[", i, "] has dtype ",
                p.scalar_type(), " but ", arg, "[0] has dtype ", params[0].scalar_type(),
                "; one call takes one dtype");
    TORCH_CHECK_VALUE(p.device() == params[0].device(), "slimops.", op, ": ", arg, "[", i, "] is on ", p.device(),
                " but ", arg, "[0] is on ", params[0].device());
  }
}

// One argument of an op for check_no_overlap: a named list of tensors, or one optional tensor (named as the
// one-element list the Python check makes of it: "grad_scale[0]").
struct OverlapArg {
  const char* name;
  at::TensorList list;
  OverlapArg(const char* n, at::TensorList l) : name(n), list(l) {}
  OverlapArg(const char* n, const std::optional<at::Tensor>& t)
      : name(n), list(t.has_value() ? at::TensorList(*t) : at::TensorList()) {}
};

namespace detail {

// The bytes [lo, hi) a tensor can touch; false for a tensor without comparable memory (undefined, not strided,
// meta, storage-less, no elements). A written tensor's address is taken with data_ptr() (what the kernel then
// writes through: it materialises a copy-on-write storage first), a read one's with const_data_ptr().
inline bool memory_span(const at::Tensor& t, bool written, uintptr_t& lo, uintptr_t& hi) {
  if (!t.defined() || t.layout() != at::kStrided || t.is_meta() || !t.has_storage()) return false;
  const int64_t n = t.numel();
  if (n == 0) return false;
  int64_t elems = n;
  if (!t.is_contiguous()) {  // from the first to the last element it can reach (expanded views included)
    elems = 1;
    const auto sizes = t.sizes();
    const auto strides = t.strides();
    for (size_t d = 0; d < sizes.size(); ++d) elems += (sizes[d] - 1) * std::abs(strides[d]);
  }
  lo = reinterpret_cast<uintptr_t>(written ? t.data_ptr() : t.const_data_ptr());
  hi = lo + static_cast<uintptr_t>(elems) * t.itemsize();
  return true;
}

struct Span {
  uintptr_t lo, hi;  // first byte, one past the last byte
  uint32_t arg;      // which argument: the written ones first, then the read ones
  uint32_t index;    // in its list
  bool operator==(const Span& o) const { return lo == o.lo && hi == o.hi && arg == o.arg && index == o.index; }
};

struct SpanKey {  // what is sorted: the first byte, then the order of collection (ties in argument order)
  uintptr_t lo;
  uint32_t seq;
};

// The spans of the last call of an op that passed, in collection order (per thread). An optimizer passes the
// same tensors at every step: when a call's spans equal these, its verdict is the same (the check is a function
// of the spans alone) and the sort is skipped. Keyed by the op's name (a string literal of prox_checks.h).
struct PassedSpans {
  const char* op = nullptr;
  uint32_t n_written = 0;
  std::vector<Span> spans;
};

inline PassedSpans& passed_spans(const char* op) {
  thread_local std::array<PassedSpans, 8> entries;
  thread_local size_t next = 0;
  for (auto& e : entries)
    if (e.op == op) return e;
  PassedSpans& e = entries[next++ % entries.size()];
  e.op = op;
  e.spans.clear();
  return e;
}

}  // namespace detail

// Refuses a call in which a tensor the op updates in place (`written`) shares memory with another argument
// (written or read): one tensor twice in a list, a state buffer that is also the parameter, partly overlapping
// views. The result would depend on the order of the parallel updates. Read-only arguments may overlap each
// other. The C++ twin of slimops.opdefs._checks.check_no_overlap, with its message; it compares the address
// ranges themselves (one address space for all the tensors of a call: they are on one device, and CUDA has
// unified addressing). O(n log n) in the number of tensors, O(n) when the spans are those of the op's last
// call (every optimizer step after the first); no device sync: only pointers and sizes are read.
inline void check_no_overlap(const char* op, std::initializer_list<OverlapArg> written,
                             std::initializer_list<OverlapArg> read) {
  size_t count = 0;
  for (const auto& a : written) count += a.list.size();
  if (count == 0) return;  // nothing is written: nothing to refuse
  for (const auto& a : read) count += a.list.size();
  std::vector<const OverlapArg*> args;
  args.reserve(written.size() + read.size());
  for (const auto& a : written) args.push_back(&a);
  for (const auto& a : read) args.push_back(&a);
  const uint32_t n_written = static_cast<uint32_t>(written.size());
  thread_local std::vector<detail::Span> spans;  // scratch, reused
  spans.clear();
  spans.reserve(count);
  for (uint32_t k = 0; k < args.size(); ++k) {
    const at::TensorList list = args[k]->list;
    for (size_t i = 0; i < list.size(); ++i) {
      uintptr_t lo, hi;
      if (detail::memory_span(list[i], k < n_written, lo, hi)) spans.push_back({lo, hi, k, static_cast<uint32_t>(i)});
    }
  }
  detail::PassedSpans& passed = detail::passed_spans(op);
  if (passed.n_written == n_written && passed.spans == spans) return;
  passed.n_written = 0;  // no match until this call passes
  std::vector<detail::SpanKey> keys(spans.size());
  for (size_t i = 0; i < spans.size(); ++i) keys[i] = {spans[i].lo, static_cast<uint32_t>(i)};
  std::sort(keys.begin(), keys.end(), [](const detail::SpanKey& x, const detail::SpanKey& y) {
    return x.lo != y.lo ? x.lo < y.lo : x.seq < y.seq;
  });
  // Sweep in address order, keeping the furthest-reaching span seen so far and the furthest-reaching written
  // one: a written span must not start before the first ends, a read one before the second ends.
  uintptr_t end_all = 0, end_written = 0;
  uint32_t far_all = 0, far_written = 0;  // their positions in spans (meaningful once the end is > 0)
  for (const auto& key : keys) {
    const detail::Span& s = spans[key.seq];
    const bool is_written = s.arg < n_written;
    if (C10_UNLIKELY((is_written ? end_all : end_written) > key.lo)) {
      const detail::Span& o = spans[is_written ? far_all : far_written];
      TORCH_CHECK_VALUE(false, "slimops.", op, ": ", args[o.arg]->name, "[", o.index, "] and ", args[s.arg]->name,
                        "[", s.index,
                        "] overlap in memory; a tensor updated in place must not share memory with another argument");
    }
    if (s.hi > end_all) end_all = s.hi, far_all = key.seq;
    if (is_written && s.hi > end_written) end_written = s.hi, far_written = key.seq;
  }
  passed.n_written = n_written;
  passed.spans = spans;
}

// grad_scale / found_inf: optional one-element float tensors on the parameters' device.
inline void check_amp_scalar(const char* op, const char* arg, const std::optional<at::Tensor>& t,
                             at::TensorList params) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->numel() == 1, "slimops.", op, ": ", arg, " must have exactly one element, got ", t->numel());
  TORCH_CHECK_VALUE(at::isFloatingType(t->scalar_type()), "slimops.", op, ": ", arg, " must be floating, got ",
              t->scalar_type());
  if (!params.empty()) {
    TORCH_CHECK_VALUE(t->device() == params[0].device(), "slimops.", op, ": ", arg, " is on ", t->device(),
                " but params are on ", params[0].device());
  }
}

}  // namespace slimops
