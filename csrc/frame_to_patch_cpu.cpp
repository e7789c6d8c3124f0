// CPU kernels for the frame-to-patch ops.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "frame_to_patch.h"

namespace videor1 {

void check_frames(const at::Tensor& frames) {
  TORCH_CHECK(frames.scalar_type() == at::kByte, "frames must be uint8, got ", frames.scalar_type());
  TORCH_CHECK(frames.dim() == 4, "frames must be [T, 3, H, W], got rank ", frames.dim());
  TORCH_CHECK(frames.size(0) > 0, "frames has zero frames");
  TORCH_CHECK(frames.size(1) == 3, "frames must have 3 channels at dim 1, got ", frames.size(1));
  TORCH_CHECK(frames.size(2) % kFactor == 0 && frames.size(3) % kFactor == 0,
              "frame height and width must be multiples of 28, got ", frames.size(2), "x", frames.size(3));
}

at::Tensor patchify_cpu(const at::Tensor& frames_in) {
  check_frames(frames_in);
  const at::Tensor frames = frames_in.contiguous();
  const int64_t T = frames.size(0), H = frames.size(2), W = frames.size(3);
  const int64_t gt = (T + 1) / 2, gh = H / kPatch, gw = W / kPatch;
  at::Tensor out = at::empty({gt * gh * gw, kPatchDim}, frames.options().dtype(at::kFloat));
  const uint8_t* src = frames.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, out.size(0), 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int c = 0; c < kPatchDim; ++c) {
        PatchSource s = patch_source(r, c, gh, gw);
        const int64_t t = s.t < T ? s.t : T - 1;  // temporal pad: repeat the last frame
        const float v = src[((t * 3 + s.ch) * H + s.y) * W + s.x];
        dst[r * kPatchDim + c] = normalize_u8(v, s.ch);
      }
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(videor1, CPU, m) { m.impl("patchify", &patchify_cpu); }

}  // namespace videor1
