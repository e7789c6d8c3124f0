"""The vLLM rollout server: runs in its own venv (.venv-vllm), under vLLM's torch, never ours.

    .venv-vllm/bin/python videor1/rollout/vllm_server/videor1_vllm_server.py --model runs/demo/tiny --port 8000

It imports only the standard library, numpy, safetensors, vLLM and its sibling videor1_weight_transfer
(torch only; nothing of videor1's package), and it is reached over loopback by videor1.rollout.vllm
(the client, in the trainer's venv). This folder holds only these two modules, whose names no
package uses, so it can be put on sys.path (PYTHONPATH) for vLLM's worker processes, which import
the weight-loading extension below by its qualified name.

HTTP + JSON, one request at a time (a lock around the engine; the trainer's ranks take turns):

    GET  /health        {"ok": true, "model": ..., "vllm": ..., "weights_version": n}
    POST /generate      {"requests": [...], "sampling": {...}} -> {"outputs": [...]}
    POST /load_weights  {"path": "/dev/shm/.../weights.safetensors", "version": n} -> {"seconds": s, "tensors": k}
                        or {"specs": [[name, dtype, shape], ...], "version": n}: the tensors arrive by
                        broadcast over the transfer group (videor1_weight_transfer), in that order
    POST /init_weight_transfer {"host", "port", "world_size", "backend": "nccl" | "gloo", "timeout_s"}
                        every worker joins the trainer's group (rank 0 = the trainer) -> {"ranks": [...]}

A request: {"prompt_token_ids": [...] (one vision pad per video or image: vLLM expands it),
"video": {"path": .npy of uint8 [T, H, W, 3], "fps": f} | "image": {"path": .npy of uint8 [H, W, 3]},
"mm_processor_kwargs": {...}, "n": n, "seed": s, "prompt_logprobs": bool}. Its output:
{"prompt_token_ids": [...] (as vLLM expanded them), "completions": [{"token_ids", "logprobs",
"finish_reason"}], "prompt_logprobs": [...] | null, "error": null | "message"}. A request that vLLM
rejects gets an error of its own; the others in the batch are still answered.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

log = logging.getLogger("videor1.vllm_server")

TEMPORAL_PATCH = 2  # Qwen2.5-VL: second_per_grid_t = temporal_patch_size / sampled fps


class WeightLoader:
    """vLLM worker extension (worker_extension_cls): loads a safetensors file into the model in place.

    The names are the HF checkpoint's (model.language_model..., model.visual..., lm_head...): vLLM's
    in-place reload (model_runner.reload_weights, checkpoint format) maps them onto its modules and
    reruns each layer's post-load processing (on the CPU the linear weights are repacked after
    loading, so the model's bare load_weights cannot be called twice); it also clears the encoder and
    multimodal caches, which hold outputs of the old weights."""

    def load_weights_from_file(self, path: str) -> int:
        from safetensors import safe_open

        count = 0
        with safe_open(path, framework="pt", device="cpu") as f:
            def tensors():
                nonlocal count
                for name in f.keys():
                    count += 1
                    yield name, f.get_tensor(name)

            self.model_runner.reload_weights(weights_iterator=tensors(), is_checkpoint_format=True)
        return count

    def shorten_idle_spin(self, seconds: float) -> int:
        """Busy-wait at most `seconds` for the next message once idle; returns the queues changed.

        A worker process reads its requests from a shared-memory queue that spins a full core for 1 s
        after each message (vLLM's SpinCondition.busy_loop_s; not configurable). On the CPU that core is
        one the trainer needs: it computes right after every rollout phase. Within a generate call the
        messages come ms apart, so a short spin keeps their latency."""
        import gc

        try:
            from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
        except ImportError:  # another vLLM layout: nothing to shorten
            return 0
        readers = [o for o in gc.get_objects()
                   if isinstance(o, SpinCondition) and getattr(o, "is_reader", False) and hasattr(o, "busy_loop_s")]
        for cond in readers:
            cond.busy_loop_s = min(cond.busy_loop_s, seconds)
        return len(readers)

    def init_weight_group(self, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> int:
        """Join the trainer's transfer group as rank 1 + this worker's rank; receive its probe tensor."""
        from videor1_weight_transfer import WeightGroup, probe

        rank = 1 + self.rank
        self.weight_group = WeightGroup(host, port, rank, world_size, backend, timeout_s, device=self.device)
        probe(self.weight_group)
        return rank

    def load_weights_from_group(self, specs: list) -> int:
        """Receive len(specs) tensors from the trainer, one broadcast each, straight into the reload.
        The rest of the stream is drained whatever happens, so the trainer's broadcasts never hang."""
        count = 0

        def tensors():
            nonlocal count
            for item in self.weight_group.receive(specs):
                count += 1
                yield item

        stream = tensors()
        try:
            self.model_runner.reload_weights(weights_iterator=stream, is_checkpoint_format=True)
        finally:
            for _ in stream:
                pass
        return count


def video_input(spec: dict):
    """(frames uint8 [T, H, W, 3], metadata) as vLLM's Qwen2.5-VL processor takes a pre-sampled video:
    every frame kept (do_sample_frames off), fps = the sampling fps, so its second_per_grid_ts is ours."""
    frames = np.load(spec["path"])
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video {spec['path']}: expected uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    t, fps = frames.shape[0], float(spec["fps"])
    meta = {"fps": fps, "duration": t / fps, "total_num_frames": t, "frames_indices": list(range(t)),
            "do_sample_frames": False, "video_backend": "videor1"}
    return frames, meta


def image_input(spec: dict):
    from PIL import Image

    pixels = np.load(spec["path"])
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"image {spec['path']}: expected uint8 [H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
    return Image.fromarray(pixels)


class Server:
    """One vLLM engine (vllm.LLM) and the lock that serialises its use."""

    def __init__(self, args):
        from vllm import LLM

        kwargs = dict(model=args.model, dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len or None,
                      enable_prefix_caching=True, generation_config="vllm",  # sampling from the request only
                      limit_mm_per_prompt={"video": 1, "image": 1}, enforce_eager=args.enforce_eager,
                      tensor_parallel_size=args.tensor_parallel_size,
                      worker_extension_cls="videor1_vllm_server.WeightLoader")
        if args.gpu_memory_utilization:
            kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
        self.llm = LLM(**kwargs)
        if args.idle_spin_s >= 0:
            queues = self.llm.collective_rpc("shorten_idle_spin", args=(args.idle_spin_s,))
            log.info("workers' idle busy-wait cut to %.3f s (%s queues)", args.idle_spin_s, queues)
        self.model = args.model
        self.lock = threading.Lock()
        self.weights_version = 0
        self.workers = args.tensor_parallel_size  # the weight-transfer group's ranks 1..workers

    def health(self) -> dict:
        import vllm

        return {"ok": True, "model": self.model, "vllm": vllm.__version__, "weights_version": self.weights_version,
                "workers": self.workers}

    def sampling_params(self, sampling: dict, req: dict):
        from vllm import SamplingParams

        suppress = {int(i): float("-inf") for i in sampling.get("suppress_token_ids", [])}
        return SamplingParams(
            n=int(req.get("n", 1)), temperature=float(sampling["temperature"]), top_p=float(sampling["top_p"]),
            top_k=int(sampling.get("top_k", 0)), min_p=float(sampling.get("min_p", 0.0)),
            repetition_penalty=float(sampling.get("repetition_penalty", 1.0)),
            max_tokens=int(sampling["max_tokens"]), stop_token_ids=[int(i) for i in sampling["stop_token_ids"]],
            logprobs=0, prompt_logprobs=0 if req.get("prompt_logprobs") else None,
            seed=req.get("seed"), logit_bias=suppress or None, detokenize=False, skip_special_tokens=False,
            ignore_eos=bool(sampling.get("ignore_eos", False)))  # benchmarks: every row max_tokens long

    @staticmethod
    def engine_input(req: dict) -> dict:
        out = {"prompt_token_ids": [int(i) for i in req["prompt_token_ids"]]}
        if req.get("video"):
            out["multi_modal_data"] = {"video": [video_input(req["video"])]}
        elif req.get("image"):
            out["multi_modal_data"] = {"image": image_input(req["image"])}
        if req.get("mm_processor_kwargs"):
            out["mm_processor_kwargs"] = req["mm_processor_kwargs"]
        return out

    @staticmethod
    def result(out) -> dict:
        completions = [{"token_ids": list(c.token_ids),
                        "logprobs": [float(d[t].logprob) for d, t in zip(c.logprobs or [], c.token_ids)],
                        "finish_reason": c.finish_reason} for c in out.outputs]
        prompt_logprobs = None
        if out.prompt_logprobs is not None:  # entry 0 is None (no logprob for the first token)
            prompt_logprobs = [None if d is None else float(d[t].logprob)
                               for d, t in zip(out.prompt_logprobs, out.prompt_token_ids)]
        return {"prompt_token_ids": list(out.prompt_token_ids), "completions": completions,
                "prompt_logprobs": prompt_logprobs, "error": None}

    def generate(self, body: dict) -> dict:
        reqs, sampling = body["requests"], body["sampling"]
        prepared, outputs = [], [None] * len(reqs)
        for i, req in enumerate(reqs):  # bad input fails its own request, not the batch
            try:
                prepared.append((i, self.engine_input(req), self.sampling_params(sampling, req)))
            except Exception as e:  # noqa: BLE001 - reported to the client per request
                outputs[i] = {"error": f"{type(e).__name__}: {e}"}
        with self.lock:
            try:
                results = self.llm.generate([p for _, p, _ in prepared], [s for _, _, s in prepared], use_tqdm=False)
                for (i, _, _), out in zip(prepared, results):
                    outputs[i] = self.result(out)
            except Exception:  # noqa: BLE001 - one bad request must not fail the others: retry one by one
                log.warning("batch of %d failed; retrying each request alone:\n%s", len(prepared), traceback.format_exc())
                for i, p, s in prepared:
                    try:
                        outputs[i] = self.result(self.llm.generate([p], [s], use_tqdm=False)[0])
                    except Exception as e:  # noqa: BLE001
                        outputs[i] = {"error": f"{type(e).__name__}: {e}"}
        return {"outputs": outputs}

    def init_weight_transfer(self, body: dict) -> dict:
        """Every worker joins the trainer's transfer group (videor1_weight_transfer); returns their ranks."""
        with self.lock:
            ranks = self.llm.collective_rpc("init_weight_group", args=(
                body["host"], int(body["port"]), int(body["world_size"]), body["backend"], float(body["timeout_s"])))
        log.info("joined the trainer's %s weight-transfer group as ranks %s of %s", body["backend"], ranks,
                 body["world_size"])
        return {"ranks": ranks}

    def load_weights(self, body: dict) -> dict:
        """From a safetensors file (body["path"]) or, with body["specs"], from the transfer group."""
        t0 = time.perf_counter()
        with self.lock:
            if "specs" in body:
                counts = self.llm.collective_rpc("load_weights_from_group", args=(body["specs"],))
            else:
                counts = self.llm.collective_rpc("load_weights_from_file", args=(body["path"],))
            # Every cache that outlives a request: the KV prefix cache and the vision encoder's outputs
            # were computed with the old weights; the multimodal input caches are reset on both sides
            # because the worker's half was (a half-reset pair desyncs: "Encoder cache miss").
            self.llm.reset_prefix_cache()
            self.llm.llm_engine.reset_encoder_cache()
            self.llm.reset_mm_cache()
            self.weights_version = int(body.get("version", self.weights_version + 1))
        seconds = time.perf_counter() - t0
        log.info("loaded %d tensors (version %d) in %.3f s", counts[0], self.weights_version, seconds)
        return {"seconds": seconds, "tensors": int(counts[0]), "weights_version": self.weights_version}


def make_handler(server: Server):
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 - http.server's name
            if self.path == "/health":
                self._reply(200, server.health())
            else:
                self._reply(404, {"error": f"no such endpoint {self.path}"})

        def do_POST(self):  # noqa: N802
            routes = {"/generate": server.generate, "/load_weights": server.load_weights,
                      "/init_weight_transfer": server.init_weight_transfer}
            if self.path not in routes:
                self._reply(404, {"error": f"no such endpoint {self.path}"})
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._reply(200, routes[self.path](body))
            except Exception as e:  # noqa: BLE001 - the client gets the error and the log the traceback
                log.error("%s failed:\n%s", self.path, traceback.format_exc())
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})

        def log_message(self, fmt, *args):  # one line per request in the server log, not stderr noise
            log.debug(fmt, *args)

    return Handler


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="local HF checkpoint directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=0, help="0: the checkpoint's")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--idle-spin-s", type=float, default=0.01,
                    help="the workers' busy-wait after a message, in s (vLLM's is 1 s; < 0: leave it)")
    ap.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone (0: the parent)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.0, help="0: vLLM's default")
    return ap.parse_args(argv)


def watch_parent(pid: int) -> None:
    """The trainer that started us may die by SIGKILL (no cleanup runs): never outlive it."""
    def loop():
        while True:
            time.sleep(2.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                log.warning("parent process %d is gone; exiting", pid)
                os._exit(0)

    threading.Thread(target=loop, daemon=True).start()


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    watch_parent(args.parent_pid or os.getppid())
    server = Server(args)
    httpd = ThreadingHTTPServer((args.host, args.port), make_handler(server))
    log.info("serving %s on http://%s:%d", args.model, args.host, args.port)
    print(f"videor1 vLLM server ready on http://{args.host}:{args.port}", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":  # vLLM spawns worker processes: the guard keeps them from re-running main
    main()
