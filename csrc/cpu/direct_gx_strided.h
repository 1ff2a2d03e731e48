// The input gradient of a strided convolution through the flat direct kernels (direct_conv.h), by phases.
//
// grad_x_pad[Y, X] = Σ_(r, i, j : Y = sh oy + i dh, X = sw ox + j dw) W[r, c, i, j] dy[r][oy, ox]. Split the padded
// positions into phases, Y = sh Y' + ry, X = sw X' + rx: only the taps with i dh ≡ ry (mod sh) and j dw ≡ rx (mod sw)
// reach phase (ry, rx), tap i at oy = Y' - qi with qi = (i dh - ry) / sh (and j likewise), so
//
//     grad_x phase (ry, rx) [Y', X'] = Σ_r Σ_(taps (i, j) of the phase) W[r, c, i, j] dy[r][Y' - qi, X' - qj],
//
// a stride-1 correlation of dy with a sub-kernel of the transposed weight: the flat kernels compute it with the
// phase's tap offsets into one zero-padded copy of dy (pad qh = max qi on top, qw on the left), the output grid being
// the phase's positions inside the unpadded input. A 3x3 stride-2 conv has phases of 4, 2, 2 and 1 taps: the nine
// taps once, as in the forward, where im2col + GEMM + col2im wrote and re-read a 9 x (kept channels) column matrix.
// The phases' results go to a buffer and are then interleaved into grad_x's rows (two phases' rows zipped with
// permutes at a horizontal stride of 2: interleave.h). A phase without taps (a dilation that shares a factor with the
// stride, or a 1x1 kernel) gives zeros.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "direct_conv.h"

namespace slimops {
namespace cpu {

struct GxPhase {
  int64_t ry, rx;      // the padded positions (sh Y' + ry, sw X' + rx)
  int64_t y0, ny;      // its rows Y' in [y0, y0 + ny) fall inside the unpadded input (likewise x0, nx)
  int64_t x0, nx;
  int64_t tap0, ntaps; // its taps: GxPhases::taps[tap0 .. tap0 + ntaps)
};

// The phases of a strided conv's input gradient and the padded dy buffer they read.
struct GxPhases {
  std::vector<GxPhase> phases;
  std::vector<int64_t> taps;  // per phase, its taps i kw + j (i, then j, ascending)
  std::vector<int64_t> off;   // per entry of taps: where it reads in a dy plane, relative to the output position
  int64_t qh = 0, qw = 0;     // dy's zero padding on top and on the left
  int64_t hb = 0, wb = 0;     // the padded dy plane: hb rows of wb floats
  std::vector<int64_t> index; // phase (ry, rx)'s place in phases, or -1 where it has no taps (grad_x 0 there)

