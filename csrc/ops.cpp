// Op schemas (torch.ops.videor1.*) and the Python module videor1._C.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(videor1, m) {
  // frames: uint8 [T, 3, H, W], H and W multiples of 28 (already resized).
  // Returns float32 [ceil(T/2) * (H/14) * (W/14), 1176] in Qwen2.5-VL's patch order.
  m.def("patchify(Tensor frames) -> Tensor");
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
}
