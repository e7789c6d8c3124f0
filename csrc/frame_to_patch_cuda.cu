// CUDA frame-to-patch: uint8 frames on the GPU -> Qwen2.5-VL patches (fp32 or bf16) in one
// kernel on the current stream, no intermediate video in any dtype.
//
// One thread block owns one 28x28 output tile (= 4 patch rows of 1176) of a temporal pair of
// frames. For each frame of the pair it runs the separable resize in shared memory, chunk by
// chunk of input rows: stage A computes the horizontal pass of those rows for the tile's 28
// columns (uint8, as torchvision rounds between passes), stage B adds their vertical-pass
// contributions into per-thread int32 accumulators. The weights are the host-built int16 ones of
// frame_to_patch.h (the CPU op uses the very same), so both devices produce identical bits.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstring>

#include "frame_to_patch.h"
#include "frame_to_patch_host.h"

namespace videor1 {
namespace {

constexpr int kThreads = 256;
constexpr int kTileOut = kFactor * kFactor * 3;                      // 2352 outputs per frame per tile
constexpr int kOutPerThread = (kTileOut + kThreads - 1) / kThreads;  // 10
constexpr int kChunkRows = 128;                                      // input rows per shared-memory chunk
constexpr int kRowBytes = kFactor * 3;                               // one H-pass row of the tile: 84 bytes

struct KernelArgs {
  const uint8_t* frames;
  int64_t H, W;
  int T;
  int out_h, out_w;
  int gh2, gw2;  // 28x28 blocks per column / row
  const int32_t* order;   // [T]
  const int32_t* hstart;  // [out_w]
  const int32_t* vstart;  // [out_h]
  const int16_t* hw;      // [out_w * htaps]
  const int16_t* vw;      // [out_h * vtaps]
  int htaps, hprec, vtaps, vprec;
};

__device__ __forceinline__ void store_out(float v, float* dst) { *dst = v; }
__device__ __forceinline__ void store_out(float v, at::BFloat16* dst) {
  const uint32_t u = __float_as_uint(v);
  dst->x = static_cast<uint16_t>((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);  // round to nearest even, as the CPU
}

template <typename out_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads) frames_to_patches_kernel(KernelArgs a, out_t* __restrict__ out) {
  __shared__ uint8_t hbuf[kChunkRows * kRowBytes];
  const int tile = blockIdx.x;  // tiles on grid axis 0 (the only axis without a 65535 limit)
  const int bw = tile % a.gw2;
  const int bh = (tile / a.gw2) % a.gh2;
  const int pair = tile / (a.gw2 * a.gh2);
  const int x0 = kFactor * bw, y0 = kFactor * bh;
  const int lo = a.vstart[y0];
  const int hi = a.vstart[y0 + kFactor - 1] + a.vtaps;  // input rows the tile needs: [lo, hi)
  const int nslots = min(2, a.T - 2 * pair);
  const int64_t plane = a.H * a.W;

  for (int tt = 0; tt < nslots; ++tt) {
    const uint8_t* frame = a.frames + static_cast<int64_t>(a.order[2 * pair + tt]) * plane * 3;
    int32_t acc[kOutPerThread];
#pragma unroll
    for (int j = 0; j < kOutPerThread; ++j) acc[j] = 1 << (a.vprec - 1);

    for (int c0 = lo; c0 < hi; c0 += kChunkRows) {
      const int c1 = min(hi, c0 + kChunkRows);
      // Stage A: horizontal pass of rows [c0, c1), tile columns x0..x0+27, three channels.
      for (int idx = threadIdx.x; idx < (c1 - c0) * kFactor; idx += kThreads) {
        const int rr = idx / kFactor, xl = idx % kFactor;
        const int64_t r = c0 + rr;
        const int x = x0 + xl;
        const int s = __ldg(a.hstart + x);
        const int16_t* w = a.hw + static_cast<int64_t>(x) * a.htaps;
        int32_t h0 = 1 << (a.hprec - 1), h1 = h0, h2 = h0;
        for (int k = 0; k < a.htaps; ++k) {
          const int32_t wk = __ldg(w + k);
          if (kChannelsLast) {
            const uint8_t* px = frame + (r * a.W + s + k) * 3;
            h0 += wk * __ldg(px);
            h1 += wk * __ldg(px + 1);
            h2 += wk * __ldg(px + 2);
          } else {
            const uint8_t* px = frame + r * a.W + s + k;
            h0 += wk * __ldg(px);
            h1 += wk * __ldg(px + plane);
            h2 += wk * __ldg(px + 2 * plane);
          }
        }
        uint8_t* dst = hbuf + rr * kRowBytes + xl * 3;
        dst[0] = static_cast<uint8_t>(fixed_to_u8(h0, a.hprec));
        dst[1] = static_cast<uint8_t>(fixed_to_u8(h1, a.hprec));
        dst[2] = static_cast<uint8_t>(fixed_to_u8(h2, a.hprec));
      }
      __syncthreads();
      // Stage B: vertical-pass contributions of these rows to this thread's outputs.
#pragma unroll
      for (int j = 0; j < kOutPerThread; ++j) {
        const int o = threadIdx.x + j * kThreads;
        if (o < kTileOut) {
          // o enumerates the tile in output order: pw fastest, then ph, channel, patch row m.
          const int pw = o % kPatch, ph = (o / kPatch) % kPatch, ch = (o / (kPatch * kPatch)) % 3;
          const int m = o / (kPatch * kPatch * 3);
          const int y = y0 + kPatch * (m / kMerge) + ph;
          const int xl = kPatch * (m % kMerge) + pw;
          const int ys = __ldg(a.vstart + y);
          const int kb = max(0, c0 - ys), ke = min(a.vtaps, c1 - ys);
          const int16_t* w = a.vw + static_cast<int64_t>(y) * a.vtaps;
          int32_t sum = 0;
          for (int k = kb; k < ke; ++k) sum += __ldg(w + k) * hbuf[(ys + k - c0) * kRowBytes + xl * 3 + ch];
          acc[j] += sum;
        }
      }
      __syncthreads();
    }

    // Normalise and write; the padding slot of an odd-length video repeats the last frame.
    const int64_t row0 = (static_cast<int64_t>(pair) * a.gh2 * a.gw2 + static_cast<int64_t>(bh) * a.gw2 + bw) * kBlockRows;
#pragma unroll
    for (int j = 0; j < kOutPerThread; ++j) {
      const int o = threadIdx.x + j * kThreads;
      if (o < kTileOut) {
        const int pw = o % kPatch, ph = (o / kPatch) % kPatch, ch = (o / (kPatch * kPatch)) % 3;
        const int m = o / (kPatch * kPatch * 3);
        const float v = normalize_u8(fixed_to_u8(acc[j], a.vprec), ch);
        out_t* dst = out + (row0 + m) * kPatchDim + ch * (kTemporalPatch * kPatch * kPatch) + ph * kPatch + pw;
        store_out(v, dst + tt * (kPatch * kPatch));
        if (nslots == 1) store_out(v, dst + kPatch * kPatch);
      }
    }
  }
}

// Host tensor (pinned, so the copy below is asynchronous on the current stream) -> device.
template <typename T>
at::Tensor upload(const std::vector<T>& host, at::ScalarType dtype, const at::Device& device) {
  at::Tensor h = at::empty({static_cast<int64_t>(host.size())}, at::TensorOptions().dtype(dtype).pinned_memory(true));
  std::memcpy(h.data_ptr(), host.data(), host.size() * sizeof(T));
  return h.to(device, /*non_blocking=*/true);
}

}  // namespace

at::Tensor frames_to_patches_cuda(const at::Tensor& frames_in, bool channels_last, int64_t out_h, int64_t out_w,
                                  const std::optional<at::Tensor>& frame_order, at::ScalarType dtype) {
  const FrameGeometry g = check_frames_args(frames_in, channels_last, out_h, out_w, /*need_patch_grid=*/true);
  check_patch_dtype(dtype);
  const std::vector<int64_t> order = check_frame_order(frame_order, g.T);
  TORCH_CHECK(g.T < (int64_t(1) << 30), "too many frames: ", g.T);
  const c10::cuda::CUDAGuard guard(frames_in.device());
  const at::Tensor frames = frames_in.contiguous();
  const AxisFilter fh = make_axis_filter(g.W, out_w);
  const AxisFilter fv = make_axis_filter(g.H, out_h);

  // One int32 upload (order | hstart | vstart) and one int16 upload (h weights | v weights).
  std::vector<int32_t> meta;
  meta.reserve(g.T + out_w + out_h);
  for (int64_t v : order) meta.push_back(static_cast<int32_t>(v));
  meta.insert(meta.end(), fh.start.begin(), fh.start.end());
  meta.insert(meta.end(), fv.start.begin(), fv.start.end());
  std::vector<int16_t> weights(fh.weights);
  weights.insert(weights.end(), fv.weights.begin(), fv.weights.end());
  const at::Tensor meta_d = upload(meta, at::kInt, frames.device());
  const at::Tensor weights_d = upload(weights, at::kShort, frames.device());

  const int64_t gt = (g.T + 1) / 2, gh = out_h / kPatch, gw = out_w / kPatch;
  at::Tensor out = at::empty({gt * gh * gw, kPatchDim}, frames.options().dtype(dtype));
  KernelArgs a;
  a.frames = frames.data_ptr<uint8_t>();
  a.H = g.H;
  a.W = g.W;
  a.T = static_cast<int>(g.T);
  a.out_h = static_cast<int>(out_h);
  a.out_w = static_cast<int>(out_w);
  a.gh2 = static_cast<int>(gh / kMerge);
  a.gw2 = static_cast<int>(gw / kMerge);
  a.order = meta_d.data_ptr<int32_t>();
  a.hstart = a.order + g.T;
  a.vstart = a.hstart + out_w;
  a.hw = weights_d.data_ptr<int16_t>();
  a.vw = a.hw + fh.weights.size();
  a.htaps = fh.taps;
  a.hprec = fh.precision;
  a.vtaps = fv.taps;
  a.vprec = fv.precision;
  const int64_t tiles = gt * (gh / kMerge) * (gw / kMerge);
  TORCH_CHECK(tiles < (int64_t(1) << 31), "too many output tiles: ", tiles);
  const dim3 grid(static_cast<unsigned>(tiles));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (dtype == at::kFloat) {
    if (channels_last) {
      frames_to_patches_kernel<float, true><<<grid, kThreads, 0, stream>>>(a, out.data_ptr<float>());
    } else {
      frames_to_patches_kernel<float, false><<<grid, kThreads, 0, stream>>>(a, out.data_ptr<float>());
    }
  } else {
    if (channels_last) {
      frames_to_patches_kernel<at::BFloat16, true><<<grid, kThreads, 0, stream>>>(a, out.data_ptr<at::BFloat16>());
    } else {
      frames_to_patches_kernel<at::BFloat16, false><<<grid, kThreads, 0, stream>>>(a, out.data_ptr<at::BFloat16>());
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(videor1, CUDA, m) { m.impl("frames_to_patches", &frames_to_patches_cuda); }

}  // namespace videor1