  explicit GxPhases(const ConvGeom& g) {
    qh = (g.kh - 1) * g.dh / g.sh, qw = (g.kw - 1) * g.dw / g.sw;
    const auto first = [](int64_t pad, int64_t r, int64_t s) {  // the first Y' >= 0 with s Y' + r >= pad
      return pad > r ? (pad - r + s - 1) / s : int64_t{0};
    };
    const auto count = [](int64_t pad, int64_t n, int64_t r, int64_t s, int64_t y0) {  // Y' with s Y' + r < pad + n
      const int64_t last = pad + n - 1 - r;
      return last < 0 ? int64_t{0} : std::max<int64_t>(0, last / s + 1 - y0);
    };
    index.assign(static_cast<size_t>(g.sh * g.sw), -1);
    int64_t ymax = 0, xmax = 0;  // the largest Y', X' of any phase (sets dy's padding below and on the right)
    for (int64_t ry = 0; ry < g.sh; ++ry)
      for (int64_t rx = 0; rx < g.sw; ++rx) {
        GxPhase p{ry, rx, first(g.ph, ry, g.sh), 0, first(g.pw, rx, g.sw), 0, static_cast<int64_t>(taps.size()), 0};
        p.ny = count(g.ph, g.h, ry, g.sh, p.y0), p.nx = count(g.pw, g.w, rx, g.sw, p.x0);
        if (p.ny == 0 || p.nx == 0) continue;  // no input position in this phase
        for (int64_t i = 0; i < g.kh; ++i)
          for (int64_t j = 0; j < g.kw; ++j)
            if (i * g.dh % g.sh == ry && j * g.dw % g.sw == rx) taps.push_back(i * g.kw + j);
        p.ntaps = static_cast<int64_t>(taps.size()) - p.tap0;
        if (p.ntaps == 0) continue;
        ymax = std::max(ymax, p.y0 + p.ny - 1), xmax = std::max(xmax, p.x0 + p.nx - 1);
        index[ry * g.sw + rx] = static_cast<int64_t>(phases.size());
        phases.push_back(p);
      }
    // Output (Y', X') of a phase reads dy at (Y' - qi, X' - qj), stored at (Y' - qi + qh, X' - qj + qw): rows up to
    // ymax + qh, columns up to xmax + qw.
    hb = std::max(qh + g.oh, ymax + qh + 1), wb = std::max(qw + g.ow, xmax + qw + 1);
    for (const GxPhase& p : phases)
      for (int64_t t = p.tap0; t < p.tap0 + p.ntaps; ++t) {
        const int64_t i = taps[t] / g.kw, j = taps[t] % g.kw;
        const int64_t qi = (i * g.dh - p.ry) / g.sh, qj = (j * g.dw - p.rx) / g.sw;
        off.push_back((p.y0 - qi + qh) * wb + (p.x0 - qj + qw));
      }
  }
  int64_t plane() const { return hb * wb; }
  // Floats of the padded dy of nr rows (the flat blocks read up to 2 kPXMax past the last plane).
  size_t buffer_floats(int64_t nr) const { return static_cast<size_t>(nr * plane() + 2 * kPXMax); }
  // Floats of the phases' results for nc channels (each phase's pixels are its share of the input's).
  size_t result_floats(int64_t nc) const {
    int64_t m = 0;
    for (const GxPhase& p : phases) m += p.ny * p.nx;
    return static_cast<size_t>(nc * m);
  }
};

// Whether a strided conv's grad_x runs by phases (float accumulation; the caller packs pack_weight_direct_phased).
// At most 64 phases (strides up to 8 x 8), and no stride past the padded input (as for the forward's phase split):
// a phase per stride step would be mostly empty, and im2col + col2im touch only what exists.
constexpr int64_t kGxMaxPhases = 64;
inline bool strided_gx_applies(const ConvGeom& g) {
  return (g.sh > 1 || g.sw > 1) && g.sh <= kGxMaxPhases && g.sw <= kGxMaxPhases && g.sh * g.sw <= kGxMaxPhases &&
         direct_conv_applies(g, 1);
}

// The panels of the phases, one after the other: phase p's is the direct panel whose rows are the input channels
// chans (grad_x's), whose channels are the output rows `rows` (dy's) and whose taps are the phase's taps.
inline int64_t phased_panel_offset(int64_t nrows, int64_t nchans, const GxPhase& p) {
  return direct_panel_size(nrows, nchans, p.tap0);  // linear in the taps
}

template <typename scalar_t>
void pack_weight_direct_phased(const scalar_t* w, int64_t c_in, int64_t taps, const int64_t* rows, int64_t nr,
                               const int64_t* chans, int64_t nc, const GxPhases& P, float* out, bool paired) {
  for (const GxPhase& p : P.phases) {
    const int64_t* pt = P.taps.data() + p.tap0;
    pack_direct_panel(nc, nr, p.ntaps, [&](int64_t q, int64_t r, int64_t t) {
      return static_cast<float>(w[(rows[r] * c_in + chans[q]) * taps + pt[t]]);
    }, out + phased_panel_offset(nc, nr, p), paired);
  }
}

// select_panel_channels for each phase's panel (masked_conv2d: a sample's kept output rows).
inline void select_phased_panel_channels(const float* full, int64_t nrows, int64_t nchans, const GxPhases& P,
                                         const int64_t* sel, int64_t nsel, float* out, bool paired) {
  for (const GxPhase& p : P.phases)
    select_panel_channels(full + phased_panel_offset(nrows, nchans, p), nrows, nchans, p.ntaps, sel, nsel,
                          out + phased_panel_offset(nrows, nsel, p), paired);
}

// One sample: the planes gx_rows[c] (h x w) of grad_x for the nc input channels of the phased panel, from dy's nr
// rows (row r at dy + dy_rows[r] * oh * ow); dbuf: P.buffer_floats(nr) floats, res: P.result_floats(nc). Every
// plane is written whole.
inline void direct_gx_phased(const float* dy, const int64_t* dy_rows, int64_t nr, const ConvGeom& g,
                             const GxPhases& P, const float* dpanel, int64_t nc, float* dbuf, float* res,
                             float* const* gx_rows) {
#if SLIMOPS_DIRECT_CONV
  for (int64_t r = 0; r < nr; ++r) {  // dy, zero-padded: qh rows above, qw columns on the left
    float* d = dbuf + r * P.plane();
    const float* src = dy + dy_rows[r] * g.ohw();
    std::fill_n(d, P.qh * P.wb, 0.f);
    for (int64_t y = 0; y < g.oh; ++y) {
      float* row = d + (P.qh + y) * P.wb;
      std::fill_n(row, P.qw, 0.f);
      std::copy_n(src + y * g.ow, g.ow, row + P.qw);
      std::fill(row + P.qw + g.ow, row + P.wb, 0.f);
    }
    std::fill(d + (P.qh + g.oh) * P.wb, d + P.plane(), 0.f);
  }
  std::vector<int64_t> res_at(P.phases.size());  // where each phase's result starts in res (channel c: + c ny nx)
  for (size_t i = 0, at = 0; i < P.phases.size(); ++i) {
    const GxPhase& p = P.phases[i];
    res_at[i] = static_cast<int64_t>(at);
    at += static_cast<size_t>(nc * p.ny * p.nx);
    const int64_t* off = P.off.data() + p.tap0;
    const int64_t reach = *std::max_element(off, off + p.ntaps) - *std::min_element(off, off + p.ntaps);
    direct_flat_bands(dbuf, nr, p.ntaps, off, reach, nr, (p.ny - 1) * P.wb + p.nx, p.nx, P.wb, P.plane(),
                      dpanel + phased_panel_offset(nc, nr, p), nc, res + res_at[i], p.ny * p.nx, nullptr);
  }
  // The phases, interleaved into grad_x's rows: input pixel (y, x) is pixel (Y', X') = ((y + ph) / sh,
  // (x + pw) / sw) of phase ((y + ph) % sh, (x + pw) % sw), whose first row and column are those of y = 0, x = 0.
  const int64_t sw = g.sw;
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t y = 0; y < g.h; ++y) {
      const int64_t ry = (y + g.ph) % g.sh, yy = (y + g.ph) / g.sh;
      const float* src[8] = {};  // per x % sw (sw <= 8 here, else the generic loop below): the phase row, or null
      const bool small = sw <= 8;
      for (int64_t e = 0; small && e < sw && e < g.w; ++e) {
        const int64_t i = P.index[ry * sw + (e + g.pw) % sw];
        if (i >= 0) {
          const GxPhase& p = P.phases[i];
          src[e] = res + res_at[i] + c * p.ny * p.nx + (yy - p.y0) * p.nx;
        }
      }
      float* d = gx_rows[c] + y * g.w;
      if (sw == 2 && src[0] && src[1]) {
        zip2(src[0], src[1], d, g.w);
      } else if (small) {
        for (int64_t x = 0; x < g.w; ++x) d[x] = src[x % sw] ? src[x % sw][x / sw] : 0.f;
      } else {
        for (int64_t x = 0; x < g.w; ++x) {
          const int64_t i = P.index[ry * sw + (x + g.pw) % sw];
          if (i < 0) {
            d[x] = 0.f;
            continue;
          }
          const GxPhase& p = P.phases[i];
          d[x] = res[res_at[i] + c * p.ny * p.nx + (yy - p.y0) * p.nx + (x + g.pw) / sw - p.x0];
        }
      }
    }
#else
  (void)dy, (void)dy_rows, (void)nr, (void)g, (void)P, (void)dpanel, (void)nc, (void)dbuf, (void)res, (void)gx_rows;
#endif
}

}  // namespace cpu
}  // namespace slimops
