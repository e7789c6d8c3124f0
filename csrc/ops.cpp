// Op schemas (torch.ops.videor1.*) and the Python module videor1._C.
#include <torch/extension.h>
#include <torch/library.h>

namespace videor1 {
void set_cpu_simd(bool enabled);
bool cpu_simd_active();
}  // namespace videor1

TORCH_LIBRARY(videor1, m) {
  // frames: uint8 [T, H, W, 3] (channels_last) or [T, 3, H, W]; out_h, out_w multiples of 28;
  // frame_order: optional int64 permutation of range(T) (slot i holds frame frame_order[i]).
  // Returns dtype (float32 | bfloat16) [ceil(T/2) * (out_h/14) * (out_w/14), 1176]: Qwen2.5-VL's
  // pixel_values_videos (antialiased bicubic resize, CLIP normalisation, patch order) in one pass.
  m.def(
      "frames_to_patches(Tensor frames, bool channels_last, int out_h, int out_w, Tensor? frame_order, "
      "ScalarType dtype) -> Tensor");
  // The resize alone, uint8 [T, 3, out_h, out_w], bit-exact with torchvision's antialiased bicubic
  // resize of uint8 tensors (CPU only; for tests and debugging).
  m.def("resize_frames(Tensor frames, bool channels_last, int out_h, int out_w) -> Tensor");
}

namespace {
bool cuda_built() {
#ifdef VIDEOR1_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "videor1 native ops; the ops themselves are registered under torch.ops.videor1";
  m.def("cuda_built", &cuda_built, "True when the CUDA kernels were compiled into this build");
  m.def("set_cpu_simd", &videor1::set_cpu_simd,
        "Enable (default) or disable the AVX2 CPU path; the scalar path computes the same values (tests)");
  m.def("cpu_simd_active", &videor1::cpu_simd_active, "True when the CPU ops use the AVX2 path");
}
