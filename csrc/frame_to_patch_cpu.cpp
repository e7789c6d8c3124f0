// CPU frame-to-patch: uint8 frames -> (antialiased bicubic resize, normalise, patch layout) in one
// pass, parallel (at::parallel_for) over temporal pairs of frames, and over bands of 28-row
// output blocks when there are few pairs (an image, a short clip).
//
// Per work item (a pair of frame slots, a run of 28-row output blocks), block by block:
//   H pass  the input rows the block needs -> planar uint8 rows of width out_w (per-thread buffer;
//           rows shared with the previous block are not recomputed)
//   V pass  the block's 28 output rows of both frames -> a small uint8 buffer (torchvision rounds
//           to uint8 between and after the passes, so do we)
//   sink    each of the block's patch rows (1176 values: 3 channels x 2 frames x 14 x 14) is
//           normalised into an L1 buffer and written once, with non-temporal stores
// The resize arithmetic is torchvision's (int16 fixed point, uint8 between passes), so the
// result is bit-exact; see frame_to_patch.h. An AVX2 path (chosen at run time, no -march flag
// needed) and a portable scalar path compute the same integers.
//
// AVX2 H pass: a band of 32 input rows is transposed so that each input column becomes 32
// contiguous bytes; the horizontal filter is then the same "weighted sum of rows" kernel as the
// vertical one (conv32), vectorised across the 32 rows; the result is transposed back.
// Fixed point rather than float was measured, not assumed: see docs/frame_to_patch.md.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define VR1_X86 1
#define VR1_AVX2 __attribute__((target("avx2")))
#else
#define VR1_X86 0
#endif

#include "frame_to_patch.h"
#include "frame_to_patch_host.h"

namespace videor1 {

// ------------------------------------------------------------------------------------------------
// Argument checks and filters (shared with the CUDA op through frame_to_patch_host.h).

FrameGeometry check_frames_args(const at::Tensor& frames, bool channels_last, int64_t out_h, int64_t out_w,
                                bool need_patch_grid) {
  TORCH_CHECK(frames.scalar_type() == at::kByte, "frames must be uint8, got ", frames.scalar_type());
  TORCH_CHECK(frames.dim() == 4, "frames must have rank 4 ([T, H, W, 3] or [T, 3, H, W]), got rank ", frames.dim(),
              " with shape ", frames.sizes());
  const int64_t cdim = channels_last ? 3 : 1;
  TORCH_CHECK(frames.size(cdim) == 3, "frames must have 3 channels at dim ", cdim, ", got shape ", frames.sizes());
  TORCH_CHECK(frames.size(0) > 0, "frames has zero frames");
  FrameGeometry g;
  g.T = frames.size(0);
  g.H = channels_last ? frames.size(1) : frames.size(2);
  g.W = channels_last ? frames.size(2) : frames.size(3);
  g.out_h = out_h;
  g.out_w = out_w;
  g.channels_last = channels_last;
  TORCH_CHECK(g.H > 0 && g.W > 0, "frames have an empty spatial size ", frames.sizes());
  TORCH_CHECK(out_h > 0 && out_w > 0, "output size must be positive, got ", out_h, "x", out_w);
  if (need_patch_grid) {
    TORCH_CHECK(out_h % kFactor == 0 && out_w % kFactor == 0, "output size must be multiples of 28, got ", out_h,
                "x", out_w);
  }
  // Keep every index of the kernels inside int32 where they use it.
  TORCH_CHECK(g.H * g.W * 3 < (int64_t(1) << 31) && out_h * out_w * 3 < (int64_t(1) << 31),
              "frame too large: ", g.H, "x", g.W, " -> ", out_h, "x", out_w);
  return g;
}

std::vector<int64_t> check_frame_order(const std::optional<at::Tensor>& frame_order, int64_t T) {
  std::vector<int64_t> order(T);
  if (!frame_order.has_value()) {
    for (int64_t i = 0; i < T; ++i) order[i] = i;
    return order;
  }
  const at::Tensor o = frame_order->to(at::kCPU, at::kLong).contiguous();
  TORCH_CHECK(o.dim() == 1 && o.size(0) == T, "frame_order must be a permutation of range(", T, "), got shape ",
              o.sizes());
  std::vector<char> seen(T, 0);
  const int64_t* p = o.data_ptr<int64_t>();
  for (int64_t i = 0; i < T; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < T && !seen[p[i]], "frame_order must be a permutation of range(", T,
                "), got ", o);
    seen[p[i]] = 1;
    order[i] = p[i];
  }
  return order;
}

