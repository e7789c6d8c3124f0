// Frame-to-patch: the one truth shared by the CPU (frame_to_patch_cpu.cpp) and CUDA
// (frame_to_patch_cuda.cu) kernels. Everything here is __host__ __device__.
//
// What the kernels compute, for uint8 frames V[T][H][W][3] (or [T][3][H][W]):
//   1. resize each frame to (out_h, out_w) exactly as torchvision's antialiased bicubic resize of
//      uint8 tensors does on the CPU (PyTorch's _upsample_bicubic2d_aa uint8 path, a port of
//      Pillow-SIMD): separable, horizontal pass first, int16 fixed-point weights, each pass
//      rounded and clamped to uint8;
//   2. normalise as transformers' Qwen2-VL processors do in float32: (v - 255*mean) / (255*std);
//   3. write straight into Qwen2.5-VL's patch layout (see patch_source below).
// The resize is bit-exact with torchvision and the normalisation is bit-exact with transformers,
// so the fused result equals Qwen2VLVideoProcessor's pixel_values_videos exactly.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define VR1_HD __host__ __device__ __forceinline__
#else
#define VR1_HD inline
#endif

namespace videor1 {

constexpr int kPatch = 14;                                       // spatial patch size
constexpr int kTemporalPatch = 2;                                // frames per temporal patch
constexpr int kMerge = 2;                                        // spatial merge size
constexpr int kFactor = kPatch * kMerge;                         // 28: sizes are multiples of this
constexpr int kPatchDim = 3 * kTemporalPatch * kPatch * kPatch;  // 1176 columns
constexpr int kBlockRows = kMerge * kMerge;                      // 4 patch rows per 28x28 block

// ---------------------------------------------------------------------------------------------
// Normalisation. transformers fuses rescale(1/255) and normalize(mean, std) into
// (x - mean_f32 * 255) / (std_f32 * 255), every step in float32 (mean/std are float32 tensors
// multiplied by 1/rescale_factor = 255.0). These are those float32 products, bit for bit
// (OPENAI_CLIP_MEAN = 0.48145466, 0.4578275, 0.40821073; OPENAI_CLIP_STD = 0.26862954,
// 0.26130258, 0.27577711). Functions, not arrays: constexpr arrays are not addressable on device.
VR1_HD float clip_mean255(int ch) {
  return ch == 0 ? 0x1.eb1572p+6f : (ch == 1 ? 0x1.d2fbecp+6f : 0x1.a05ffcp+6f);
}
VR1_HD float clip_std255(int ch) {
  return ch == 0 ? 0x1.12008cp+6f : (ch == 1 ? 0x1.0a8756p+6f : 0x1.194aeap+6f);
}

// uint8 value -> normalised float with transformers' exact float32 operations (sub, then div).
// nvcc builds with --use_fast_math, so device code spells out IEEE round-to-nearest division.
VR1_HD float normalize_u8(int v, int ch) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(__fsub_rn(static_cast<float>(v), clip_mean255(ch)), clip_std255(ch));
#else
  return (static_cast<float>(v) - clip_mean255(ch)) / clip_std255(ch);
#endif
}

// ---------------------------------------------------------------------------------------------
// Qwen2.5-VL patch layout. Resized video V[T'][3][H][W] (T' = T padded to even by repeating the
// last frame), gt = T'/2, gh = H/14, gw = W/14; output P has gt*gh*gw rows of 1176 columns.
// Column c: pw = c % 14, ph = (c / 14) % 14, tt = (c / 196) % 2, ch = c / 392.
// Row r: mw = r % 2, mh = (r / 2) % 2, q = r / 4, bw = q % (gw/2), bh = (q / (gw/2)) % (gh/2),
// t = q / (gh*gw/4).  P[r][c] = normalize(V[2t+tt][ch][28*bh + 14*mh + ph][28*bw + 14*mw + pw]).
struct PatchSource {
  int64_t t;  // frame index in the (padded) resized video
  int ch;     // channel
  int64_t y;  // row in the resized frame
  int64_t x;  // column in the resized frame
};

// Forward index map: output element (r, c) -> the resized pixel it holds.
VR1_HD PatchSource patch_source(int64_t r, int c, int64_t gh, int64_t gw) {
  const int pw = c % kPatch;
  const int ph = (c / kPatch) % kPatch;
  const int tt = (c / (kPatch * kPatch)) % kTemporalPatch;
  const int ch = c / (kPatch * kPatch * kTemporalPatch);
  const int64_t mw = r % kMerge;
  const int64_t mh = (r / kMerge) % kMerge;
  const int64_t q = r / (kMerge * kMerge);
  const int64_t bws = gw / kMerge;
  const int64_t bhs = gh / kMerge;
  const int64_t bw = q % bws;
  const int64_t bh = (q / bws) % bhs;
  const int64_t t = q / (bws * bhs);
  PatchSource s;
  s.t = kTemporalPatch * t + tt;
  s.ch = ch;
  s.y = kFactor * bh + kPatch * mh + ph;
  s.x = kFactor * bw + kPatch * mw + pw;
  return s;
}

