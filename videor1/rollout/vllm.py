"""The vLLM rollout backend: a vLLM server in its own venv, reached over loopback (the client side).

    server = VLLMServer.start(python=".venv-vllm/bin/python", model="runs/demo/tiny", port=0, ...)
    client = VLLMClient(server.url, server=server)
    backend = VLLMBackend(cfg, client, ...)
    backend.sync_weights(policy, version)   # after every optimiser step, before the next rollouts
    samples = backend.sample(requests, step)

vLLM pins another torch and transformers than ours, so it runs as a separate process
(videor1/rollout/vllm_server/videor1_vllm_server.py, under .venv-vllm), as TRL's `trl vllm-serve`.
Each request carries exactly what training uses: our prompt token ids (with one vision pad per
video, which vLLM expands to the same count we did: tests/test_rollout_vllm.py), the uint8 frames we
sampled in their order (the shuffled copy as its own request, its frames permuted as our shuffled
patches), fps = 2 / second_per_grid_t with frame sampling off, and our pixel bounds. Weights reach
the server after every optimiser step (rollout.vllm_weight_transfer): over a torch.distributed group
with its workers, one broadcast per tensor (NCCL on GPUs, gloo on the CPU;
vllm_server/videor1_weight_transfer.py), or as a safetensors file in shared memory (/dev/shm); vLLM
loads them in place either way.

Failures: a server that cannot start fails within rollout.vllm_start_timeout_s with the last lines
of its log; a server that dies mid-run fails the run with its exit code and log; a request that
vLLM rejects is retried once, then its group is skipped (logged and counted by the trainer).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import torch

from videor1 import distributed as D
from videor1.rollout.hf import Request, Sampled
from videor1.rollout.inputs import completion_mask

log = logging.getLogger("videor1.rollout.vllm")

SERVER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_server")
SERVER_SCRIPT = os.path.join(SERVER_DIR, "videor1_vllm_server.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_PYTHON = os.path.join(REPO, ".venv-vllm", "bin", "python")
TEMPORAL_PATCH = 2  # Qwen2.5-VL: second_per_grid_t = temporal_patch_size / fps


class VLLMServerError(RuntimeError):
    """The vLLM server cannot start, died, or cannot be reached: the run stops."""


class VLLMRequestError(RuntimeError):
    """vLLM answered a request with an error (retried once, then the group is skipped)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