void check_patch_dtype(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "dtype must be float32 or bfloat16, got ", dtype);
}

static void fill_weight_pairs(AxisFilter& f) {
  f.pairs = (f.taps + 1) / 2;
  f.weight_pairs.assign(static_cast<size_t>(f.out_size) * f.pairs, 0);
  for (int64_t i = 0; i < f.out_size; ++i) {
    const int16_t* w = f.weights.data() + i * f.taps;
    for (int k = 0; k < f.pairs; ++k) {
      const uint32_t lo = static_cast<uint16_t>(w[2 * k]);
      const uint32_t hi = 2 * k + 1 < f.taps ? static_cast<uint16_t>(w[2 * k + 1]) : 0u;
      f.weight_pairs[i * f.pairs + k] = static_cast<int32_t>(lo | (hi << 16));
    }
  }
}

AxisFilter make_axis_filter(int64_t in_size, int64_t out_size) {
  AxisFilter f;
  f.in_size = in_size;
  f.out_size = out_size;
  f.start.assign(out_size, 0);
  if (in_size == out_size) {  // identity: exact with one tap of 1.0
    f.taps = 1;
    f.precision = 14;
    f.weights.assign(out_size, int16_t(1 << 14));
    for (int64_t i = 0; i < out_size; ++i) f.start[i] = static_cast<int32_t>(i);
    fill_weight_pairs(f);
    return f;
  }
  const double scale = aa_scale(in_size, out_size);
  const int max_taps = aa_max_taps(scale);
  std::vector<double> w(static_cast<size_t>(out_size) * max_taps, 0.0);
  std::vector<int64_t> xmin(out_size), xsize(out_size);
  double wmax = 0.0;
  for (int64_t i = 0; i < out_size; ++i) {
    wmax = std::max(wmax, aa_tap_weights(i, in_size, scale, max_taps, &w[i * max_taps], &xmin[i], &xsize[i]));
  }
  f.precision = aa_weights_precision(wmax);
  // As many taps as the widest window needs (often max_taps - 2), so no work is spent on zeros.
  const int64_t widest = *std::max_element(xsize.begin(), xsize.end());
  f.taps = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(widest, in_size)));
  f.weights.assign(static_cast<size_t>(out_size) * f.taps, 0);
  for (int64_t i = 0; i < out_size; ++i) {
    // Shift the window left where it would run past the input; the extra taps weigh zero.
    const int64_t s = std::min<int64_t>(xmin[i], in_size - f.taps);
    f.start[i] = static_cast<int32_t>(s);
    for (int64_t j = 0; j < xsize[i]; ++j) {
      f.weights[i * f.taps + (xmin[i] - s) + j] = aa_quantize_weight(w[i * max_taps + j], f.precision);
    }
  }
  fill_weight_pairs(f);
  return f;
}

namespace {

std::atomic<bool> g_simd_enabled{true};

bool cpu_has_avx2() {
#if VR1_X86 && (defined(__GNUC__) || defined(__clang__))
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
#else
  return false;
#endif
}

inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + (((u >> 16) & 1) + 0x7FFFu)) >> 16);  // round to nearest even
}

// ------------------------------------------------------------------------------------------------
// Work geometry and per-thread buffers.

struct Plan {
  FrameGeometry g;
  const AxisFilter* fh;
  const AxisFilter* fv;
  int64_t ow_pad;    // row stride of the uint8 buffers: out_w rounded up to 32
  int64_t tmp_rows;  // rows of the planar H-pass buffer: H + 32 (a 32-row block may overrun)
  bool simd;
};

struct Workspace {
  // Per frame of the pair: [3][tmp_rows][ow_pad] H-pass rows. Allocated on first use (an image
  // needs one) and not initialised: the V pass only reads rows the H pass has written.
  std::unique_ptr<uint8_t[]> tmp[2];
  size_t tmp_size;
  std::vector<uint8_t> vbuf;   // [2][3][28][ow_pad] V-pass output of one 28-row block
  std::vector<uint8_t> cols;   // [3*W][32] transposed band of 32 input rows (AVX2)
  std::vector<uint8_t> hcols;  // [3][ow_pad][32] H-pass result of that band, transposed (AVX2);
                               // zeroed: its columns past out_w become the tmp rows' padding
  explicit Workspace(const Plan& p) : tmp_size(static_cast<size_t>(3 * p.tmp_rows * p.ow_pad)) {
    vbuf.assign(2 * 3 * kFactor * p.ow_pad, 0);
    if (p.simd) {
      cols.assign(static_cast<size_t>(3 * p.g.W) * 32, 0);
      hcols.assign(static_cast<size_t>(3 * p.ow_pad) * 32, 0);
    }
  }
  uint8_t* h_rows(int tt) {
    if (!tmp[tt]) tmp[tt].reset(new uint8_t[tmp_size]);
    return tmp[tt].get();
  }
};

