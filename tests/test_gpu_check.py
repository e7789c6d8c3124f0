"""benchmarks/gpu_check.py (`make gpu-check`) without a GPU: the dry run's real JSON, the refusal
without a GPU, the wheel plan on fake wheels, the deadline, and the checks it applies to runs and tests."""

import importlib.util
import json
import lzma
import os
import platform
import subprocess
import sys
import time
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.py")
STEPS = ["versions", "wheels", "build", "tests_frame_to_patch", "tests_kernels_7b", "tests_shared_prefix", "data", "tgrpo_fsdp2", "sft_fsdp2",
         "eval", "tgrpo_zero3", "sft_zero3", "bench_grpo_loss", "sweep_row_kernel", "bench_frame_to_patch",
         "bench_shared_prefix"]
GPU_STEPS = STEPS[2:]


def load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def fake_wheel(directory, name, version, tag="py3-none-any", module=None, xz=True):
    """A minimal valid wheel (one module + dist-info); xz=True stores it the way make gpu-wheels carries it."""
    fname = f"{name}-{version}-{tag}.whl"
    path = os.path.join(directory, fname)
    di = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{module or name}/__init__.py", f"__version__ = {version!r}\n")
        z.writestr(f"{di}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{di}/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n")
        z.writestr(f"{di}/RECORD", "")
    if xz:
        with open(path, "rb") as src, lzma.open(path + ".xz", "wb") as dst:
            dst.write(src.read())
        os.remove(path)
    return fname


def run_script(args, env=None, timeout=180):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=timeout)
    return proc, time.monotonic() - t0


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    xz_dir = tmp / "wheels" / "xz"
    xz_dir.mkdir(parents=True)
    fake_wheel(xz_dir, "transformers", "99.0.0")  # role "pin": installed over the machine's
    fake_wheel(xz_dir, "pytest", "1.0.0")  # role "add" and present here: the machine's is kept
    fake_wheel(xz_dir, "gpu_check_fake_pkg", "0.1")  # unknown and missing: installed
    fake_wheel(xz_dir, "gpu_check_fake_ext", "0.1", tag="cp399-cp399-manylinux_2_28_x86_64")  # wrong python
    out = tmp / "out"
    proc, seconds = run_script(["--dry", "--out", str(out), "--wheels", str(tmp / "wheels")])
    with open(out / "gpu_check_dry.json") as f:
        return proc, seconds, json.load(f), out


def test_dry_run_lists_every_step_and_skips_every_gpu_step(dry):
    proc, seconds, rep, _ = dry
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert seconds < 60
    assert rep["dry"] is True
    steps = {s["name"]: s for s in rep["steps"]}
    assert [s["name"] for s in rep["steps"]] == STEPS
    assert steps["versions"]["status"] == "PASS" and steps["wheels"]["status"] == "PASS"
    for name in GPU_STEPS:
        s = steps[name]
        assert s["cuda"] is True and s["status"] == "SKIP", name
        assert s["reason"].startswith("dry run (--dry)"), (name, s["reason"])
        assert isinstance(s["timeout_s"], (int, float)) and s["timeout_s"] > 0
        assert s.get("command"), name  # what it would run, recorded
    # the summary names every step and says it was a dry run
    assert "DRY RUN" in proc.stdout
    for name in STEPS:
        assert name in proc.stdout
    assert "2 PASS, 0 FAIL, 14 SKIP" in proc.stdout


