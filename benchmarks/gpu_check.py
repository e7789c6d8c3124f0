"""`make gpu-check`: everything we measure on a borrowed one-GPU machine, in at most 10 minutes.

The GPU machines we can borrow reach no package registry and bring their own stack (as last read:
Python 3.12, torch 2.11 + CUDA 13, triton 3.6, transformers 5.17, nvcc 13.0; no DeepSpeed, Liger,
decord, PyAV, rouge_score), and at most 64 MiB travel with the working tree. So this script runs on
the python it is given, never creates a venv, never downloads, and:

  setup   states the versions it runs on; installs the wheels that `make gpu-wheels` brought
          (.whl/xz/*.whl.xz, or .whl/*.whl) offline into .whl/site, first on PYTHONPATH for every
          step; without them it runs on the machine's packages and says which steps that skips
  build   python setup.py build_ext --inplace for the one architecture present (VIDEOR1_CUDA_ARCHS
          from the device capability, MAX_JOBS = nproc, VIDEOR1_FORCE_CUDA_BUILD=1), timed;
          reports videor1._C.cuda_built()
  tests   the CUDA-only tests: frame-to-patch CUDA == C++ (tests/test_frame_to_patch.py's CUDA
          tests + tests/test_gpu_frame_to_patch.py), the Triton GRPO kernels at Qwen2.5-VL-7B's head
          against the fp64 reference (tests/test_gpu_kernels_7b.py), the shared-prefix forward against
          the repeated one (tests/test_gpu_shared_prefix.py); pass / fail / skip counts
  runs    3-step T-GRPO and SFT runs of the tiny model under torchrun --nproc_per_node=1, FSDP2 and
          DeepSpeed ZeRO-3, and a 16-row evaluation: metrics.jsonl has steps 1..3, all finite
  bench   benchmarks/bench_grpo_loss.py at the 7B head (N = 8192, bf16; ours, torch eager, Liger;
          fwd and fwd+bwd; time and peak memory) and benchmarks/bench_frame_to_patch.py on CUDA
          against the device-to-device copy of the same bytes, both time-boxed

Every step runs in a subprocess with its own timeout; the groups finish by cumulative milestones
(setup 30 s, build 210 s, tests 320 s, runs 480 s, bench 570 s), so a slow group never eats a later
one's time and time saved early flows on. A step past its time is FAIL (timeout); a step with no
time left is SKIP (deadline); a failing step is FAIL with its last lines and the script goes on.
It writes benchmarks/results/gpu_check_<gpu>.json (rewritten after every step) and the benchmarks'
CSVs beside it, keeps each step's full log under runs/gpu_check/<gpu>/logs, and prints a one-page
summary. Exit code 1 when a step failed, 2 when there is no GPU (nothing is run), else 0.

    python benchmarks/gpu_check.py                 # on the GPU machine (make gpu-check PYTHON=python3)
    python benchmarks/gpu_check.py --dry           # anywhere: every GPU step SKIP, output in runs/gpu_check_dry
    python benchmarks/gpu_check.py --fetch-wheels  # here, where PyPI is reachable (make gpu-wheels)

Only the standard library is imported here: torch & co. are probed in subprocesses, so the report
names the versions the steps really ran on (the machine's, or the brought wheels').
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import lzma
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DRY_OUT = os.path.join(ROOT, "runs", "gpu_check_dry")
WHEELS_DIR = os.path.join(ROOT, ".whl")
WHEEL_BUDGET_MIB = 55.0  # what is carried (.whl/xz) must leave room for the working tree in 64 MiB

# ---- the wheels brought to the GPU machine --------------------------------------------------------------
#
# role "pin": always installed (replaces the machine's version: requirements.txt's pin is what we test);
# role "add": installed only where the machine lacks the distribution, or has one older than `need`.
# prio: what is dropped first when the carried set exceeds the budget (the highest number first).
# build: "sdist" = no wheel on PyPI: built here with `pip wheel --no-build-isolation` (pure Python).
# extra: brought only when asked for (`--extra NAME`), see the notes.


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    role: str
    prio: int
    why: str
    need: str = ""  # minimum version the brought stack needs (role "add"): ">=X"
    build: str = "binary"
    extra: bool = False


WHEELS = [
    Wheel("transformers", "5.24.0", "pin", 1, "requirements.txt pin (the machine has 5.17)"),
    Wheel("tokenizers", "0.23.3", "pin", 1, "requirements.txt pin (transformers 5.24: >=0.23.1,<0.24)"),
    Wheel("safetensors", "0.8.0", "pin", 1, "requirements.txt pin (transformers 5.24: >=0.8.0)"),
    Wheel("huggingface_hub", "2.4.0", "pin", 1, "requirements.txt pin (transformers 5.24: >=1.31,<3)"),
    Wheel("httpx2", "2.16.2", "add", 1, "huggingface_hub 2.4 (its HTTP client)", ">=2.0"),
    Wheel("httpcore2", "2.16.2", "add", 1, "httpx2 2.16.2 (==2.16.2)", ">=2.16.2"),
    Wheel("h11", "0.16.0", "add", 1, "httpcore2", ">=0.16"),
    Wheel("anyio", "4.16.0", "add", 1, "httpx2", ">=4.10"),
    Wheel("idna", "3.20", "add", 1, "httpx2", ">=3.18"),
    Wheel("truststore", "0.10.5", "add", 1, "httpx2, httpcore2", ">=0.10"),
    Wheel("typing_extensions", "4.16.0", "add", 1, "httpx2, pydantic", ">=4.5"),
    Wheel("click", "8.5.1", "add", 1, "huggingface_hub 2.4", ">=8.4.2"),
    Wheel("regex", "2026.11.19", "add", 1, "transformers 5.24", ">=2025.10.22"),
    Wheel("ninja", "1.13.2", "add", 1, "the extension build (without ninja torch compiles serially)"),
    Wheel("setuptools", "84.2.1", "add", 1, "the extension build (python setup.py build_ext)"),
    Wheel("av", "18.1.0", "add", 2, "PyAV: synthetic mp4s for the runs, and decoding them"),
    Wheel("pytest", "9.2.0", "add", 2, "the CUDA tests"),
    Wheel("pluggy", "1.7.0", "add", 2, "pytest", ">=1.6"),
    Wheel("iniconfig", "2.3.1", "add", 2, "pytest", ">=2"),
    Wheel("packaging", "26.4", "add", 2, "pytest, transformers", ">=24"),
    Wheel("pygments", "2.21.0", "add", 2, "pytest", ">=2.15"),
    Wheel("liger_kernel", "0.8.5", "add", 3, "the Liger baselines of bench_grpo_loss.py"),
    Wheel("deepspeed", "0.19.8", "add", 4, "the ZeRO-3 runs (sdist only: built here, DS_BUILD_OPS=0, ops JIT)",
          build="sdist"),
    Wheel("accelerate", "1.15.0", "add", 4, "transformers' HfDeepSpeedConfig (ZeRO-3 partitioned loading)"),
    Wheel("hjson", "3.1.0", "add", 4, "deepspeed"),
    Wheel("msgpack", "1.2.4", "add", 4, "deepspeed"),
    Wheel("py_cpuinfo", "9.0.0", "add", 4, "deepspeed"),
    Wheel("einops", "0.8.2", "add", 4, "deepspeed"),
    Wheel("psutil", "7.2.2", "add", 4, "deepspeed, accelerate"),
    Wheel("pydantic", "2.14.4", "add", 4, "deepspeed", ">=2.0"),
    Wheel("pydantic_core", "2.50.5", "add", 4, "pydantic 2.14.4 (==2.50.5)", ">=2.50.5"),
    Wheel("annotated_types", "0.8.0", "add", 4, "pydantic"),
    Wheel("typing_inspection", "0.4.5", "add", 4, "pydantic"),
    Wheel("rouge_score", "0.1.2", "add", 5, "free-form rewards (sdist only: built here); unused by the synthetic "
          "tasks", build="sdist"),
    Wheel("nltk", "3.10.4", "add", 5, "rouge_score"),
    Wheel("absl_py", "2.5.1", "add", 5, "rouge_score"),
    Wheel("joblib", "1.6.0", "add", 5, "nltk"),
    Wheel("six", "1.17.0", "add", 5, "rouge_score"),
    Wheel("decord", "0.6.0", "add", 6, "the default video decoder (py3-none-manylinux2010 wheel, 13.6 MB; PyAV "
          "decodes the same files)", extra=True),
]
# Not brought, and why (reported by --fetch-wheels):
NOT_BROUGHT = {
    "hf_xet": "huggingface_hub's Xet download backend (4.3 MB): nothing is downloaded on the GPU machine",
    "typer": "transformers' command-line interface only (with rich, shellingham, markdown-it: ~0.6 MB)",
    "torch / triton / numpy / torchvision": "the machine's own (a CUDA build matching its driver; too large)",
    "flash-attn": "optional (SDPA otherwise); a CUDA build per torch version, far over the budget",
    "trl": "bench_grpo_loss's trl-chunked baseline: TRL's fused LM head's backward imports trl.trainer.utils, which "
           "needs pandas, datasets and pyarrow (~55 MB of cp312 wheels), over the budget; the row is skipped, "
           "with its reason, unless the machine has them",
}
PACKAGE_MODULES = {  # distribution -> module, for the availability report
    "transformers": "transformers", "tokenizers": "tokenizers", "safetensors": "safetensors",
    "huggingface_hub": "huggingface_hub", "accelerate": "accelerate", "deepspeed": "deepspeed",
    "liger_kernel": "liger_kernel", "av": "av", "decord": "decord", "rouge_score": "rouge_score",
    "pytest": "pytest", "torchvision": "torchvision", "numpy": "numpy", "triton": "triton", "ninja": "ninja",
    "setuptools": "setuptools", "matplotlib": "matplotlib", "torchcodec": "torchcodec", "yaml": "yaml",
}


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_name_version(filename: str) -> tuple[str, str]:
    base = os.path.basename(filename)
    for suffix in (".xz", ".whl"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    parts = base.split("-")
    return canon(parts[0]), parts[1] if len(parts) > 1 else ""


def version_tuple(v: str) -> tuple:
    out = []
    for part in re.split(r"[.+-]", v):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
    return tuple(out)


def satisfies(version: str, need: str) -> bool:
    """`need` is empty or ">=X" (all our constraints are minimums)."""
    if not need:
        return True
    assert need.startswith(">="), need
    return version_tuple(version) >= version_tuple(need[2:])


# ---- running things -----------------------------------------------------------------------------------------

def run_logged(cmd: list[str], env: dict, timeout: float, log_path: str, cwd: str = ROOT) -> tuple[int | None, float]:
    """Run cmd with stdout+stderr appended to log_path; (exit code or None on timeout, seconds).

    The child gets its own process group, so a timeout stops it and everything it started (torchrun's
    workers, ninja's compilers) -- and nothing else.
    """
    t0 = time.monotonic()
    with open(log_path, "a", encoding="utf-8", errors="replace") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            log.write(f"\n[gpu_check] timed out after {timeout:.0f} s: stopped\n")
            rc = None
    return rc, time.monotonic() - t0


def tail(path: str, n: int = 15) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line.rstrip("\n") for line in f]
    except OSError:
        return []
    lines = [line for line in lines if line.strip()]
    return [line[:300] for line in lines[-n:]]


PROBE = r"""
import importlib.metadata as md, importlib.util, json, os, platform, re, shutil, subprocess, sys
dists, modules, site = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
out = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform()}