@dataclasses.dataclass
class VLLMServer:
    """A server process this run started (its own process group, so stop() takes its workers too)."""

    proc: subprocess.Popen
    url: str
    log_path: str

    @classmethod
    def start(cls, *, model: str, log_path: str, python: str = "", port: int = 0, dtype: str = "float32",
              max_model_len: int = 0, enforce_eager: bool = True, kv_cache_gib: float = 1.0,
              tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.0, seed: int = 0,
              env: dict | None = None, script: str = SERVER_SCRIPT) -> "VLLMServer":
        """Start the server script under `python` (default .venv-vllm/bin/python) on 127.0.0.1:`port`
        (0: a free one), its output appended to log_path. Returns at once (VLLMClient.wait_ready)."""
        python = python or DEFAULT_PYTHON
        if not os.path.exists(python):
            raise VLLMServerError(f"rollout.vllm_python: {python} does not exist; build the vLLM venv with "
                                  "`make vllm-env` (or point rollout.vllm_python at a python with vLLM)")
        port = port or free_port()
        cmd = [python, script, "--model", os.path.abspath(model), "--port", str(port), "--dtype", dtype,
               "--seed", str(seed), "--parent-pid", str(os.getpid()),
               "--max-model-len", str(max_model_len), "--tensor-parallel-size", str(tensor_parallel_size)]
        if enforce_eager:
            cmd.append("--enforce-eager")
        if gpu_memory_utilization:
            cmd += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
        # The server's own environment: vLLM's venv, not ours (no PYTHONPATH of the trainer; the
        # server folder on it so vLLM's workers can import the weight-loading extension).
        child_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TORCH_", "TRITON_"))}
        child_env.update({"PYTHONPATH": SERVER_DIR, "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gib))),
                          "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                          "VLLM_DO_NOT_TRACK": "1", **(env or {})})
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"):
            child_env.pop(key, None)  # torchrun's variables would make vLLM think it is a distributed job
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
        with open(log_path, "ab") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=child_env, cwd=REPO,
                                    start_new_session=True)
        log.info("vLLM server starting (pid %d, port %d, log %s)", proc.pid, port, log_path)
        return cls(proc, f"http://127.0.0.1:{port}", log_path)

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise VLLMServerError(f"the vLLM server (pid {self.proc.pid}, {self.url}) exited with code {code}; "
                                  f"last lines of {self.log_path}:\n{_tail(self.log_path)}")

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class VLLMClient:
    """HTTP + JSON calls to one server. `server`: the process when this run started it (its death is
    then told apart from a network error)."""

    def __init__(self, url: str, *, timeout_s: float = 600.0, server: VLLMServer | None = None):
        self.url, self.timeout_s, self.server = url.rstrip("/"), timeout_s, server

    def _call(self, path: str, body: dict | None = None, timeout_s: float | None = None, grace_s: float = 5.0) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise VLLMRequestError(f"vLLM server {self.url}{path}: HTTP {e.code}: {detail[:2000]}") from None
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException, TimeoutError, socket.timeout) as e:
            if self.server is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.server.proc.wait(grace_s)  # a dying server drops the connection just before it exits
                self.server.check_alive()  # raises with the exit code and the log when it died
            raise VLLMServerError(f"vLLM server {self.url}{path} unreachable: {e}") from None

    def health(self, timeout_s: float = 5.0, grace_s: float = 5.0) -> dict:
        return self._call("/health", timeout_s=timeout_s, grace_s=grace_s)

    def wait_ready(self, timeout_s: float) -> dict:
        """Poll /health until the server answers; fail (stopping a server we started) after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.server is not None:
                self.server.check_alive()
            try:
                return self.health(grace_s=0.0)  # refused while it loads: poll again, don't wait
            except VLLMServerError as e:
                if self.server is not None and self.server.proc.poll() is not None:
                    raise
                if time.monotonic() > deadline:
                    last = "" if self.server is None else (f"; last lines of {self.server.log_path}:\n"
                                                          f"{_tail(self.server.log_path)}")
                    if self.server is not None:
                        self.server.stop()
                    raise VLLMServerError(f"the vLLM server at {self.url} did not become healthy within "
                                          f"{timeout_s:.0f} s (rollout.vllm_start_timeout_s) ({e}){last}") from None
            time.sleep(0.5)

    def generate(self, requests: list[dict], sampling: dict) -> list[dict]:
        return self._call("/generate", {"requests": requests, "sampling": sampling})["outputs"]

    def load_weights(self, version: int, *, path: str | None = None, specs: list | None = None) -> dict:
        """Load weights from a safetensors file (`path`) or, with `specs`, from the transfer group."""
        body = {"version": version, **({"specs": specs} if specs is not None else {"path": path})}
        return self._call("/load_weights", body)

    def init_weight_transfer(self, *, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> dict:
        return self._call("/init_weight_transfer", {"host": host, "port": port, "world_size": world_size,
                                                    "backend": backend, "timeout_s": timeout_s})


def in_background(fn, *args, **kwargs) -> concurrent.futures.Future:
    """fn(*args, **kwargs) on a daemon thread, which never holds up the process's exit (a pool's
    worker would: a run failing here must not wait out the other side's timeout first)."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run():
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the result
            future.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return future