def test_dry_run_records_the_commands_the_gpu_runs(dry):
    steps = {s["name"]: s for s in dry[2]["steps"]}
    assert "VIDEOR1_FORCE_CUDA_BUILD=1" in steps["build"]["command"]
    assert "setup.py build_ext --inplace" in steps["build"]["command"]
    assert "VIDEOR1_CUDA_ARCHS=" in steps["build"]["command"] and "MAX_JOBS=" in steps["build"]["command"]
    assert "tests/test_gpu_kernels_7b.py" in steps["tests_kernels_7b"]["command"]
    assert "tests/test_frame_to_patch.py::test_cuda_equals_cpu" in steps["tests_frame_to_patch"]["command"]
    for name, script, config in (("tgrpo_fsdp2", "videor1/train.py", "configs/tiny_cpu.yaml"),
                                 ("sft_zero3", "videor1/sft.py", "configs/tiny_sft_cpu.yaml")):
        cmd = steps[name]["command"]
        assert "-m torch.distributed.run --standalone --nproc_per_node=1 " + script in cmd
        assert "--config " + config in cmd and "--train.max_steps 3" in cmd and "--train.save_steps 0" in cmd
        assert "--train.mixed_precision bf16" in cmd
    assert "--train.engine deepspeed --train.deepspeed_config configs/zero3.json" in steps["tgrpo_zero3"]["command"]
    assert "--rollout.num_generations 4 --rollout.max_completion_length 16" in steps["tgrpo_zero3"]["command"]
    assert "--train.engine fsdp2" in steps["sft_fsdp2"]["command"]
    assert "-m videor1.eval" in steps["eval"]["command"] and "--limit 16" in steps["eval"]["command"]
    assert "--n 32 --seed 0 --frames 8" in steps["data"]["command"]
    assert "--sizes 8192" in steps["bench_grpo_loss"]["command"] and "--time-box" in steps["bench_grpo_loss"]["command"]
    assert "--mask both" in steps["bench_grpo_loss"]["command"] and "trl-chunked" in steps["bench_grpo_loss"]["command"]
    assert "benchmarks/sweep_row_kernel.py" in steps["sweep_row_kernel"]["command"]
    assert "--cuda-only" in steps["bench_frame_to_patch"]["command"]


def test_dry_run_records_versions(dry):
    import torch
    import triton

    rep = dry[2]
    v = rep["versions"]
    assert v["python"] == platform.python_version() and v["python_executable"] == sys.executable
    assert v["torch"] == torch.__version__ and v["cuda"] == torch.version.cuda and v["triton"] == triton.__version__
    assert v["nproc"] == os.cpu_count()
    import transformers

    assert rep["machine_packages"]["transformers"]["version"] == transformers.__version__
    assert rep["machine_packages"]["transformers"]["from_wheels"] is False


def test_dry_run_wheel_plan_installs_pins_and_missing_only(dry):
    rep, out = dry[2], dry[3]
    plan = {p["name"]: p for p in rep["wheels"]}
    assert set(plan) == {"transformers", "pytest", "gpu_check_fake_pkg", "gpu_check_fake_ext"}
    assert plan["transformers"]["install"] and plan["transformers"]["why"].startswith("pinned 99.0.0")
    assert not plan["pytest"]["install"] and "kept" in plan["pytest"]["why"]
    assert plan["gpu_check_fake_pkg"]["install"] and plan["gpu_check_fake_pkg"]["why"] == "machine has none"
    assert not plan["gpu_check_fake_ext"]["install"] and "not for python" in plan["gpu_check_fake_ext"]["why"]
    # installed into the dry run's own site folder, first on the steps' path: the probe saw them there
    assert os.path.isfile(out / "site" / "gpu_check_fake_pkg" / "__init__.py")
    assert not os.path.exists(out / "site" / "gpu_check_fake_ext")
    assert rep["packages"]["transformers"] == {"version": "99.0.0", "from_wheels": True}
    assert rep["versions"]["transformers"] == "99.0.0"
    key = {s["name"]: s for s in rep["steps"]}["wheels"]["key"]
    assert key["found"] == 4 and key["installed"] == 2 and key["kept_machine"] == 2