def under_site(path):
    p, s = os.path.abspath(str(path)), os.path.abspath(site) if site else ""
    return bool(site) and (p == s or p.startswith(s + os.sep))

pk = {}
for d in dists:
    try:
        dist = md.distribution(d)
        pk[d] = {"version": dist.version, "from_wheels": under_site(dist.locate_file(""))}
    except Exception:
        pk[d] = None
out["packages"] = pk
out["importable"] = {m: importlib.util.find_spec(m) is not None for m in modules}
try:
    import torch
    out["torch"], out["torch_cuda"] = torch.__version__, torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if out["cuda_available"]:
        out["gpu"] = torch.cuda.get_device_name(0)
        cap = torch.cuda.get_device_capability(0)
        out["capability"] = f"{cap[0]}{cap[1]}"
        out["gpu_count"] = torch.cuda.device_count()
        out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
except Exception as e:
    out["torch_error"] = f"{type(e).__name__}: {e}"
    out["cuda_available"] = False
try:
    import triton
    out["triton"] = triton.__version__
except Exception as e:
    out["triton"] = None

def first_line(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (r.stdout or r.stderr).strip()
    except Exception:
        return None

smi = shutil.which("nvidia-smi")
if smi:
    s = first_line([smi, "--query-gpu=driver_version", "--format=csv,noheader"])
    out["driver"] = s.splitlines()[0].strip() if s else None
home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
nvcc = os.path.join(home, "bin", "nvcc")
nvcc = nvcc if os.path.exists(nvcc) else shutil.which("nvcc")
if nvcc:
    s = first_line([nvcc, "--version"]) or ""
    m = re.search(r"release ([\d.]+), V([\d.]+)", s)
    out["nvcc"] = f"{m.group(2)} ({nvcc})" if m else s[-80:]
for tool, key in (("c++", "cxx"), ("ninja", "ninja_bin")):
    exe = shutil.which(tool)
    if exe:
        s = first_line([exe, "--version"])
        out[key] = f"{s.splitlines()[0] if s else '?'} ({exe})"
out["nproc"] = os.cpu_count()
print("PROBE_JSON " + json.dumps(out))
"""


# ---- the steps -----------------------------------------------------------------------------------------------

REHEARSE_SLOWDOWN = 6  # --rehearse: the 2-core CPU machines run the tiny model's steps this much slower
GROUP_BUDGET_S = {"setup": 30, "build": 180, "tests": 110, "runs": 140, "bench": 110}  # sum 570


@dataclass
class Step:
    name: str
    group: str
    title: str
    timeout: float
    cuda: bool = True  # skipped in --dry
    needs_pkgs: tuple = ()  # distributions (any of each tuple item "a|b" is enough)
    after: tuple = ()  # steps that must have passed
    min_s: float = 10.0  # less time than this left: SKIP (deadline)
    result: dict = field(default_factory=dict)


def make_steps() -> list[Step]:
    return [
        Step("versions", "setup", "versions of the stack", 30, cuda=False, min_s=1),
        Step("wheels", "setup", "brought wheels -> .whl/site", 60, cuda=False, min_s=1),
        Step("build", "build", "build videor1._C for this GPU", 180, needs_pkgs=("setuptools",), min_s=30),
        Step("tests_frame_to_patch", "tests", "CUDA frame-to-patch == C++", 50, needs_pkgs=("pytest", "torchvision"),
             after=("build",)),
        Step("tests_kernels_7b", "tests", "Triton GRPO kernels vs fp64 at 7B head", 90, needs_pkgs=("pytest",)),
        Step("tests_shared_prefix", "tests", "shared-prefix forward == repeated, on CUDA", 40, needs_pkgs=("pytest", "av")),
        Step("data", "runs", "tiny checkpoint + synthetic videos", 45, needs_pkgs=("av",)),
        Step("tgrpo_fsdp2", "runs", "T-GRPO 3 steps, FSDP2", 60, after=("build", "data")),
        Step("sft_fsdp2", "runs", "SFT 3 steps, FSDP2", 45, after=("build", "data")),
        Step("eval", "runs", "evaluation, 16 rows", 40, needs_pkgs=("av|decord",), after=("build", "data")),
        Step("tgrpo_zero3", "runs", "T-GRPO 3 steps, ZeRO-3", 60, needs_pkgs=("deepspeed", "accelerate"),
             after=("build", "data")),
        Step("sft_zero3", "runs", "SFT 3 steps, ZeRO-3", 45, needs_pkgs=("deepspeed", "accelerate"),
             after=("build", "data")),
        Step("bench_grpo_loss", "bench", "GRPO loss at the 7B head", 75, min_s=30),
        Step("sweep_row_kernel", "bench", "row kernel BLOCK_V x num_warps sweep", 35, min_s=15),
        Step("bench_frame_to_patch", "bench", "frame-to-patch vs copy bound", 35, after=("build",), min_s=15),
        Step("bench_shared_prefix", "bench", "shared-prefix vs repeated forward", 30, needs_pkgs=("tokenizers",), min_s=15),
    ]


class Check:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry
        self.t0 = time.monotonic()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if args.rehearse:
            args.dry = self.dry = True
            args.deadline *= REHEARSE_SLOWDOWN
        scale = args.deadline / sum(GROUP_BUDGET_S.values())
        self.deadline = self.t0 + args.deadline
        acc, self.milestone = 0.0, {}
        for group, budget in GROUP_BUDGET_S.items():
            acc += budget * scale
            self.milestone[group] = self.t0 + acc
        self.steps = make_steps()
        if args.rehearse:  # the run steps on the CPU: slower, and videor1._C is the one built here
            for st in self.steps:
                st.timeout *= REHEARSE_SLOWDOWN
                if st.group == "runs":
                    st.cuda, st.after = False, tuple(a for a in st.after if a != "build")
        self.by_name = {s.name: s for s in self.steps}
        self.py = sys.executable
        self.machine: dict = {}
        self.effective: dict = {}
        self.site: str | None = None
        self.slug = "dry"
        self.out = self.logs = self.work = self.json_path = ""
        self.wheel_plan: list[dict] = []
        self.env = self._base_env()

    # -- environment ------------------------------------------------------------------------------------------
    def _base_env(self, site: str | None = None) -> dict:
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)  # the real Triton compiler on the GPU
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        paths = ([site] if site else []) + [ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        if site and os.path.isdir(os.path.join(site, "bin")):
            env["PATH"] = os.path.join(site, "bin") + os.pathsep + env.get("PATH", "")
        return env

    def probe(self, env: dict, log_name: str, extra=()) -> dict:
        dists = sorted({w.name for w in WHEELS} | {"torch", "torchvision", "triton", "numpy", "matplotlib", "torchcodec"}
                       | set(extra))
        cmd = [self.py, "-c", PROBE, json.dumps(dists), json.dumps(sorted(PACKAGE_MODULES.values())), self.site or ""]
        log = os.path.join(self.logs, log_name)
        rc, _ = run_logged(cmd, env, 60, log)
        with open(log, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("PROBE_JSON "):
                    return json.loads(line[len("PROBE_JSON "):])
        return {"probe_error": f"exit {rc}: " + " | ".join(tail(log, 5))}

    def has(self, dist: str) -> bool:
        info = self.effective or self.machine
        return any((info.get("packages") or {}).get(canon(d)) or (info.get("importable") or {}).get(PACKAGE_MODULES.get(
            canon(d), d)) for d in dist.split("|"))

    # -- time -------------------------------------------------------------------------------------------------
    def time_left(self, step: Step) -> float:
        now = time.monotonic()
        return min(step.timeout, self.milestone[step.group] - now, self.deadline - now)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    # -- output -----------------------------------------------------------------------------------------------
    def setup_dirs(self):
        if self.dry:
            self.out = os.path.abspath(self.args.out or DRY_OUT)
            base = self.out
        else:
            self.out = os.path.abspath(self.args.out or RESULTS)
            base = os.path.join(ROOT, "runs", "gpu_check", self.slug)
        self.logs, self.work = os.path.join(base, "logs"), os.path.join(base, "work")
        for d in (self.out, self.logs, self.work):
            os.makedirs(d, exist_ok=True)
        for name in os.listdir(self.logs):  # this run's logs only
            os.remove(os.path.join(self.logs, name))
        self.json_path = os.path.join(self.out, f"gpu_check_{self.slug}.json")

    def report(self) -> dict:
        v = self.effective or self.machine
        pk = v.get("packages") or {}

        def ver(d):
            return (pk.get(d) or {}).get("version")

        missing = {}
        for s in self.steps:
            for d in s.needs_pkgs:
                if not self.has(d):
                    missing.setdefault(d.replace("|", " or "), []).append(s.name)
        return {
            "gpu_check": "videor1 benchmarks/gpu_check.py",
            "dry": self.dry,
            "rehearsal": bool(self.args.rehearse),
            "started": self.started,
            "elapsed_s": round(self.elapsed(), 1),
            "deadline_s": self.args.deadline,
            "device": v.get("gpu") or ("none (dry run on the CPU)" if self.dry else None),
            "versions": {
                "python": v.get("python"), "python_executable": v.get("executable"), "torch": v.get("torch"),
                "cuda": v.get("torch_cuda"), "triton": v.get("triton"), "transformers": ver("transformers"),
                "gpu": v.get("gpu"), "capability": v.get("capability"), "gpu_memory_gib": v.get("gpu_memory_gib"),
                "driver": v.get("driver"), "nvcc": v.get("nvcc"), "cxx": v.get("cxx"), "nproc": v.get("nproc"),
                "platform": v.get("platform"),
            },
            "machine_packages": self.machine.get("packages"),
            "packages": pk,
            "wheels": self.wheel_plan,
            "missing_packages": missing,
            "steps": [dict(name=s.name, group=s.group, title=s.title, timeout_s=s.timeout, cuda=s.cuda, **s.result)
                      for s in self.steps],
            "outputs": {"json": self.json_path, "logs": self.logs, "work": self.work},
        }

    def write_json(self):
        if not self.json_path:
            return
        tmp = self.json_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.report(), f, indent=1, default=str)
        os.replace(tmp, self.json_path)
        if self.args.copy_to:
            dst = os.path.abspath(self.args.copy_to)
            os.makedirs(dst, exist_ok=True)
            shutil.copy2(self.json_path, dst)
            if os.path.isdir(self.logs):
                shutil.copytree(self.logs, os.path.join(dst, "gpu_check_logs"), dirs_exist_ok=True)
            for name in os.listdir(self.out) if self.out != dst else []:
                p = os.path.join(self.out, name)
                if os.path.isfile(p) and (self.slug in name or name.startswith(("grpo_loss_cuda", "frame_to_patch_cuda",
                                                                                         "row_kernel_sweep_cuda"))):
                    shutil.copy2(p, dst)
            for run in os.listdir(self.work) if os.path.isdir(self.work) else []:  # the runs' own records (small)
                for name in ("metrics.jsonl",) if os.path.isdir(os.path.join(self.work, run)) else ():
                    p = os.path.join(self.work, run, name)
                    if os.path.isfile(p):
                        os.makedirs(os.path.join(dst, "gpu_check_runs", run), exist_ok=True)
                        shutil.copy2(p, os.path.join(dst, "gpu_check_runs", run, name))
            if os.path.isfile(os.path.join(self.work, "eval.jsonl")):
                shutil.copy2(os.path.join(self.work, "eval.jsonl"), os.path.join(dst, "gpu_check_eval.jsonl"))

    # -- running the steps ------------------------------------------------------------------------------------
    def run_step(self, step: Step):
        fn = getattr(self, "step_" + step.name)
        t0 = time.monotonic()
        left = self.time_left(step)
        blocked = [a for a in step.after if self.by_name[a].result.get("status") != "PASS"
                   and not self.by_name[a].result.get("reason", "").startswith("not selected")]
        missing = [d.replace("|", " or ") for d in step.needs_pkgs if not self.has(d)]
        try:
            command = fn(None)  # the command line it runs (recorded, also when skipped)
        except Exception:
            command = None
        if self.dry and step.cuda:
            res = dict(status="SKIP", reason="dry run (--dry): GPU step not run" +
                       (f"; on a GPU it would skip: missing {', '.join(missing)}" if missing else ""))
        elif missing:
            res = dict(status="SKIP", reason=f"missing package: {', '.join(missing)} (not on this machine; "
                                             "`make gpu-wheels` brings it)")
        elif blocked:
            res = dict(status="SKIP", reason="needs " + ", ".join(
                f"{a} ({self.by_name[a].result.get('status')})" for a in blocked))
        elif left < step.min_s:
            res = dict(status="SKIP", reason=f"deadline: {max(0, left):.0f} s left for this step "
                                             f"(needs >= {step.min_s:.0f} s)")
        else:
            self.log_path = os.path.join(self.logs, f"{step.name}.log")
            self.step_deadline = time.monotonic() + left
            print(f"[gpu_check {self.elapsed():5.0f} s] {step.name}: {step.title} (<= {left:.0f} s) ...", flush=True)
            try:
                res = fn(step)
            except Exception as e:  # a bug in a step must not stop the others
                res = dict(status="FAIL", reason=f"{type(e).__name__}: {e}")
            res.setdefault("log", self.log_path)
            if res["status"] == "FAIL":
                res.setdefault("tail", tail(self.log_path))
        res["seconds"] = round(time.monotonic() - t0, 1)
        if command is not None:
            res.setdefault("command", command)
        step.result = res
        print(f"[gpu_check {self.elapsed():5.0f} s] {step.name}: {res['status']}"
              + (f" ({res['reason']})" if res.get("reason") else ""), flush=True)
        if res["status"] == "FAIL" and res.get("tail"):
            for line in res["tail"][-8:]:
                print("    | " + line, flush=True)
        self.write_json()

    def remaining(self) -> float:
        return max(1.0, self.step_deadline - time.monotonic())

    def run(self, cmd, env=None, timeout=None):
        """One command of the current step, logged; (exit code or None on timeout, seconds)."""
        return run_logged(cmd, env or self.env, min(timeout or 1e9, self.remaining()), self.log_path)

    # -- step: versions ---------------------------------------------------------------------------------------
    def step_versions(self, step):
        if step is None:
            return None
        v = self.machine
        res = {"status": "PASS" if "probe_error" not in v else "FAIL", "reason": v.get("probe_error", "")}
        res["key"] = {k: v.get(k) for k in ("python", "torch", "torch_cuda", "triton", "gpu", "driver", "nvcc", "nproc")}
        res["key"]["transformers"] = ((v.get("packages") or {}).get("transformers") or {}).get("version")
        return res

    # -- step: wheels -----------------------------------------------------------------------------------------
    def find_wheels(self) -> list[str]:
        d = os.path.abspath(self.args.wheels)
        xz = sorted(os.path.join(d, "xz", f) for f in os.listdir(os.path.join(d, "xz"))
                    if f.endswith(".whl.xz")) if os.path.isdir(os.path.join(d, "xz")) else []
        if xz:
            return xz
        return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".whl")) if os.path.isdir(d) else []

    def plan_wheels(self, files: list[str]) -> list[dict]:
        known = {w.name: w for w in WHEELS}
        machine = self.machine.get("packages") or {}
        pyver = self.machine.get("python") or "%d.%d" % sys.version_info[:2]
        plan = []
        for path in files:
            name, version = wheel_name_version(path)
            w = known.get(name)
            have = (machine.get(name) or {}).get("version")
            fits, tag = wheel_fits(path, pyver)
            if not fits:
                install, why = False, f"not for python {pyver} ({tag})" + (f"; machine's {have} kept" if have else "")
            elif w is not None and w.role == "pin":
                install, why = True, f"pinned {version}" + (f" (machine has {have})" if have else " (machine has none)")
            elif have is None:
                install, why = True, "machine has none"
            elif w is not None and not satisfies(have, w.need):
                install, why = True, f"machine has {have}, needs {w.need}"
            else:
                install, why = False, f"machine's {have} kept"
            plan.append(dict(file=os.path.basename(path), path=path, name=name, version=version, install=install,
                             why=why, mib=round(os.path.getsize(path) / 2**20, 2)))
        return plan

    def step_wheels(self, step):
        if step is None:
            return None
        files = self.find_wheels()
        if not files:
            self.wheel_plan = []
            return dict(status="SKIP", reason=f"no wheels in {os.path.relpath(os.path.abspath(self.args.wheels), ROOT)}"
                                              ": running on the machine's packages (make gpu-wheels brings them)")
        plan = self.plan_wheels(files)
        self.wheel_plan = [{k: v for k, v in p.items() if k != "path"} for p in plan]
        base = self.out if self.dry else os.path.abspath(self.args.wheels)
        site, stored = os.path.join(base, "site"), os.path.join(base, "stored")
        for d in (site, stored):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        chosen = [p for p in plan if p["install"]]

        def unpack(p):
            if not p["path"].endswith(".xz"):
                return p["path"]
            dst = os.path.join(stored, p["file"][:-3])
            with lzma.open(p["path"]) as src, open(dst, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            return dst

        with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            paths = list(pool.map(unpack, chosen))
        method = "pip"
        if paths:
            cmd = [self.py, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--target", site,
                   "--disable-pip-version-check", "--no-warn-script-location", "--no-warn-conflicts", *paths]
            rc, _ = self.run(cmd, env=self._base_env())
            if rc != 0:  # no pip, or pip refused: a wheel is a zip; unpack it the way pip would
                method = "unzip (pip failed: see the log)"
                shutil.rmtree(site, ignore_errors=True)
                os.makedirs(site)
                for p in paths:
                    unzip_wheel(p, site)
        self.site = site
        self.env = self._base_env(site)
        self.effective = self.probe(self.env, "probe_effective.log", extra=[p["name"] for p in plan])
        bad = [p["name"] for p in chosen if not ((self.effective.get("packages") or {}).get(p["name"]) or {}).get(
            "from_wheels")]
        res = dict(status="FAIL" if bad else "PASS",
                   reason=(f"installed but not picked up: {', '.join(bad)}" if bad else ""),
                   key=dict(found=len(plan), installed=len(chosen), kept_machine=len(plan) - len(chosen),
                            method=method, site=site,
                            carried_mib=round(sum(p["mib"] for p in plan), 1)))
        return res

    # -- step: build ------------------------------------------------------------------------------------------
    def step_build(self, step):
        arch = self.machine.get("capability") or "90"
        jobs = str(os.cpu_count() or 1)
        cmd = [self.py, "setup.py", "build_ext", "--inplace"]
        if step is None:
            return f"VIDEOR1_CUDA_ARCHS={arch} MAX_JOBS={jobs} VIDEOR1_FORCE_CUDA_BUILD=1 {shlex.join(cmd)}"
        env = dict(self.env, VIDEOR1_CUDA_ARCHS=arch, MAX_JOBS=jobs, VIDEOR1_FORCE_CUDA_BUILD="1")
        rc, secs = self.run(cmd, env=env)
        key = dict(archs=arch, jobs=int(jobs), build_s=round(secs, 1))
        if rc != 0:
            return dict(status="FAIL", reason="timeout" if rc is None else f"build exit {rc}", key=key)
        probe = "import json, torch, videor1._C as C; print('C_JSON', json.dumps({'cuda_built': bool(C.cuda_built()), 'file': C.__file__}))"
        rc, _ = self.run([self.py, "-c", probe], timeout=60)
        info = next((json.loads(line.split(" ", 1)[1]) for line in tail(self.log_path, 50) if line.startswith("C_JSON ")), {})
        key.update(info)
        if not info.get("cuda_built"):
            return dict(status="FAIL", reason="videor1._C imported but cuda_built() is False" if info else
                        "videor1._C does not import", key=key)
        return dict(status="PASS", reason="", key=key)

    # -- steps: tests -----------------------------------------------------------------------------------------
    def pytest_step(self, step, selection: list[str]):
        xml = os.path.join(self.logs, f"{step.name if step else 'x'}.junit.xml")
        cmd = [self.py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}", *selection]
        if step is None:
            return shlex.join(cmd)
        rc, secs = self.run(cmd)
        counts = junit_counts(xml)
        key = dict(counts, pytest_s=round(secs, 1))
        if rc is None:
            return dict(status="FAIL", reason="timeout", key=key)
        if counts.get("failed", 0) or counts.get("errors", 0) or rc not in (0,):
            names = ", ".join(counts.get("failing", [])[:6])
            return dict(status="FAIL", reason=f"pytest exit {rc}: {counts.get('failed', 0)} failed, "
                                              f"{counts.get('errors', 0)} errors {names}".strip(), key=key)
        if not counts.get("passed"):
            return dict(status="FAIL", reason="no test ran (all skipped): " + "; ".join(counts.get("skip_reasons", [])[:2]),
                        key=key)
        return dict(status="PASS", reason=f"{counts['passed']} passed, {counts.get('skipped', 0)} skipped", key=key)

    def step_tests_frame_to_patch(self, step):
        return self.pytest_step(step, ["tests/test_frame_to_patch.py::test_cuda_equals_cpu",
                                       "tests/test_frame_to_patch.py::test_cuda_from_pinned_host_frames",
                                       "tests/test_gpu_frame_to_patch.py"])

    def step_tests_kernels_7b(self, step):
        return self.pytest_step(step, ["tests/test_gpu_kernels_7b.py"])

    def step_tests_shared_prefix(self, step):
        return self.pytest_step(step, ["tests/test_gpu_shared_prefix.py"])

    # -- steps: runs ------------------------------------------------------------------------------------------
    def w(self, *parts) -> str:
        return os.path.join(self.work, *parts)

    def step_data(self, step):
        cmds = [[self.py, "-m", "videor1.tiny", "--out", self.w("tiny")],
                [self.py, "-m", "videor1.synthetic", "--out", self.w("data"), "--n", "32", "--seed", "0", "--frames", "8"],
                [self.py, "-m", "videor1.synthetic", "--out", self.w("data"), "--n", "16", "--seed", "0", "--frames", "8",
                 "--split", "heldout"]]
        if step is None:
            return " && ".join(shlex.join(c) for c in cmds)
        for d in ("tiny", "data"):
            shutil.rmtree(self.w(d), ignore_errors=True)
        for c in cmds:
            rc, _ = self.run(c)
            if rc != 0:
                return dict(status="FAIL", reason="timeout" if rc is None else f"exit {rc}: {shlex.join(c[1:4])}")
        rows = {s: len(json.load(open(self.w("data", f"{s}.json")))) for s in ("train", "heldout")}
        return dict(status="PASS", reason="", key=dict(rows=rows, checkpoint=self.w("tiny")))

    def train_cmd(self, kind: str, engine: str, out: str) -> list[str]:
        cmd = [self.py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        if kind == "tgrpo":
            cmd += ["videor1/train.py", "--config", "configs/tiny_cpu.yaml", "--rollout.num_generations", "4",
                    "--rollout.max_completion_length", "16"]
        else:
            cmd += ["videor1/sft.py", "--config", "configs/tiny_sft_cpu.yaml"]
        cmd += ["--model.path", self.w("tiny"), "--data.train_file", self.w("data", "train.json"),
                "--train.max_steps", "3", "--train.save_steps", "0", "--train.output_dir", out,
                "--train.mixed_precision", "bf16",  # the 7B configs' precision
                "--train.engine", engine]
        if engine == "deepspeed":
            cmd += ["--train.deepspeed_config", "configs/zero3.json"]
        return cmd

    def run_step_train(self, step, kind, engine):
        out = self.w(f"{kind}_{'fsdp2' if engine == 'fsdp2' else 'zero3'}")
        cmd = self.train_cmd(kind, engine, out)
        if step is None:
            return shlex.join(cmd)
        shutil.rmtree(out, ignore_errors=True)
        env = dict(self.env, TORCH_EXTENSIONS_DIR=self.w("torch_extensions"))
        rc, secs = self.run(cmd, env=env)
        ok, reason, key = check_metrics(os.path.join(out, "metrics.jsonl"), steps=3)
        key["run_s"] = round(secs, 1)
        key["final_checkpoint"] = os.path.isdir(os.path.join(out, "final"))
        if rc != 0:
            return dict(status="FAIL", reason=("timeout" if rc is None else f"exit {rc}") + (f"; {reason}" if reason else ""),
                        key=key)
        return dict(status="PASS" if ok else "FAIL", reason=reason, key=key)

    def step_tgrpo_fsdp2(self, step):
        return self.run_step_train(step, "tgrpo", "fsdp2")

    def step_sft_fsdp2(self, step):
        return self.run_step_train(step, "sft", "fsdp2")

    def step_tgrpo_zero3(self, step):
        return self.run_step_train(step, "tgrpo", "deepspeed")

    def step_sft_zero3(self, step):
        return self.run_step_train(step, "sft", "deepspeed")

    def step_eval(self, step):
        trained = self.w("tgrpo_fsdp2", "final")
        model = trained if (step is not None and os.path.isdir(trained)) else self.w("tiny")
        out = self.w("eval.jsonl")
        cmd = [self.py, "-m", "videor1.eval", "--model", model, "--data", self.w("data", "heldout.json"),
               "--config", "configs/tiny_cpu.yaml", "--limit", "16", "--max-new-tokens", "48", "--out", out]
        if step is None:
            return shlex.join(cmd)
        if os.path.exists(out):
            os.remove(out)
        rc, secs = self.run(cmd)
        rows = []
        if os.path.exists(out):
            with open(out, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        scores = [r.get("score") for r in rows]
        finite = all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores)
        key = dict(rows=len(rows), model=os.path.relpath(model, self.work), eval_s=round(secs, 1),
                   mean_score=round(sum(scores) / len(scores), 4) if rows and finite else None)
        if rc != 0:
            return dict(status="FAIL", reason="timeout" if rc is None else f"exit {rc}", key=key)
        if len(rows) != 16 or not finite:
            return dict(status="FAIL", reason=f"{len(rows)} rows (want 16), finite scores: {finite}", key=key)
        return dict(status="PASS", reason="", key=key)

    # -- steps: benchmarks ------------------------------------------------------------------------------------
    def step_bench_grpo_loss(self, step):
        box = max(10, int((self.remaining() if step else 75) - 25))
        cmd = [self.py, "benchmarks/bench_grpo_loss.py", "--sizes", "8192", "--dtype", "bf16", "--modes", "fwd+bwd,fwd",
               "--mask", "both", "--providers",
               "ours-linear,torch-eager,trl-chunked,liger-chunked,ours-logits,liger-triton", "--reps", "3",
               "--time-box", str(box), "--out", self.out]
        if step is None:
            return shlex.join(cmd)
        rc, secs = self.run(cmd)
        path = os.path.join(self.out, f"grpo_loss_cuda_{self.slug}.csv")
        key = dict(csv=path if os.path.exists(path) else None, bench_s=round(secs, 1),
                   **grpo_key_numbers(path))
        if rc != 0:
            return dict(status="FAIL", reason="timeout" if rc is None else f"exit {rc}", key=key)
        return dict(status="PASS" if key["csv"] else "FAIL", reason="" if key["csv"] else "no CSV written", key=key)

    def step_sweep_row_kernel(self, step):
        box = max(5, int((self.remaining() if step else 35) - 10))
        cmd = [self.py, "benchmarks/sweep_row_kernel.py", "--time-box", str(box), "--tag", f"cuda_{self.slug}",
               "--out", self.out]
        if step is None:
            return shlex.join(cmd)
        rc, secs = self.run(cmd)
        path = os.path.join(self.out, f"row_kernel_sweep_cuda_{self.slug}.csv")
        key = dict(csv=path if os.path.exists(path) else None, sweep_s=round(secs, 1), **sweep_key_numbers(path))
        if rc != 0:
            return dict(status="FAIL", reason="timeout" if rc is None else f"exit {rc}", key=key)
        return dict(status="PASS" if key["csv"] else "FAIL", reason="" if key["csv"] else "no CSV written", key=key)

    def step_bench_frame_to_patch(self, step):
        box = max(5, int((self.remaining() if step else 35) - 15))
        cmd = [self.py, "benchmarks/bench_frame_to_patch.py", "--cuda-only", "--reps", "10", "--time-box", str(box),
               "--tag", f"cuda_{self.slug}", "--out", self.out]
        if step is None:
            return shlex.join(cmd)
        rc, secs = self.run(cmd)
        path = os.path.join(self.out, f"frame_to_patch_cuda_{self.slug}.csv")
        key = dict(csv=path if os.path.exists(path) else None, bench_s=round(secs, 1), **f2p_key_numbers(path))
        if rc != 0:
            return dict(status="FAIL", reason="timeout" if rc is None else f"exit {rc}", key=key)
        return dict(status="PASS" if key["csv"] else "FAIL", reason="" if key["csv"] else "no CSV written", key=key)

    def step_bench_shared_prefix(self, step):
        cmd = [self.py, "benchmarks/bench_shared_prefix.py", "--device", "cuda", "--dtype", "bfloat16", "--reps", "5",
               "--tag", f"cuda_{self.slug}", "--out", self.out]
        if step is None:
            return shlex.join(cmd)
        rc, secs = self.run(cmd)
        path = os.path.join(self.out, f"shared_prefix_cuda_{self.slug}.csv")
        key = dict(csv=path if os.path.exists(path) else None, bench_s=round(secs, 1))
        if rc != 0:
            return dict(status="FAIL", reason="timeout" if rc is None else f"exit {rc}", key=key)
        return dict(status="PASS" if key["csv"] else "FAIL", reason="" if key["csv"] else "no CSV written", key=key)

    # -- the whole check --------------------------------------------------------------------------------------
    def main(self) -> int:
        tmp_logs = tempfile.mkdtemp(prefix="gpu_check_probe_")
        self.logs = tmp_logs
        try:  # the machine probe also asks for any brought wheel's distribution, so the plan knows what is there
            extra = [wheel_name_version(f)[0] for f in self.find_wheels()]
        except OSError:
            extra = []
        self.machine = self.probe(self._base_env(), "probe_machine.log", extra=extra)
        if not self.dry and not self.machine.get("cuda_available"):
            why = self.machine.get("torch_error") or self.machine.get("probe_error") or \
                f"torch {self.machine.get('torch')}: torch.cuda.is_available() is False"
            print(f"gpu_check: no CUDA GPU visible to {self.py} ({why}).\n"
                  "This check needs one GPU and runs nothing without it. To exercise the script on the CPU "
                  "(every GPU step skipped): make gpu-check DRY=1  (python benchmarks/gpu_check.py --dry)",
                  file=sys.stderr)
            shutil.rmtree(tmp_logs, ignore_errors=True)
            return 2
        if not self.dry:
            self.slug = slugify(self.machine.get("gpu") or "gpu")
        self.setup_dirs()
        for name in os.listdir(tmp_logs):
            shutil.move(os.path.join(tmp_logs, name), os.path.join(self.logs, name))
        shutil.rmtree(tmp_logs, ignore_errors=True)
        print(f"[gpu_check] {'DRY RUN on the CPU: every GPU step is skipped; ' if self.dry else ''}"
              f"python {self.machine.get('python')} ({self.py}), torch {self.machine.get('torch')}, "
              f"device {self.machine.get('gpu') or 'none'}; deadline {self.args.deadline:.0f} s; "
              f"results -> {self.json_path}", flush=True)
        only = set(self.args.only.split(",")) if self.args.only else None
        for step in self.steps:
            if only and step.name not in only and step.group not in only and step.name not in ("versions", "wheels"):
                step.result = dict(status="SKIP", reason="not selected (--only)", seconds=0.0)
                continue
            self.run_step(step)
        self.write_json()
        print(summary(self.report()), flush=True)
        return 1 if any(s.result.get("status") == "FAIL" for s in self.steps) else 0


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "gpu"


def wheel_fits(filename: str, python_version: str) -> tuple[bool, str]:
    """Whether a wheel's tags (name-ver-PY-ABI-PLAT.whl) fit CPython `python_version` on x86_64 Linux."""
    base = os.path.basename(filename)
    base = base[:-3] if base.endswith(".xz") else base
    parts = base[: -len(".whl")].split("-")
    if len(parts) < 5:
        return False, "not a wheel name"
    py_tags, abi_tags, plat_tags = parts[-3].split("."), parts[-2].split("."), parts[-1].split(".")
    major, minor = version_tuple(python_version)[:2]
    plat_ok = any(p == "any" or (p.endswith("x86_64") and ("linux" in p)) for p in plat_tags)

    def py_ok(tag):
        if tag in ("py3", f"py{major}", f"py{major}{minor}"):
            return True
        m = re.fullmatch(r"cp(\d)(\d+)", tag)
        if not m or int(m.group(1)) != major:
            return False
        built = int(m.group(2))
        return built == minor or ("abi3" in abi_tags and built <= minor)

    ok = plat_ok and any(py_ok(t) for t in py_tags)
    return ok, f"{parts[-3]}-{parts[-2]}-{parts[-1]}"


def unzip_wheel(path: str, site: str):
    """Install a wheel by unpacking it (what pip does for --target, minus RECORD bookkeeping)."""
    with zipfile.ZipFile(path) as z:
        z.extractall(site)
    for data in [d for d in os.listdir(site) if d.endswith(".data")]:
        root = os.path.join(site, data)
        for sub in os.listdir(root):
            src = os.path.join(root, sub)
            dst = os.path.join(site, "bin") if sub == "scripts" else site
            os.makedirs(dst, exist_ok=True)
            for item in os.listdir(src):
                target = os.path.join(dst, item)
                if os.path.isdir(target):
                    shutil.copytree(os.path.join(src, item), target, dirs_exist_ok=True)
                else:
                    shutil.move(os.path.join(src, item), target)
                if sub == "scripts":
                    os.chmod(target, 0o755)
        shutil.rmtree(root)


def junit_counts(path: str) -> dict:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = dict(tests=0, failed=0, errors=0, skipped=0)
    failing, reasons = [], []
    for s in suites:
        out["tests"] += int(s.get("tests", 0))
        out["failed"] += int(s.get("failures", 0))
        out["errors"] += int(s.get("errors", 0))
        out["skipped"] += int(s.get("skipped", 0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failing.append(case.get("name"))
            sk = case.find("skipped")
            if sk is not None and sk.get("message"):
                reasons.append(sk.get("message"))
    out["passed"] = out["tests"] - out["failed"] - out["errors"] - out["skipped"]
    out["failing"] = failing
    out["skip_reasons"] = sorted(set(reasons))
    return out


KEY_METRICS = ("loss", "reward", "reward_std", "kl", "clip_ratio", "completion_length", "grad_norm",
               "time/step", "tokens_per_s", "peak_mem_gb")


def check_metrics(path: str, steps: int) -> tuple[bool, str, dict]:
    """(ok, reason, key numbers): steps 1..steps present, every numeric value finite."""
    try:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:
        return False, f"no readable metrics.jsonl ({type(e).__name__})", {}
    have = sorted(r.get("step") for r in records if isinstance(r.get("step"), int))
    bad = sorted({f"step {r.get('step')}: {k}={v}" for r in records for k, v in r.items()
                  if isinstance(v, float) and not math.isfinite(v)})
    last = records[-1] if records else {}
    key = dict(steps=have, n_values=sum(isinstance(v, (int, float)) for r in records for v in r.values()),
               last={k: (round(v, 5) if isinstance(v, float) else v) for k, v in last.items()
                     if k in KEY_METRICS or any(k.startswith(m) for m in ("time/", "peak"))})
    if have[:steps] != list(range(1, steps + 1)):
        return False, f"steps {have} in metrics.jsonl (want 1..{steps})", key
    if bad:
        return False, "non-finite: " + "; ".join(bad[:5]), key
    return True, "", key


def read_csv(path: str) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def grpo_key_numbers(path: str) -> dict:
    out, skipped = {}, []
    for r in read_csv(path):
        if r["metric"] in ("time_ms", "peak_mem_mb") and r["provider"] != "bandwidth-bound":
            counted = r["shape"].rsplit("counted=", 1)[1] if "counted=" in r["shape"] else "1.00"
            k = f"{r['kernel']} {r['mode']} {r['provider']} counted={counted}"
            out.setdefault(k, {})["ms" if r["metric"] == "time_ms" else "peak_mb"] = float(r["p50"])
        elif r["provider"] == "bandwidth-bound":
            out.setdefault(f"{r['kernel']} {r['mode']} bandwidth-bound", {})["ms"] = float(r["p50"])
        elif r["provider"].startswith(("skipped", "time-box")):
            skipped.append(r["note"] or r["provider"])
    return {"results": out, "skipped": skipped} if out or skipped else {}


def sweep_key_numbers(path: str) -> dict:
    out = {}
    for r in read_csv(path):
        if r["metric"] == "time_ms":
            out.setdefault(r["kernel"], {})[r["provider"] + (" (table)" if r["note"] else "")] = float(r["p50"])
    return {"results": out} if out else {}


def f2p_key_numbers(path: str) -> dict:
    out = {}
    for r in read_csv(path):
        if r["metric"] in ("ms", "x_copy_bound", "fraction_of_copy_bandwidth") and r["provider"] in (
                "ours-cuda", "ours-cuda-bf16", "d2d-copy-same-bytes"):
            out.setdefault(r["shape"], {})[f"{r['provider']} {r['metric']}"] = float(r["p50"])
    return {"results": out} if out else {}


def summary(rep: dict) -> str:
    v = rep["versions"]
    pk = rep.get("packages") or {}
    lines = ["", "=" * 100,
             f"gpu-check{' (DRY RUN: no GPU step ran)' if rep['dry'] else ''}"
             f"{' (REHEARSAL: the run steps ran on the CPU)' if rep.get('rehearsal') else ''}: {rep['device']}   "
             f"{rep['elapsed_s']:.0f} s of {rep['deadline_s']:.0f} s",
             f"  python {v['python']}  torch {v['torch']}  CUDA {v['cuda']}  triton {v['triton']}  "
             f"transformers {v['transformers']}{' (brought)' if (pk.get('transformers') or {}).get('from_wheels') else ''}",
             f"  driver {v['driver']}  nvcc {v['nvcc']}  capability {v['capability']}  {v['nproc']} CPUs",
             "-" * 100, f"{'step':<22}{'status':<7}{'sec':>6}  notes", "-" * 100]
    for s in rep["steps"]:
        note = s.get("reason") or ""
        k = s.get("key") or {}
        if s["status"] == "PASS":
            note = step_note(s["name"], k) or note
        lines.append(f"{s['name']:<22}{s['status']:<7}{s.get('seconds', 0):>6.0f}  {note}"[:160])
    if rep["missing_packages"]:
        lines.append("-" * 100)
        lines.append("missing packages (steps skipped): " + "; ".join(
            f"{p} -> {', '.join(steps)}" for p, steps in rep["missing_packages"].items()))
    counts = {st: sum(s["status"] == st for s in rep["steps"]) for st in ("PASS", "FAIL", "SKIP")}
    lines += ["-" * 100, f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP   -> "
              f"{rep['outputs']['json']}", "=" * 100]
    return "\n".join(lines)


def step_note(name: str, k: dict) -> str:
    if name == "versions":
        return f"gpu {k.get('gpu')}, driver {k.get('driver')}" if k.get("gpu") else "no GPU visible (dry run)"
    if name == "wheels":
        return f"{k.get('installed')} of {k.get('found')} wheels installed ({k.get('carried_mib')} MiB carried), " \
               f"{k.get('kept_machine')} kept the machine's; {k.get('method')}"
    if name == "build":
        return f"sm_{k.get('archs')}, {k.get('jobs')} jobs, {k.get('build_s')} s, cuda_built={k.get('cuda_built')}"
    if name.startswith("tests_"):
        return f"{k.get('passed')} passed, {k.get('failed')} failed, {k.get('skipped')} skipped"
    if name == "data":
        return f"rows {k.get('rows')}"
    if name in ("tgrpo_fsdp2", "sft_fsdp2", "tgrpo_zero3", "sft_zero3"):
        last = k.get("last") or {}
        shown = ", ".join(f"{m}={last[m]}" for m in ("loss", "reward", "time/step", "peak_mem_gb") if m in last)
        return f"steps {k.get('steps')} finite; {shown}"
    if name == "eval":
        return f"{k.get('rows')} rows, mean score {k.get('mean_score')} ({k.get('model')})"
    if name == "bench_grpo_loss":
        res = k.get("results") or {}
        parts = [f"{key.split(' ', 2)[2]} {val.get('ms')} ms/{val.get('peak_mb')} MB" for key, val in res.items()
                 if key.startswith("linear_grpo_loss fwd+bwd") and "ms" in val]
        return "linear fwd+bwd: " + "; ".join(parts) if parts else ""
    if name == "sweep_row_kernel":
        res = k.get("results") or {}
        parts = []
        for kern, cfgs in res.items():
            best = min(cfgs.items(), key=lambda kv: kv[1])
            table = next((v for c, v in cfgs.items() if c.endswith("(table)")), None)
            parts.append(f"{kern} best {best[0]} {best[1]:.3f} ms (table {table} ms)")
        return "; ".join(parts)
    if name == "bench_frame_to_patch":
        res = k.get("results") or {}
        parts = [f"{shape.split(' ')[0]}: {val.get('ours-cuda x_copy_bound')}x copy" for shape, val in res.items()
                 if "ours-cuda x_copy_bound" in val]
        return "; ".join(parts[:3])
    return ""


# ---- make gpu-wheels: here, where PyPI is reachable ------------------------------------------------------------

PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_12_x86_64",
             "manylinux2010_x86_64"]


def restore_stored(src: str, dst: str):
    """Rewrite a wheel with every member stored (no deflate), so that xz compresses the raw bytes."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            ni = zipfile.ZipInfo(info.filename, info.date_time)
            ni.external_attr, ni.compress_type = info.external_attr, zipfile.ZIP_STORED
            zo.writestr(ni, zi.read(info))


def xz_wheel(path: str, out_dir: str) -> str:
    out = os.path.join(out_dir, os.path.basename(path) + ".xz")
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(path):
        return out
    with tempfile.TemporaryDirectory() as tmp:
        stored = os.path.join(tmp, os.path.basename(path))
        restore_stored(path, stored)
        if shutil.which("xz"):
            with open(out + ".tmp", "wb") as f:
                subprocess.run(["xz", "-6", "-T1", "-c", stored], stdout=f, check=True)
        else:
            with open(stored, "rb") as src, lzma.open(out + ".tmp", "wb", preset=6) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(out + ".tmp", out)
    return out


def fetch_wheels(args) -> int:
    d = os.path.abspath(args.wheels)
    xz_dir = os.path.join(d, "xz")
    os.makedirs(xz_dir, exist_ok=True)
    extras = set(args.extra or [])
    wanted = [w for w in WHEELS if not w.extra or w.name in extras]
    pip = [sys.executable, "-m", "pip"]
    binaries = [f"{w.name}=={w.version}" for w in wanted if w.build == "binary"]
    print(f"[gpu-wheels] downloading {len(binaries)} wheels (Python 3.12, manylinux x86_64) into {d}", flush=True)
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run(pip + ["download", "--disable-pip-version-check", "-q", "--only-binary=:all:", "--no-deps",
                          "--python-version", "3.12", "--implementation", "cp", *plat, "-d", d, *binaries], check=True)
    for w in wanted:
        if w.build == "sdist":  # pure Python, so building here gives the wheel the GPU machine needs
            print(f"[gpu-wheels] building {w.name}=={w.version} from its sdist (no wheel on PyPI)", flush=True)
            env = dict(os.environ, DS_BUILD_OPS="0")
            subprocess.run(pip + ["wheel", "--disable-pip-version-check", "-q", "--no-deps", "--no-build-isolation",
                                  "-w", d, f"{w.name}=={w.version}"], check=True, env=env)
    files = {}
    for f in os.listdir(d):
        if f.endswith(".whl"):
            name, version = wheel_name_version(f)
            files[(name, version)] = os.path.join(d, f)
    rows, total, dropped = [], 0.0, []
    for w in sorted(wanted, key=lambda w: w.prio):
        path = files.get((canon(w.name), w.version))
        if path is None:
            print(f"  missing after download: {w.name}=={w.version}", file=sys.stderr)
            return 1
        rows.append((w, path))
    with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        xz = dict(zip([p for _, p in rows], pool.map(lambda p: xz_wheel(p, xz_dir), [p for _, p in rows])))
    keep = set()
    table = []
    for w, path in rows:
        mib_whl, mib_xz = os.path.getsize(path) / 2**20, os.path.getsize(xz[path]) / 2**20
        fits = total + mib_xz <= args.budget_mib
        if fits:
            total += mib_xz
            keep.add(os.path.basename(xz[path]))
        else:
            dropped.append(w.name)
        table.append((w, mib_whl, mib_xz, fits))
    for f in os.listdir(xz_dir):  # the carried folder holds exactly the chosen set
        if f not in keep:
            os.remove(os.path.join(xz_dir, f))
    manifest = [dict(name=w.name, version=w.version, role=w.role, prio=w.prio, why=w.why, build=w.build,
                     wheel_mib=round(a, 2), carried_mib=round(b, 2), carried=fits) for w, a, b, fits in table]
    with open(os.path.join(xz_dir, "manifest.json"), "w") as f:
        json.dump(dict(budget_mib=args.budget_mib, carried_mib=round(total, 2), wheels=manifest,
                       not_brought=NOT_BROUGHT), f, indent=1)
    print(f"\n{'wheel':<44}{'role':<6}{'whl MiB':>9}{'xz MiB':>9}  brought for")
    for w, a, b, fits in table:
        print(f"{w.name + '==' + w.version:<44}{w.role:<6}{a:>9.2f}{b:>9.2f}  "
              f"{'' if fits else 'DROPPED (over budget): '}{w.why}")
    whl_total = sum(a for _, a, _, fits in table if fits)
    print(f"{'total carried (.whl/xz)':<50}{whl_total:>9.2f}{total:>9.2f}  budget {args.budget_mib} MiB")
    if dropped:
        print("dropped, over the budget: " + ", ".join(dropped))
    for w in WHEELS:
        if w.extra and w.name not in extras:
            print(f"not brought (add --extra {w.name}): {w.name}=={w.version}: {w.why}")
    for name, why in NOT_BROUGHT.items():
        print(f"not brought: {name}: {why}")
    print(f"\ncarry to the GPU machine: .whl/xz ({total:.1f} MiB; the run tool's carry=[\".whl/xz\"])")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry", action="store_true", help="on the CPU: every GPU step SKIP; output to --out "
                                                       "(default runs/gpu_check_dry)")
    ap.add_argument("--out", help="where the JSON and the benchmark CSVs go (default benchmarks/results; "
                                  "runs/gpu_check_dry with --dry)")
    ap.add_argument("--wheels", default=WHEELS_DIR, help="the brought wheels: DIR/xz/*.whl.xz or DIR/*.whl (.whl)")
    ap.add_argument("--deadline", type=float, default=570.0, help="seconds for everything (default 570: the group "
                                                                  "budgets are scaled to it)")
    ap.add_argument("--only", help="comma-separated steps or groups to run (setup always runs)")
    ap.add_argument("--rehearse", action="store_true", help="developers, without a GPU: --dry, but the data/run/eval "
                    "steps do run, on the CPU (gloo), with 6x the timeouts, to check their command lines; nothing it "
                    "measures is a GPU result")
    ap.add_argument("--copy-to", help="also copy the JSON, the CSVs and the logs here after every step (e.g. $OUT)")
    ap.add_argument("--fetch-wheels", action="store_true", help="download/build the wheels into --wheels "
                                                                "(make gpu-wheels; needs PyPI)")
    ap.add_argument("--extra", action="append", help="with --fetch-wheels: also bring this optional wheel (decord)")
    ap.add_argument("--budget-mib", type=float, default=WHEEL_BUDGET_MIB, help="with --fetch-wheels: carried size cap")
    args = ap.parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(args)
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