inline const uint8_t* frame_ptr(const uint8_t* frames, const FrameGeometry& g, int64_t f) {
  return frames + f * g.H * g.W * 3;
}

// ------------------------------------------------------------------------------------------------
// Scalar path.

// Rows [r0, r1) of the horizontal pass into tmp[c][r][x].
void hpass_scalar(const Plan& p, const uint8_t* frame, int64_t r0, int64_t r1, uint8_t* tmp) {
  const FrameGeometry& g = p.g;
  const AxisFilter& fh = *p.fh;
  const int64_t xs = g.channels_last ? 3 : 1, cs = g.channels_last ? 1 : g.H * g.W;
  const int64_t rs = g.channels_last ? g.W * 3 : g.W;
  const int32_t half = 1 << (fh.precision - 1);
  for (int64_t r = r0; r < r1; ++r) {
    for (int c = 0; c < 3; ++c) {
      const uint8_t* src = frame + r * rs + c * cs;
      uint8_t* dst = tmp + (c * p.tmp_rows + r) * p.ow_pad;
      for (int64_t x = 0; x < g.out_w; ++x) {
        const uint8_t* s = src + fh.start[x] * xs;
        const int16_t* w = fh.weights.data() + x * fh.taps;
        int32_t acc = half;
        for (int k = 0; k < fh.taps; ++k) acc += w[k] * s[k * xs];
        dst[x] = static_cast<uint8_t>(fixed_to_u8(acc, fh.precision));
      }
    }
  }
}

void vpass_scalar(const uint8_t* src, int64_t stride, const int16_t* w, int taps, int precision, uint8_t* dst,
                  int64_t n) {
  const int32_t half = 1 << (precision - 1);
  for (int64_t x = 0; x < n; ++x) {
    int32_t acc = half;
    for (int k = 0; k < taps; ++k) acc += w[k] * src[k * stride + x];
    dst[x] = static_cast<uint8_t>(fixed_to_u8(acc, precision));
  }
}

// ------------------------------------------------------------------------------------------------
// AVX2 path.
#if VR1_X86

// acc[0..3] += pixels of rows a and b (32 bytes each) times the weight pair (w_a | w_b << 16).
VR1_AVX2 inline void conv_step(__m256i acc[4], __m256i a, __m256i b, int32_t wpair) {
  const __m256i zero = _mm256_setzero_si256();
  const __m256i wp = _mm256_set1_epi32(wpair);
  const __m256i lo = _mm256_unpacklo_epi8(a, b);  // a0 b0 a1 b1 ... (per 128-bit lane)
  const __m256i hi = _mm256_unpackhi_epi8(a, b);
  acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(_mm256_unpacklo_epi8(lo, zero), wp));
  acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(_mm256_unpackhi_epi8(lo, zero), wp));
  acc[2] = _mm256_add_epi32(acc[2], _mm256_madd_epi16(_mm256_unpacklo_epi8(hi, zero), wp));
  acc[3] = _mm256_add_epi32(acc[3], _mm256_madd_epi16(_mm256_unpackhi_epi8(hi, zero), wp));
}

// Weighted sum of `taps` rows of 32 bytes (row k at base + k*stride), torchvision's fixed point:
// (2^(p-1) + sum w_k * row_k) >> p, saturated to uint8. Taps go in pairs through vpmaddwd.
VR1_AVX2 inline __m256i conv32(const uint8_t* base, int64_t stride, const int32_t* wpairs, int taps, int precision) {
  __m256i acc[4];
  acc[0] = acc[1] = acc[2] = acc[3] = _mm256_set1_epi32(1 << (precision - 1));
  int k = 0;
  for (; k + 1 < taps; k += 2) {
    conv_step(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + k * stride)),
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + (k + 1) * stride)), wpairs[k / 2]);
  }
  if (k < taps) {  // odd tap count: the last tap pairs with zeros (its pair weight is 0 too)
    conv_step(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + k * stride)), _mm256_setzero_si256(),
              wpairs[k / 2]);
  }
  const __m128i shift = _mm_cvtsi32_si128(precision);
  for (int i = 0; i < 4; ++i) acc[i] = _mm256_sra_epi32(acc[i], shift);
  // packs/packus undo the lane interleaving of the unpacks and saturate to [0, 255].
  return _mm256_packus_epi16(_mm256_packs_epi32(acc[0], acc[1]), _mm256_packs_epi32(acc[2], acc[3]));
}

