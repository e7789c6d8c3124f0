// CUDA kernels for the frame-to-patch ops (compiled only when the CUDA build is on).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "frame_to_patch.h"

namespace videor1 {

void check_frames(const at::Tensor& frames);

__global__ void patchify_kernel(const uint8_t* __restrict__ src, float* __restrict__ dst, int64_t T,
                                int64_t H, int64_t W, int64_t gh, int64_t gw, int64_t rows) {
  // One thread per output element; rows on grid axis 0 through a flat index.
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * kPatchDim) return;
  const int64_t r = i / kPatchDim;
  const int c = static_cast<int>(i % kPatchDim);
  PatchSource s = patch_source(r, c, gh, gw);
  const int64_t t = s.t < T ? s.t : T - 1;
  dst[i] = normalize_u8(static_cast<float>(src[((t * 3 + s.ch) * H + s.y) * W + s.x]), s.ch);
}

at::Tensor patchify_cuda(const at::Tensor& frames_in) {
  check_frames(frames_in);
  const c10::cuda::CUDAGuard guard(frames_in.device());
  const at::Tensor frames = frames_in.contiguous();
  const int64_t T = frames.size(0), H = frames.size(2), W = frames.size(3);
  const int64_t gt = (T + 1) / 2, gh = H / kPatch, gw = W / kPatch;
  at::Tensor out = at::empty({gt * gh * gw, kPatchDim}, frames.options().dtype(at::kFloat));
  const int64_t n = out.numel();
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  patchify_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      frames.data_ptr<uint8_t>(), out.data_ptr<float>(), T, H, W, gh, gw, out.size(0));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(videor1, CUDA, m) { m.impl("patchify", &patchify_cuda); }

}  // namespace videor1
