"""Benchmark: uint8 frames -> Qwen2.5-VL pixel_values_videos, and video decode throughput.

Providers (frames -> patches):
  transformers   Qwen2VLVideoProcessor on uint8 [T, 3, H, W] (its torchvision path)
  video-r1       Video-R1 / qwen-vl-utils: torchvision resize of the decoded [T, H, W, 3] frames
                 (a [T, 3, H, W] view), .float(), then the processor on the float video
  ours-cpu       videor1.frames_to_patches on [T, H, W, 3] (as decoders give frames)
  ours-cpu-tchw  the same on a contiguous [T, 3, H, W]
  ours-cuda      the same on CUDA frames (GPU only), and ours-cuda-h2d from pinned host frames
  transformers-cuda  the processor with device="cuda" (GPU only)

Inputs: 16 frames of 1280x720 and of 448x448, each to the training size (128*28*28 pixels) and the
evaluation size (256*28*28). Bytes moved = uint8 frames read + patches written (the least any
implementation must move); GB/s is that over the time. On a GPU the bound is also reported as a
fraction of the device's measured copy bandwidth. Decode: load_video (2 fps, 16 frames max) per
backend on short synthetic clips and one longer clip, all written here with PyAV.

Writes benchmarks/results/frame_to_patch_{cpu,cuda,decode}.csv and .png. Numbers, not tests.

    python benchmarks/bench_frame_to_patch.py [--threads 2] [--reps 15] [--quick]
    python benchmarks/bench_frame_to_patch.py --cuda-only --time-box 20 --tag cuda_<gpu>   # `make gpu-check`

On a GPU each shape also gets its own memory-copy bound: a device-to-device torch copy_ of the same
bytes (half read, half written: nbytes in all), timed with CUDA events (provider d2d-copy-same-bytes);
ours-cuda's x_copy_bound row is its time over that copy's. --cuda-only skips the CPU providers and
the decode benchmark; --time-box SECONDS starts no new CUDA shape after that many seconds.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from videor1.vision import frames_to_patches, load_video, smart_resize  # noqa: E402

warnings.filterwarnings("ignore")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SIZES = {"train": 128 * 28 * 28, "eval": 256 * 28 * 28}
INPUTS = [(16, 720, 1280), (16, 448, 448)]
ONE_LEVEL = 1.0 / (255.0 * 0.26130258)
FIELDS = ["kernel", "provider", "mode", "metric", "shape", "p50", "p20", "p80", "device", "threads", "bytes"]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else samples * 9
    return statistics.median(samples), q[1], q[7]  # p50, p20, p80


def processor(pixels: int):
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(size={"shortest_edge": pixels, "longest_edge": pixels})


def cpu_providers(frames_thwc: torch.Tensor, pixels: int) -> dict:
    import torchvision.transforms.v2.functional as tvF

    proc = processor(pixels)
    frames_tchw = frames_thwc.permute(0, 3, 1, 2).contiguous()
    h, w = smart_resize(frames_thwc.shape[1], frames_thwc.shape[2], 28, pixels, pixels)

    def video_r1():
        video = tvF.resize(frames_thwc.permute(0, 3, 1, 2), [h, w], interpolation=tvF.InterpolationMode.BICUBIC,
                           antialias=True).float()
        return proc(videos=[video], return_tensors="pt", cap_pixels_per_frame=False)["pixel_values_videos"]

    return {
        "transformers": lambda: proc(videos=[frames_tchw], return_tensors="pt",
                                     cap_pixels_per_frame=False)["pixel_values_videos"],
        "video-r1": video_r1,
        "ours-cpu": lambda: frames_to_patches(frames_thwc, min_pixels=pixels, max_pixels=pixels)[0],
        "ours-cpu-tchw": lambda: frames_to_patches(frames_tchw, min_pixels=pixels, max_pixels=pixels)[0],
    }


def time_round_robin(fns: dict, reps: int, sync=lambda: None) -> dict:
    """Each round runs every provider once, so a noisy neighbour hits all of them alike."""
    for fn in fns.values():
        fn()
    sync()
    samples = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append(time.perf_counter() - t0)
    return samples


def rows_for(provider, shape, seconds, n_frames, nbytes, device, threads):
    ms = [s * 1e3 for s in seconds]
    fps = [n_frames / s for s in seconds]
    gbs = [nbytes / s / 1e9 for s in seconds]
    out = []
    for metric, values in (("ms", ms), ("frames_per_s", fps), ("GB_per_s", gbs)):
        p50, p20, p80 = percentiles(values)
        out.append(dict(kernel="frame_to_patch", provider=provider, mode="forward", metric=metric, shape=shape,
                        p50=round(p50, 4), p20=round(p20, 4), p80=round(p80, 4), device=device, threads=threads,
                        bytes=nbytes))
    return out


def bench_cpu(reps: int, threads: int, inputs) -> list[dict]:
    torch.set_num_threads(threads)
    rows, device = [], cpu_name()
    for t, height, width in inputs:
        frames = torch.randint(0, 256, (t, height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        for size_name, pixels in SIZES.items():
            fns = cpu_providers(frames, pixels)
            ref, ours = fns["transformers"](), fns["ours-cpu"]()
            assert (ours - ref).abs().max().item() <= ONE_LEVEL * 1.0001, "ours-cpu disagrees with the processor"
            h, w = smart_resize(height, width, 28, pixels, pixels)
            shape = f"{t}x{height}x{width}->{h}x{w} ({size_name})"
            nbytes = frames.numel() + ours.numel() * 4
            samples = time_round_robin(fns, reps)
            for name, seconds in samples.items():
                rows += rows_for(name, shape, seconds, t, nbytes, device, threads)
            med = {name: statistics.median(s) * 1e3 for name, s in samples.items()}
            print(f"[cpu {threads} threads] {shape}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items())
                  + f" | ours-cpu is {med['transformers'] / med['ours-cpu']:.2f}x transformers, "
                  f"{med['video-r1'] / med['ours-cpu']:.2f}x video-r1", flush=True)
    return rows


def copy_bandwidth_cuda() -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second (a practical bandwidth bound)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * (1 << 30) / best


def copy_time_cuda(nbytes: int, reps: int) -> list[float]:
    """Seconds of a device-to-device copy_ that moves nbytes in all (nbytes / 2 read, nbytes / 2 written)."""
    src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return time_cuda(lambda: dst.copy_(src), reps)


def bench_cuda(reps: int, inputs, time_box: float | None = None) -> list[dict]:
    t_end = None if time_box is None else time.monotonic() + time_box
    rows, device = [], torch.cuda.get_device_name()
    bound = copy_bandwidth_cuda()
    print(f"[cuda] {device}: device-to-device copy {bound / 1e9:.0f} GB/s", flush=True)
    rows.append(dict(kernel="frame_to_patch", provider="d2d-copy", mode="bound", metric="GB_per_s", shape="1GiB",
                     p50=round(bound / 1e9, 1), p20="", p80="", device=device, threads="", bytes=2 * (1 << 30)))
    for t, height, width in inputs:
        host = torch.randint(0, 256, (t, height, width, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        pinned, on_gpu = host.pin_memory(), host.cuda()
        for size_name, pixels in SIZES.items():
            h, w = smart_resize(height, width, 28, pixels, pixels)
            shape = f"{t}x{height}x{width}->{h}x{w} ({size_name})"
            if t_end is not None and time.monotonic() > t_end:
                rows.append(dict(kernel="frame_to_patch", provider="time-box", mode="forward", metric="", shape=shape,
                                 p50="", p20="", p80="", device=device, threads="", bytes=""))
                print(f"[cuda] {shape}: not measured (the {time_box:.0f} s time box ran out)", flush=True)
                continue
            cpu_out, _ = frames_to_patches(host, min_pixels=pixels, max_pixels=pixels)
            for dtype, tag in ((torch.float32, ""), (torch.bfloat16, "-bf16")):
                gpu_out, _ = frames_to_patches(on_gpu, min_pixels=pixels, max_pixels=pixels, dtype=dtype)
                assert torch.equal(gpu_out.cpu(), cpu_out.to(dtype)), "ours-cuda disagrees with ours-cpu"
                nbytes = host.numel() + gpu_out.numel() * gpu_out.element_size()
                seconds = time_cuda(lambda: frames_to_patches(on_gpu, min_pixels=pixels, max_pixels=pixels, dtype=dtype), reps)
                rows += rows_for(f"ours-cuda{tag}", shape, seconds, t, nbytes, device, "")
                frac = nbytes / statistics.median(seconds) / bound
                rows.append(dict(kernel="frame_to_patch", provider=f"ours-cuda{tag}", mode="forward",
                                 metric="fraction_of_copy_bandwidth", shape=shape, p50=round(frac, 4), p20="", p80="",
                                 device=device, threads="", bytes=nbytes))
                copy = copy_time_cuda(nbytes, reps)  # the same bytes moved by torch's copy_: the practical bound
                rows += rows_for("d2d-copy-same-bytes" + tag, shape, copy, t, nbytes, device, "")
                ratio = statistics.median(seconds) / statistics.median(copy)
                rows.append(dict(kernel="frame_to_patch", provider=f"ours-cuda{tag}", mode="forward",
                                 metric="x_copy_bound", shape=shape, p50=round(ratio, 3), p20="", p80="",
                                 device=device, threads="", bytes=nbytes))
                print(f"[cuda] {shape} {dtype}: {statistics.median(seconds) * 1e6:.1f} us, "
                      f"{nbytes / statistics.median(seconds) / 1e9:.0f} GB/s = {frac:.0%} of copy bandwidth; "
                      f"{ratio:.2f}x a copy_ of the same bytes ({statistics.median(copy) * 1e6:.1f} us)", flush=True)
            nbytes = host.numel() + cpu_out.numel() * 4
            h2d = time_cuda(lambda: frames_to_patches(pinned, min_pixels=pixels, max_pixels=pixels, device="cuda"), reps)
            rows += rows_for("ours-cuda-h2d", shape, h2d, t, nbytes, device, "")
            proc = processor(pixels)
            hf = time_cuda(lambda: proc(videos=[on_gpu.permute(0, 3, 1, 2)], return_tensors="pt", device="cuda",
                                        cap_pixels_per_frame=False), max(3, reps // 3))
            rows += rows_for("transformers-cuda", shape, hf, t, nbytes, device, "")
    return rows


def time_cuda(fn, reps: int) -> list[float]:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return out


def write_mp4(path: str, num_frames: int, height: int, width: int, fps: int) -> None:
    import av

    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "preset": "ultrafast"}
        for t in range(num_frames):  # a moving square over a drifting gradient
            frame = np.stack([(xx + 2 * t) % 256, (yy + t) % 256, np.full_like(xx, (7 * t) % 256)], -1).astype(np.uint8)
            y0, x0 = (3 * t) % max(1, height - 16), (5 * t) % max(1, width - 16)
            frame[y0:y0 + 16, x0:x0 + 16] = 255
            for packet in stream.encode(__import__("av").VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def bench_decode(reps: int, threads: int, quick: bool) -> list[dict]:
    import importlib.util

    torch.set_num_threads(threads)
    backends = [b for b, m in (("decord", "decord"), ("pyav", "av"), ("torchcodec", "torchcodec"))
                if importlib.util.find_spec(m) is not None]
    clips = [("synthetic 3s 128x128@15", 45, 128, 128, 15), ("synthetic 8s 224x224@30", 240, 224, 224, 30),
             ("longer 60s 640x360@30", 600 if quick else 1800, 360, 640, 30)]
    rows, device = [], cpu_name()
    with tempfile.TemporaryDirectory() as tmp:
        for name, n, h, w, fps in clips:
            path = os.path.join(tmp, name.split()[0] + f"_{n}.mp4")
            write_mp4(path, n, h, w, fps)
            fns = {b: (lambda b=b: load_video(path, fps=2.0, max_frames=16, backend=b)) for b in backends}
            samples = time_round_robin(fns, max(3, reps // 3))
            _, meta = fns[backends[0]]()
            for backend, seconds in samples.items():
                ms, fr = [s * 1e3 for s in seconds], [len(meta.frame_indices) / s for s in seconds]
                for metric, values in (("ms_per_video", ms), ("sampled_frames_per_s", fr)):
                    p50, p20, p80 = percentiles(values)
                    rows.append(dict(kernel="load_video", provider=backend, mode="decode", metric=metric,
                                     shape=f"{name} ({n} frames -> {len(meta.frame_indices)})", p50=round(p50, 3),
                                     p20=round(p20, 3), p80=round(p80, 3), device=device, threads=threads,
                                     bytes=os.path.getsize(path)))
            print(f"[decode] {name}: " + ", ".join(f"{b} {statistics.median(s) * 1e3:.1f} ms" for b, s in samples.items()),
                  flush=True)
    return rows


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {os.path.relpath(path, ROOT)}")


def plot(path: str, rows: list[dict], metric: str, title: str) -> None:
    try:
        import matplotlib
    except ImportError:  # a borrowed GPU machine may have no matplotlib: the CSV is what matters
        print(f"no plot for {os.path.relpath(path, ROOT)}: matplotlib is not installed")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["metric"] == metric]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(shapes)), 4.5))
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        values = [next((float(r["p50"]) for r in rows if r["shape"] == s and r["provider"] == provider), 0.0) for s in shapes]
        lo = [v - next((float(r["p20"]) for r in rows if r["shape"] == s and r["provider"] == provider), v)
              for v, s in zip(values, shapes)]
        hi = [next((float(r["p80"]) for r in rows if r["shape"] == s and r["provider"] == provider), v) - v
              for v, s in zip(values, shapes)]
        xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(shapes))]
        ax.bar(xs, values, width, label=provider, yerr=[np.abs(lo), np.abs(hi)], capsize=2)
    ax.set_xticks(range(len(shapes)))
    ax.set_xticklabels([s.replace(" (", "\n(") for s in shapes], fontsize=8)
    ax.set_ylabel(f"{metric} (p50, bars p20-p80)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {os.path.relpath(path, ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for every CPU provider")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="one input, fewer repetitions (a smoke run)")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--cuda-only", action="store_true", help="only the CUDA providers (no CPU providers, no decode)")
    parser.add_argument("--time-box", type=float, default=None, help="seconds: start no new CUDA shape after this")
    parser.add_argument("--tag", default="cuda", help="CUDA results file: frame_to_patch_<tag>.csv (default cuda)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    inputs = INPUTS[:1] if args.quick else INPUTS
    reps = 3 if args.quick else args.reps

    if not args.cuda_only:
        rows = bench_cpu(reps, args.threads, inputs)
        write_csv(os.path.join(args.out, "frame_to_patch_cpu.csv"), rows)
        plot(os.path.join(args.out, "frame_to_patch_cpu.png"), rows, "frames_per_s",
             f"frames -> Qwen2.5-VL patches on {cpu_name()}, {args.threads} threads")
    if torch.cuda.is_available():
        rows = bench_cuda(reps if args.cuda_only else max(reps, 20), inputs, args.time_box)
        write_csv(os.path.join(args.out, f"frame_to_patch_{args.tag}.csv"), rows)
        plot(os.path.join(args.out, f"frame_to_patch_{args.tag}.png"), rows, "frames_per_s",
             f"frames -> Qwen2.5-VL patches on {torch.cuda.get_device_name()}")
    else:
        print("no GPU: ours-cuda not measured")
        if args.cuda_only:
            sys.exit("--cuda-only: no GPU here")
    if not args.skip_decode and not args.cuda_only:
        rows = bench_decode(reps, args.threads, args.quick)
        write_csv(os.path.join(args.out, "frame_to_patch_decode.csv"), rows)
        plot(os.path.join(args.out, "frame_to_patch_decode.png"), rows, "sampled_frames_per_s",
             f"load_video (2 fps, <= 16 frames) on {cpu_name()}, {args.threads} threads")


if __name__ == "__main__":
    main()