// Transpose 16 rows x ncols bytes: column j of rows[0..16) -> 16 bytes at dst + j*dst_stride.
// Four rounds of byte unpacks (each a one-bit rotation of the (row, col) index) per 128-bit lane
// transpose two 16x16 blocks at once.
VR1_AVX2 void transpose16(const uint8_t* const rows[16], int64_t ncols, uint8_t* dst, int64_t dst_stride) {
  // Long rows come from the frame in DRAM, 16 streams at once; fetching ahead explicitly took
  // about a fifth off the resize of 720p frames here.
  const bool prefetch = ncols > 256;
  int64_t j = 0;
  for (; j + 32 <= ncols; j += 32) {
    __m256i r[16], t[16];
    if (prefetch) {
      for (int i = 0; i < 16; ++i) _mm_prefetch(reinterpret_cast<const char*>(rows[i] + j + 512), _MM_HINT_T0);
    }
    for (int i = 0; i < 16; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[i] + j));
    for (int round = 0; round < 4; ++round) {
      for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm256_unpacklo_epi8(r[i], r[i + 8]);
        t[2 * i + 1] = _mm256_unpackhi_epi8(r[i], r[i + 8]);
      }
      for (int i = 0; i < 16; ++i) r[i] = t[i];
    }
    for (int i = 0; i < 16; ++i) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (j + i) * dst_stride), _mm256_castsi256_si128(r[i]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (j + 16 + i) * dst_stride), _mm256_extracti128_si256(r[i], 1));
    }
  }
  for (; j < ncols; ++j) {
    for (int i = 0; i < 16; ++i) dst[j * dst_stride + i] = rows[i][j];
  }
}

// Rows [r0, r1) of the horizontal pass into tmp[c][r][x], in blocks of 32 rows (so rows up to
// r0 + 32*ceil((r1-r0)/32) are written; those past the frame are clamped copies, never read).
VR1_AVX2 void hpass_avx2(const Plan& p, const uint8_t* frame, int64_t r0, int64_t r1, uint8_t* tmp, Workspace& ws) {
  const FrameGeometry& g = p.g;
  const AxisFilter& fh = *p.fh;
  // Column index of (x, c) in the transposed band, and the step between neighbouring x.
  const int64_t xs = g.channels_last ? 3 : 1, cs = g.channels_last ? 1 : g.W;
  uint8_t* cols = ws.cols.data();
  uint8_t* hcols = ws.hcols.data();
  for (int64_t rb = r0; rb < r1; rb += 32) {
    // 1. transpose rows [rb, rb+32) (clamped at the bottom) into cols[N][32]
    for (int half = 0; half < 2; ++half) {
      const uint8_t* rows[16];
      if (g.channels_last) {
        for (int i = 0; i < 16; ++i) {
          const int64_t r = std::min(rb + half * 16 + i, g.H - 1);
          rows[i] = frame + r * g.W * 3;
        }
        transpose16(rows, g.W * 3, cols + half * 16, 32);
      } else {
        for (int c = 0; c < 3; ++c) {
          for (int i = 0; i < 16; ++i) {
            const int64_t r = std::min(rb + half * 16 + i, g.H - 1);
            rows[i] = frame + (c * g.H + r) * g.W;
          }
          transpose16(rows, g.W, cols + c * g.W * 32 + half * 16, 32);
        }
      }
    }
    // 2. horizontal filter: each (x, c) is a weighted sum of 32-byte columns
    for (int64_t x = 0; x < g.out_w; ++x) {
      const int32_t* w = fh.weight_pairs.data() + x * fh.pairs;
      for (int c = 0; c < 3; ++c) {
        const uint8_t* base = cols + (fh.start[x] * xs + c * cs) * 32;
        const __m256i v = conv32(base, xs * 32, w, fh.taps, fh.precision);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(hcols + (c * p.ow_pad + x) * 32), v);
      }
    }
    // 3. transpose back into planar rows tmp[c][rb + i][x]
    for (int c = 0; c < 3; ++c) {
      uint8_t* dst = tmp + (c * p.tmp_rows + rb) * p.ow_pad;
      for (int64_t x0 = 0; x0 < p.ow_pad; x0 += 16) {
        const uint8_t* rows[16];
        for (int i = 0; i < 16; ++i) rows[i] = hcols + (c * p.ow_pad + x0 + i) * 32;
        transpose16(rows, 32, dst + x0, p.ow_pad);
      }
    }
  }
}