// Inverse map, the one the kernels write with: resized pixel (slot t, ch, y, x) -> (row, col).
VR1_HD int64_t patch_row(int64_t t, int64_t y, int64_t x, int64_t gh, int64_t gw) {
  const int64_t bh = y / kFactor, mh = (y / kPatch) % kMerge;
  const int64_t bw = x / kFactor, mw = (x / kPatch) % kMerge;
  return (((t / kTemporalPatch) * (gh / kMerge) + bh) * (gw / kMerge) + bw) * kBlockRows + mh * kMerge + mw;
}
VR1_HD int patch_col(int64_t t, int ch, int64_t y, int64_t x) {
  return static_cast<int>(ch * (kTemporalPatch * kPatch * kPatch) + (t % kTemporalPatch) * (kPatch * kPatch) +
                          (y % kPatch) * kPatch + (x % kPatch));
}

// ---------------------------------------------------------------------------------------------
// Antialiased bicubic weights, one axis at a time, as PyTorch computes them for uint8 input
// (HelperInterpCubic with antialias=True, _compute_indices_min_size_weights_aa and
// _compute_index_ranges_int16_weights). Computed in double on the host; the kernels only see the
// int16 weights, so both devices use the very same numbers.

// Keys cubic with a = -0.5 (Pillow's and torch's antialias filter).
VR1_HD double aa_bicubic_filter(double x) {
  const double a = -0.5;
  if (x < 0) x = -x;
  if (x < 1.0) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2.0) return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a;
  return 0.0;
}

// Input pixels per output pixel over input pixels: torch's area_pixel_compute_scale without
// align_corners and without an explicit scale factor (torchvision passes sizes).
VR1_HD double aa_scale(int64_t in_size, int64_t out_size) {
  return static_cast<double>(in_size) / static_cast<double>(out_size);
}

// Filter half-width in input pixels and the most taps one output pixel can have.
VR1_HD double aa_support(double scale) { return scale >= 1.0 ? 2.0 * scale : 2.0; }
VR1_HD int aa_max_taps(double scale) {
  const double s = aa_support(scale);
  int c = static_cast<int>(s);
  if (static_cast<double>(c) < s) ++c;  // ceil
  return 2 * c + 1;
}

// Taps of output pixel i: first input index *xmin, count *xsize (<= max_taps), normalised double
// weights w[0..*xsize). Returns the largest weight (for the fixed-point precision).
VR1_HD double aa_tap_weights(int64_t i, int64_t in_size, double scale, int max_taps, double* w, int64_t* xmin,
                             int64_t* xsize) {
  const double support = aa_support(scale);
  const double center = scale * (static_cast<double>(i) + 0.5);
  const double invscale = scale >= 1.0 ? 1.0 / scale : 1.0;
  int64_t lo = static_cast<int64_t>(center - support + 0.5);  // truncation, as torch's cast
  if (lo < 0) lo = 0;
  int64_t hi = static_cast<int64_t>(center + support + 0.5);
  if (hi > in_size) hi = in_size;
  int64_t n = hi - lo;
  if (n < 0) n = 0;
  if (n > max_taps) n = max_taps;
  double total = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double v = aa_bicubic_filter((static_cast<double>(j + lo) - center + 0.5) * invscale);
    w[j] = v;
    total += v;
  }
  double wmax = 0.0;
  if (total != 0.0) {
    for (int64_t j = 0; j < n; ++j) {
      w[j] /= total;
      if (w[j] > wmax) wmax = w[j];
    }
  }
  *xmin = lo;
  *xsize = n;
  return wmax;
}

// Fixed-point precision: the most fraction bits that keep the largest weight inside int16.
VR1_HD int aa_weights_precision(double wmax) {
  int p = 0;
  for (; p < 22; ++p) {
    const int next = static_cast<int>(0.5 + wmax * static_cast<double>(1 << (p + 1)));
    if (next >= (1 << 15)) break;
  }
  return p;
}

// Double weight -> int16 at that precision, rounding half away from zero (torch's rule).
VR1_HD int16_t aa_quantize_weight(double w, int precision) {
  const double v = w * static_cast<double>(1 << precision);
  return static_cast<int16_t>(v < 0 ? static_cast<int>(-0.5 + v) : static_cast<int>(0.5 + v));
}

// Fixed-point sum (already including the 1 << (precision-1) rounding term) -> uint8.
VR1_HD int fixed_to_u8(int32_t acc, int precision) {
  const int v = acc >> precision;  // arithmetic shift: floor, as torch's scalar and AVX2 paths
  return v < 0 ? 0 : (v > 255 ? 255 : v);
}

}  // namespace videor1
