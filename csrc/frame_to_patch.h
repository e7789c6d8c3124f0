// Qwen2.5-VL patch layout shared by the CPU and CUDA kernels (one truth for both devices).
// See ../shared/DESIGN.md "Qwen2.5-VL patch layout". Everything here is __host__ __device__.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define VR1_HD __host__ __device__ __forceinline__
#else
#define VR1_HD inline
#endif

namespace videor1 {

constexpr int kPatch = 14;          // spatial patch size
constexpr int kTemporalPatch = 2;   // frames per temporal patch
constexpr int kMerge = 2;           // spatial merge size
constexpr int kFactor = kPatch * kMerge;  // 28: sizes are multiples of this
constexpr int kPatchDim = 3 * kTemporalPatch * kPatch * kPatch;  // 1176 columns

// OpenAI CLIP normalisation used by Qwen2-VL / Qwen2.5-VL processors (functions, not arrays:
// a constexpr array is not addressable from device code).
VR1_HD float clip_mean(int ch) { return ch == 0 ? 0.48145466f : (ch == 1 ? 0.4578275f : 0.40821073f); }
VR1_HD float clip_std(int ch) { return ch == 0 ? 0.26862954f : (ch == 1 ? 0.26130258f : 0.27577711f); }

// Where one output element P[r][c] reads from in the resized video V[T'][3][H][W].
struct PatchSource {
  int64_t t;   // frame index in the (padded) resized video
  int ch;      // channel
  int64_t y;   // row in the resized frame
  int64_t x;   // column in the resized frame
};

// Index map: output row r, column c -> source coordinates. gh, gw are the patch-grid sizes
// (H / 14, W / 14), both even.
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

// uint8 value -> normalised float, as rescale(1/255) then (x - mean) / std.
VR1_HD float normalize_u8(float v, int ch) {
  return (v * (1.0f / 255.0f) - clip_mean(ch)) / clip_std(ch);
}

}  // namespace videor1