VR1_AVX2 void vpass_avx2(const uint8_t* src, int64_t stride, const int32_t* w, int taps, int precision, uint8_t* dst,
                         int64_t n_pad) {
  for (int64_t x = 0; x < n_pad; x += 32) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + x), conv32(src + x, stride, w, taps, precision));
  }
}

VR1_AVX2 inline __m256 normalize8(const uint8_t* src, int ch) {
  const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src))));
  return _mm256_div_ps(_mm256_sub_ps(v, _mm256_set1_ps(clip_mean255(ch))), _mm256_set1_ps(clip_std255(ch)));
}

// 14 values as two overlapping groups of 8 ([0, 8) and [6, 14)).
VR1_AVX2 void store14_avx2(const uint8_t* src, float* dst, int ch) {
  _mm256_storeu_ps(dst, normalize8(src, ch));
  _mm256_storeu_ps(dst + 6, normalize8(src + 6, ch));
}

VR1_AVX2 inline void store8_bf16(__m256 f, at::BFloat16* dst) {
  __m256i u = _mm256_castps_si256(f);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  u = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), packed);
}

VR1_AVX2 void store14_avx2(const uint8_t* src, at::BFloat16* dst, int ch) {
  store8_bf16(normalize8(src, ch), dst);
  store8_bf16(normalize8(src + 6, ch), dst + 6);
}

// A finished patch row (1176 values in an L1 buffer) -> its place in the output, with
// non-temporal stores: the output is written once and not read back here, so this skips the
// read-for-ownership of every line. Rows are 4704 (fp32) or 2352 (bf16) bytes, so an aligned
// output keeps every row aligned.
VR1_AVX2 void flush_row_avx2(const float* row, float* dst) {
  for (int i = 0; i < kPatchDim; i += 8) _mm256_stream_ps(dst + i, _mm256_load_ps(row + i));
}
VR1_AVX2 void flush_row_avx2(const at::BFloat16* row, at::BFloat16* dst) {
  for (int i = 0; i < kPatchDim; i += 8) {
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i), _mm_load_si128(reinterpret_cast<const __m128i*>(row + i)));
  }
}

#endif  // VR1_X86