def collapse_pads(ids: list[int], pad_ids: set[int]) -> list[int]:
    """The prompt with each run of a vision pad token cut to one: vLLM expands every <|video_pad|> /
    <|image_pad|> to the media's token count itself (a run would be expanded again)."""
    out = []
    for i, t in enumerate(ids):
        if t in pad_ids and i and ids[i - 1] == t:
            continue
        out.append(t)
    return out


class VLLMBackend:
    """Rollouts through a vLLM server: one /generate call per rank per step for all its requests.

    cfg: the run's Config (rollout.* for sampling; train.seed for the per-request seeds). The media
    of a request travels as a .npy file in `shm_dir` (removed after the call). Weight sync: every
    rank takes part (FSDP2's gathered DTensors need all ranks), the server's owner (this node's
    local rank 0) writes and loads, then all ranks wait for it."""

    name = "vllm"

    def __init__(self, cfg, client: VLLMClient, *, owner: bool, shm_dir: str | None = None, **ids):
        self.cfg, self.client, self.owner = cfg, client, owner
        self.eos_ids: list[int] = []
        if ids:
            self.configure(**ids)
        root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.shm_dir = shm_dir or tempfile.mkdtemp(prefix=f"videor1-vllm-{os.getpid()}-", dir=root)
        self.weights_version: int | None = None
        self.last_sync: dict = {}
        self.transfer: str | None = None  # "shm" | "nccl" | "gloo", resolved at the first sync (owner)
        self.group = None  # the owner's end of the transfer group (nccl / gloo)

    def configure(self, *, eos_ids: list[int], pad_id: int, suppress_ids: list[int], vision_pad_ids: list[int]) -> None:
        """The tokenizer's ids (known once the processor is loaded): stop tokens, the completion pad,
        tokens never sampled (the vision tokens) and the vision pads vLLM expands itself."""
        self.eos_ids, self.pad_id, self.suppress_ids = list(eos_ids), pad_id, list(suppress_ids)
        self.vision_pad_ids = set(vision_pad_ids)

    # -- requests --------------------------------------------------------------------------------

    def sampling(self) -> dict:
        r = self.cfg.rollout
        return {"temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k, "min_p": r.min_p,
                "repetition_penalty": r.repetition_penalty, "max_tokens": r.max_completion_length,
                "stop_token_ids": self.eos_ids, "suppress_token_ids": self.suppress_ids}

    def request_payload(self, request: Request, index: int, seed: int | None, prompt_logprobs: bool = False,
                        completion: list[int] | None = None) -> dict:
        """The JSON of one request; writes its media to shm_dir (video frames permuted as the request's
        vision: the shuffled copy when request.vision is the prompt's shuffled_vision)."""
        p = request.prompt
        if p.media is None:
            raise ValueError(f"problem {p.row.get('problem_id')}: the prompt carries no decoded media (Prompt.media); "
                             "build it with videor1.rollout.build_prompt")
        ids = collapse_pads(p.input_ids.tolist(), self.vision_pad_ids) + list(completion or [])
        path = os.path.join(self.shm_dir, f"media-{os.getpid()}-{index}.npy")
        frames = p.media.frames
        payload = {"prompt_token_ids": ids, "n": request.num, "seed": seed, "prompt_logprobs": prompt_logprobs}
        lo, hi = p.pixel_bounds
        payload["mm_processor_kwargs"] = {"size": {"shortest_edge": int(lo), "longest_edge": int(hi)}}
        if p.is_video:
            if request.vision is p.shuffled_vision and p.shuffled_vision is not None:
                frames = frames[p.shuffle_order]
            payload["video"] = {"path": path, "fps": TEMPORAL_PATCH / float(p.media.second_per_grid_t)}
        else:
            payload["image"] = {"path": path}
        np.save(path, np.ascontiguousarray(frames.numpy()))
        return payload

    @staticmethod
    def _check_prompt(request: Request, out: dict) -> None:
        ours = request.prompt.input_ids.numel()
        if len(out["prompt_token_ids"]) != ours or out["prompt_token_ids"] != request.prompt.input_ids.tolist():
            raise VLLMServerError(
                f"problem {request.prompt.row.get('problem_id')}: vLLM expanded the prompt to "
                f"{len(out['prompt_token_ids'])} tokens, ours has {ours}: its vision patches differ from ours "
                f"(pixel bounds {request.prompt.pixel_bounds}, media {list(request.prompt.media.frames.shape)})")

    def _seed(self, step: int, index: int) -> int:
        # Per request, per step, per rank: a resumed run samples what the uninterrupted one did.
        return (self.cfg.train.seed * 1_000_003 + step * 10_007 + D.rank() * 101 + index) % (2**31 - 1)

    def _to_tensors(self, out: dict, device) -> Sampled:
        comps = out["completions"]
        width = max(1, max(len(c["token_ids"]) for c in comps))
        ids = torch.full((len(comps), width), self.pad_id, dtype=torch.long)
        lps = torch.zeros((len(comps), width), dtype=torch.float32)
        for i, c in enumerate(comps):
            ids[i, :len(c["token_ids"])] = torch.tensor(c["token_ids"], dtype=torch.long)
            lps[i, :len(c["logprobs"])] = torch.tensor(c["logprobs"], dtype=torch.float32)
        if self.suppress_ids and bool(torch.isin(ids, torch.tensor(self.suppress_ids)).any()):
            raise VLLMRequestError("vLLM sampled a vision token although it is suppressed")
        mask = completion_mask(ids, self.eos_ids)
        if not any(len(c["token_ids"]) for c in comps):
            mask.zero_()  # nothing generated: an empty, fully masked completion (as the HF backend)
        ids = ids.masked_fill(mask == 0, self.pad_id)
        return Sampled(ids.to(device), mask.to(device), (lps * mask).to(device))

    def sample(self, engine, requests: list[Request], step: int) -> list[Sampled | None]:
        """Every request of this rank in one call; a request vLLM rejects is sent again once. Returns a
        Sampled per request (on engine.device, with vLLM's log-probs of the sampled tokens), or None
        for one that failed twice (its group is skipped). The weights must be synced first."""
        if not requests:
            return []
        device = engine.device
        sampling = self.sampling()
        results: list[Sampled | None] = [None] * len(requests)
        pending = list(range(len(requests)))
        try:
            for attempt in range(2):
                payloads = [self.request_payload(requests[i], i, self._seed(step, i)) for i in pending]
                try:
                    outs = self.client.generate(payloads, sampling)
                except VLLMRequestError as e:  # the whole call was refused: every pending request failed
                    outs = [{"error": str(e)}] * len(pending)
                failed = []
                for i, out in zip(pending, outs):
                    if out.get("error"):
                        log.warning("vLLM request %d (problem %s) failed%s: %s", i, requests[i].prompt.row.get(
                            "problem_id"), "" if attempt else "; retrying once", out["error"])
                        failed.append(i)
                        continue
                    self._check_prompt(requests[i], out)
                    results[i] = self._to_tensors(out, device)
                pending = failed
                if not pending:
                    break
        finally:
            for f in os.listdir(self.shm_dir):
                if f.startswith(f"media-{os.getpid()}-"):
                    os.remove(os.path.join(self.shm_dir, f))
        return results

    def score(self, request: Request, completion: list[int]) -> torch.Tensor:
        """vLLM's log-probs float64 [len(completion)] of a given completion of request.prompt (its
        prompt log-probs over prompt + completion): the check that the server's weights are ours."""
        payload = self.request_payload(dataclasses.replace(request, num=1), 0, 0, prompt_logprobs=True,
                                       completion=completion)
        try:
            out = self.client.generate([payload], dict(self.sampling(), max_tokens=1))[0]
        finally:
            os.remove(payload["video"]["path"] if "video" in payload else payload["image"]["path"])
        if out.get("error"):
            raise VLLMRequestError(out["error"])
        return torch.tensor(out["prompt_logprobs"][-len(completion):], dtype=torch.float64)

    # -- weights ---------------------------------------------------------------------------------

    def _resolve_transfer(self) -> str:
        """The owner's weight path (rollout.vllm_weight_transfer), chosen at the first sync: "shm", or
        "nccl" / "gloo" with self.group joined by the server's workers. "auto": nccl with CUDA, else shm,
        and shm (logged) when the nccl group cannot be set up; an explicit choice that fails raises."""
        if self.transfer is not None:
            return self.transfer
        want = self.cfg.rollout.vllm_weight_transfer
        mode = ("nccl" if torch.cuda.is_available() else "shm") if want == "auto" else want
        if mode != "shm":
            try:
                self.group = self._open_group(mode)
            except (VLLMServerError, VLLMRequestError, RuntimeError, ValueError, TimeoutError) as e:
                if want != "auto":
                    raise VLLMServerError(f"rollout.vllm_weight_transfer={want}: the transfer group with the vLLM "
                                          f"server could not be set up: {e}") from e
                log.warning("weight transfer over %s could not be set up (%s); using shared memory", mode, e)
                mode = "shm"
        log.info("vLLM weight sync through %s", "a file in " + self.shm_dir if mode == "shm" else mode)
        self.transfer = mode
        return mode

    def _open_group(self, backend: str):
        """Rank 0 of a transfer group whose ranks 1..N are the server's N workers (the server joins it
        while we do: both sides block until every rank is in, then check a probe tensor)."""
        from videor1.rollout.vllm_server.videor1_weight_transfer import WeightGroup, probe

        workers = int(self.client.health().get("workers", 1))
        port, timeout = free_port(), self.cfg.rollout.vllm_request_timeout_s
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")

        def rank0():
            group = WeightGroup("127.0.0.1", port, 0, 1 + workers, backend, timeout, device=device)
            probe(group)
            return group

        ours = in_background(rank0)
        # The server's reply comes once its workers are in and hold the probe; a failure there raises
        # here, and our half then fails on its own timeout, in the background.
        self.client.init_weight_transfer(host="127.0.0.1", port=port, world_size=1 + workers, backend=backend,
                                         timeout_s=timeout)
        return ours.result(timeout=timeout)

    def sync_weights(self, engine, version: int) -> dict:
        """The policy's full weights to the server (collective: every rank calls it). engine: an engine
        of videor1.engine (full_weights() gathers them). Each tensor is gathered (DTensor full_tensor,
        every rank in the same order), cast to model.dtype and, on the node's owner, either broadcast to
        the server's workers at once (nccl / gloo) or kept for one safetensors file in /dev/shm (shm).
        Returns {"seconds", "gather_s", "send_s" (broadcasts, or the file write), "load_s" (the server's
        reply after the last byte), "bytes"}; {} when `version` is already loaded."""
        if version == self.weights_version:
            return {}
        t0 = time.perf_counter()
        mode = self._resolve_transfer() if self.owner else None
        dtype = getattr(torch, self.cfg.model.dtype)
        info = {"gather_s": 0.0, "send_s": 0.0, "load_s": 0.0, "bytes": 0}
        state: dict[str, torch.Tensor] = {}
        with engine.full_weights() as model:
            params = list(getattr(model, "hf", model).named_parameters())
            if mode in ("nccl", "gloo"):
                from videor1.rollout.vllm_server.videor1_weight_transfer import spec

                reply = in_background(self.client.load_weights, version,
                                      specs=[spec(name, dtype, p.shape) for name, p in params])
            for name, p in params:
                t1 = time.perf_counter()
                t = p.detach()
                if hasattr(t, "full_tensor"):  # a DTensor: collective, every rank in the same order
                    t = t.full_tensor()
                t2 = time.perf_counter()
                info["gather_s"] += t2 - t1
                if mode is None:
                    continue
                if mode == "shm":
                    t = state[name] = t.to("cpu", dtype, copy=True).contiguous()  # own storage (FSDP2 views share one)
                else:
                    t = self.group.broadcast(t.to(self.group.device, dtype).contiguous())
                info["bytes"] += t.numel() * t.element_size()
                info["send_s"] += time.perf_counter() - t2
            if mode is not None:
                t3 = time.perf_counter()
                if mode == "shm":
                    reply = self._load_from_file(state, version)
                    info["send_s"] += reply["write_s"]
                    t3 += reply.pop("write_s")
                else:
                    reply = reply.result()
                if reply.get("tensors") != len(params):
                    raise VLLMServerError(f"the vLLM server loaded {reply.get('tensors')} tensors of {len(params)}")
                info["load_s"] = time.perf_counter() - t3
        D.barrier()  # no rank samples before its node's server holds the new weights
        info["seconds"] = time.perf_counter() - t0
        self.weights_version, self.last_sync = version, info
        return info

    def _load_from_file(self, state: dict[str, torch.Tensor], version: int) -> dict:
        """shm: write `state` as one safetensors file (atomic rename: the server never reads a half-written
        file), have the server load it, remove it. Returns the server's reply plus "write_s"."""
        from safetensors.torch import save_file

        path = os.path.join(self.shm_dir, "weights.safetensors")
        t0 = time.perf_counter()
        save_file(state, path + ".tmp")
        os.replace(path + ".tmp", path)
        write_s = time.perf_counter() - t0
        reply = self.client.load_weights(version, path=path)
        os.remove(path)
        return {**reply, "write_s": write_s}

    def wait_ready(self) -> dict:
        """Block until the server answers /health (rollout.vllm_start_timeout_s); logs what it serves."""
        t0 = time.perf_counter()
        info = self.client.wait_ready(self.cfg.rollout.vllm_start_timeout_s)
        log.info("vLLM %s serving %s at %s (ready after %.1f s more)", info.get("vllm"), info.get("model"),
                 self.client.url, time.perf_counter() - t0)
        return info

    def close(self) -> None:
        """Stop the server this run started (if any) and remove the shared-memory files."""
        if self.group is not None:
            self.group.close()
            self.group = None
        if self.client.server is not None:
            self.client.server.stop()
        shutil.rmtree(self.shm_dir, ignore_errors=True)