def test_without_a_gpu_it_refuses(tmp_path):
    proc, _ = run_script(["--out", str(tmp_path / "out")], env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA GPU" in proc.stderr and "--dry" in proc.stderr and "DRY=1" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing was run or written


def test_deadline_skips_what_has_no_time_left(tmp_path):
    proc, _ = run_script(["--dry", "--out", str(tmp_path), "--wheels", str(tmp_path / "none"), "--deadline", "0.01"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads((tmp_path / "gpu_check_dry.json").read_text())
    steps = {s["name"]: s for s in rep["steps"]}
    for name in ("versions", "wheels"):
        assert steps[name]["status"] == "SKIP" and steps[name]["reason"].startswith("deadline"), steps[name]
    assert rep["versions"]["torch"]  # the machine's versions are probed before any step


# ---- the helpers, directly --------------------------------------------------------------------------------------

def test_wheel_tags_and_versions():
    gc = load_module()
    fits = gc.wheel_fits
    assert fits("av-18.1.0-cp311-abi3-manylinux_2_28_x86_64.whl.xz", "3.12.1")[0]
    assert not fits("av-18.1.0-cp313-abi3-manylinux_2_28_x86_64.whl", "3.12.1")[0]
    assert fits("regex-2026.11.19-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", "3.12.0")[0]
    assert not fits("regex-2026.11.19-cp312-cp312-manylinux2014_x86_64.whl", "3.11.7")[0]
    assert fits("decord-0.6.0-py3-none-manylinux2010_x86_64.whl", "3.12.1")[0]
    assert fits("transformers-5.24.0-py3-none-any.whl", "3.12.1")[0]
    assert not fits("x-1.0-cp312-cp312-macosx_11_0_arm64.whl", "3.12.1")[0]
    assert gc.wheel_name_version("py_cpuinfo-9.0.0-py3-none-any.whl.xz") == ("py_cpuinfo", "9.0.0")
    assert gc.satisfies("8.5.1", ">=8.4.2") and not gc.satisfies("8.1.7", ">=8.4.2") and gc.satisfies("1.0", "")
    assert gc.satisfies("2026.11.19", ">=2025.10.22") and not gc.satisfies("2.16.1", ">=2.16.2")
    assert gc.slugify("NVIDIA H200") == "nvidia_h200"
    names = [w.name for w in gc.WHEELS]
    assert len(names) == len(set(names))
    assert {"transformers", "av", "liger_kernel", "deepspeed", "pytest", "ninja"} <= set(names)


def test_metrics_check_wants_steps_1_to_3_all_finite(tmp_path):
    gc = load_module()
    path = tmp_path / "metrics.jsonl"
    good = [{"step": s, "loss": 0.5 / s, "reward": 1.0, "time/step": 0.2} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in good))
    ok, reason, key = gc.check_metrics(str(path), 3)
    assert ok and reason == "" and key["steps"] == [1, 2, 3] and key["last"]["loss"] == round(0.5 / 3, 5)
    path.write_text("".join(json.dumps(r) + "\n" for r in good[:2]))
    ok, reason, _ = gc.check_metrics(str(path), 3)
    assert not ok and "want 1..3" in reason
    bad = good[:2] + [dict(good[2], grad_norm=float("nan"))]
    path.write_text("".join(json.dumps(r) + "\n" for r in bad))  # json writes NaN; it reads back as nan
    ok, reason, _ = gc.check_metrics(str(path), 3)
    assert not ok and "grad_norm=nan" in reason
    ok, reason, _ = gc.check_metrics(str(tmp_path / "missing.jsonl"), 3)
    assert not ok and "no readable metrics.jsonl" in reason


def test_junit_counts(tmp_path):
    gc = load_module()
    xml = tmp_path / "r.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" '
                   'skipped="1"><testcase name="a"/><testcase name="b"><failure message="x"/></testcase>'
                   '<testcase name="c"><skipped message="no GPU"/></testcase><testcase name="d"/></testsuite>'
                   '</testsuites>')
    c = gc.junit_counts(str(xml))
    assert (c["tests"], c["passed"], c["failed"], c["skipped"]) == (4, 2, 1, 1)
    assert c["failing"] == ["b"] and c["skip_reasons"] == ["no GPU"]
    assert gc.junit_counts(str(tmp_path / "none.xml")) == {}


def test_unzip_fallback_installs_a_wheel(tmp_path):
    gc = load_module()
    name = fake_wheel(str(tmp_path), "gpu_check_unzip", "1.0", xz=False)
    site = tmp_path / "site"
    site.mkdir()
    gc.unzip_wheel(str(tmp_path / name), str(site))
    assert (site / "gpu_check_unzip" / "__init__.py").is_file()
    assert (site / "gpu_check_unzip-1.0.dist-info" / "METADATA").is_file()