// Normalise 14 uint8 values of channel ch into dst (any alignment).
template <typename out_t>
void store14(const uint8_t* src, out_t* dst, int ch, bool simd) {
#if VR1_X86
  if (simd) {
    store14_avx2(src, dst, ch);
    return;
  }
#endif
  for (int i = 0; i < kPatch; ++i) {
    if constexpr (std::is_same_v<out_t, float>) {
      dst[i] = normalize_u8(src[i], ch);
    } else {
      dst[i].x = bf16_bits(normalize_u8(src[i], ch));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Sinks: what happens to one finished 28-row block of V-pass output, vbuf[tt][c][y - y0][x] for
// the frames in slots 2*pair + tt (nslots of them: 1 for the last pair of an odd-length video).

// Patch layout, fp32 or bf16: every patch row of the block is assembled whole (both temporal
// slots; a missing second slot repeats the first, as the processor pads) and then written once.
template <typename out_t>
struct PatchSink {
  out_t* out;
  int64_t gh, gw;
  bool stream;  // output aligned for the non-temporal row flush

  void block(const Plan& p, int64_t pair, int64_t y0, int64_t /*y1*/, const uint8_t* vbuf, int nslots) const {
    alignas(64) out_t row[kPatchDim];
    const int64_t bh = y0 / kFactor;
    for (int64_t bw = 0; bw < gw / kMerge; ++bw) {
      for (int m = 0; m < kBlockRows; ++m) {
        const int mh = m / kMerge, mw = m % kMerge;
        for (int ch = 0; ch < 3; ++ch) {
          for (int tt = 0; tt < kTemporalPatch; ++tt) {
            const int src_tt = tt < nslots ? tt : 0;
            const uint8_t* src = vbuf + ((src_tt * 3 + ch) * kFactor + kPatch * mh) * p.ow_pad + kFactor * bw + kPatch * mw;
            out_t* dst = row + ch * (kTemporalPatch * kPatch * kPatch) + tt * (kPatch * kPatch);
            for (int ph = 0; ph < kPatch; ++ph) store14(src + ph * p.ow_pad, dst + ph * kPatch, ch, p.simd);
          }
        }
        const int64_t r = ((pair * (gh / kMerge) + bh) * (gw / kMerge) + bw) * kBlockRows + m;
#if VR1_X86
        if (stream) {
          flush_row_avx2(row, out + r * kPatchDim);
          continue;
        }
#endif
        std::memcpy(out + r * kPatchDim, row, sizeof(row));
      }
    }
  }
};

// Resized uint8 frames [T, 3, out_h, out_w] (the resize alone, for tests and debugging).
struct ResizeSink {
  uint8_t* out;
  void block(const Plan& p, int64_t pair, int64_t y0, int64_t y1, const uint8_t* vbuf, int nslots) const {
    const int64_t oh = p.g.out_h, ow = p.g.out_w;
    for (int tt = 0; tt < nslots; ++tt) {
      for (int c = 0; c < 3; ++c) {
        for (int64_t y = y0; y < y1; ++y) {
          std::memcpy(out + (((2 * pair + tt) * 3 + c) * oh + y) * ow,
                      vbuf + ((tt * 3 + c) * kFactor + (y - y0)) * p.ow_pad, ow);
        }
      }
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Driver. A work item is a temporal pair of frame slots and a run of 28-row output blocks; the
// H pass of each frame advances block by block (rows shared by neighbouring blocks are computed
// once), the V pass fills one block, the sink writes it.

template <class Sink>
void process_item(const uint8_t* frames, const Plan& p, const std::vector<int64_t>& order, int64_t pair,
                  int64_t b0, int64_t b1, const Sink& sink, Workspace& ws) {
  const FrameGeometry& g = p.g;
  const AxisFilter& fv = *p.fv;
  const int nslots = static_cast<int>(std::min<int64_t>(2, g.T - 2 * pair));
  const uint8_t* frame[2] = {nullptr, nullptr};
  int64_t h_next[2] = {0, 0};  // H-pass rows below this are done for frame[tt] (from the first block's start)
  for (int tt = 0; tt < nslots; ++tt) {
    frame[tt] = frame_ptr(frames, g, order[2 * pair + tt]);
    h_next[tt] = fv.start[b0 * kFactor];
  }
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t y0 = b * kFactor, y1 = std::min(g.out_h, y0 + kFactor);
    const int64_t hi = fv.start[y1 - 1] + fv.taps;  // H rows this block needs: [start[y0], hi)
    for (int tt = 0; tt < nslots; ++tt) {
      uint8_t* tmp = ws.h_rows(tt);
      if (h_next[tt] < hi) {
        const int64_t r0 = h_next[tt];
#if VR1_X86
        if (p.simd) {
          hpass_avx2(p, frame[tt], r0, hi, tmp, ws);
          h_next[tt] = std::min(g.H, r0 + (hi - r0 + 31) / 32 * 32);
        } else {
          hpass_scalar(p, frame[tt], r0, hi, tmp);
          h_next[tt] = hi;
        }
#else
        hpass_scalar(p, frame[tt], r0, hi, tmp);
        h_next[tt] = hi;
#endif
      }
      for (int64_t y = y0; y < y1; ++y) {
        for (int c = 0; c < 3; ++c) {
          const uint8_t* src = tmp + (c * p.tmp_rows + fv.start[y]) * p.ow_pad;
          uint8_t* dst = ws.vbuf.data() + ((tt * 3 + c) * kFactor + (y - y0)) * p.ow_pad;
#if VR1_X86
          if (p.simd) {
            vpass_avx2(src, p.ow_pad, fv.weight_pairs.data() + y * fv.pairs, fv.taps, fv.precision, dst, p.ow_pad);
            continue;
          }
#endif
          vpass_scalar(src, p.ow_pad, fv.weights.data() + y * fv.taps, fv.taps, fv.precision, dst, g.out_w);
        }
      }
    }
    sink.block(p, pair, y0, y1, ws.vbuf.data(), nslots);
  }
#if VR1_X86
  if (p.simd) _mm_sfence();  // order the non-temporal stores before the op returns
#endif
}

template <class Sink>
void run_frames(const uint8_t* frames, const Plan& p, const std::vector<int64_t>& order, const Sink& sink) {
  const FrameGeometry& g = p.g;
  const int64_t pairs = (g.T + 1) / 2;
  const int64_t blocks = (g.out_h + kFactor - 1) / kFactor;
  // Few pairs (an image, a short clip): split each pair's blocks into bands so every thread works.
  const int64_t threads = std::max(1, at::get_num_threads());
  int64_t bands = 1;
  if (pairs < 2 * threads) bands = std::min<int64_t>((2 * threads + pairs - 1) / pairs, blocks);
  const int64_t band_blocks = (blocks + bands - 1) / bands;
  at::parallel_for(0, pairs * bands, 1, [&](int64_t i0, int64_t i1) {
    Workspace ws(p);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t pair = item / bands;
      const int64_t b0 = (item % bands) * band_blocks, b1 = std::min(blocks, b0 + band_blocks);
      if (b0 < b1) process_item(frames, p, order, pair, b0, b1, sink, ws);
    }
  });
}

Plan make_plan(const FrameGeometry& g, const AxisFilter& fh, const AxisFilter& fv) {
  Plan p;
  p.g = g;
  p.fh = &fh;
  p.fv = &fv;
  p.ow_pad = (g.out_w + 31) / 32 * 32;
  p.tmp_rows = g.H + 32;
  p.simd = g_simd_enabled.load() && cpu_has_avx2();
  return p;
}

}  // namespace

void set_cpu_simd(bool enabled) { g_simd_enabled.store(enabled); }
bool cpu_simd_active() { return g_simd_enabled.load() && cpu_has_avx2(); }

at::Tensor frames_to_patches_cpu(const at::Tensor& frames_in, bool channels_last, int64_t out_h, int64_t out_w,
                                 const std::optional<at::Tensor>& frame_order, at::ScalarType dtype) {
  const FrameGeometry g = check_frames_args(frames_in, channels_last, out_h, out_w, /*need_patch_grid=*/true);
  check_patch_dtype(dtype);
  const std::vector<int64_t> order = check_frame_order(frame_order, g.T);
  const at::Tensor frames = frames_in.contiguous();
  const AxisFilter fh = make_axis_filter(g.W, out_w);
  const AxisFilter fv = make_axis_filter(g.H, out_h);
  const Plan p = make_plan(g, fh, fv);
  const int64_t gt = (g.T + 1) / 2, gh = out_h / kPatch, gw = out_w / kPatch;
  at::Tensor out = at::empty({gt * gh * gw, kPatchDim}, frames.options().dtype(dtype));
  const bool aligned = reinterpret_cast<uintptr_t>(out.data_ptr()) % 32 == 0;
  if (dtype == at::kFloat) {
    run_frames(frames.data_ptr<uint8_t>(), p, order, PatchSink<float>{out.data_ptr<float>(), gh, gw, p.simd && aligned});
  } else {
    run_frames(frames.data_ptr<uint8_t>(), p, order,
               PatchSink<at::BFloat16>{out.data_ptr<at::BFloat16>(), gh, gw, p.simd && aligned});
  }
  return out;
}

at::Tensor resize_frames_cpu(const at::Tensor& frames_in, bool channels_last, int64_t out_h, int64_t out_w) {
  const FrameGeometry g = check_frames_args(frames_in, channels_last, out_h, out_w, /*need_patch_grid=*/false);
  const at::Tensor frames = frames_in.contiguous();
  const AxisFilter fh = make_axis_filter(g.W, out_w);
  const AxisFilter fv = make_axis_filter(g.H, out_h);
  const Plan p = make_plan(g, fh, fv);
  at::Tensor out = at::empty({g.T, 3, out_h, out_w}, frames.options());
  run_frames(frames.data_ptr<uint8_t>(), p, check_frame_order(std::nullopt, g.T), ResizeSink{out.data_ptr<uint8_t>()});
  return out;
}

TORCH_LIBRARY_IMPL(videor1, CPU, m) {
  m.impl("frames_to_patches", &frames_to_patches_cpu);
  m.impl("resize_frames", &resize_frames_cpu);
}

}  // namespace videor1