def start_backend(cfg, *, log_dir: str) -> VLLMBackend:
    """The run's vLLM backend (collective: every rank calls it). With rollout.vllm_url it connects to
    the server the user started; otherwise this node's local rank 0 starts one (its log:
    <log_dir>/vllm_server.log) and every rank of the node learns its address. Returns at once: call
    backend.configure(...) and backend.wait_ready() before the first rollout (the server loads while
    our models build)."""
    r = cfg.rollout
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    owner = local_rank == 0
    server = None
    if r.vllm_url:
        url = r.vllm_url
    else:
        if owner:
            server = VLLMServer.start(
                model=cfg.model.path, log_path=os.path.join(log_dir, f"vllm_server_rank{D.rank()}.log"),
                python=r.vllm_python, port=r.vllm_port, dtype=cfg.model.dtype, max_model_len=r.vllm_max_model_len,
                enforce_eager=r.vllm_enforce_eager, kv_cache_gib=r.vllm_kv_cache_gib,
                tensor_parallel_size=r.vllm_tensor_parallel_size,
                gpu_memory_utilization=r.vllm_gpu_memory_utilization, seed=cfg.train.seed)
        urls = D.all_gather_objects(server.url if server else None)
        url = urls[D.rank() - local_rank]  # torchrun numbers a node's ranks contiguously
    client = VLLMClient(url, timeout_s=r.vllm_request_timeout_s, server=server)
    return VLLMBackend(cfg, client, owner=owner)
