"""videor1.mrope: Qwen2.5-VL's original M-RoPE rule, hand-computed positions, agreement with
transformers 5.24 where the rules coincide, and the installed rule in forward and generate."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from videor1.mrope import PAD_POSITION, install_original_rope_index, position_ids_for, rope_index

TEXT, IMAGE, VIDEO = 0, 1, 2


def seq(config, *runs):
    """input_ids and mm_token_type_ids [1, N] for (kind, length) runs; text ids are arbitrary."""
    kinds = [k for k, n in runs for _ in range(n)]
    token = {TEXT: 5, IMAGE: config.image_token_id, VIDEO: config.video_token_id}
    return torch.tensor([[token[k] for k in kinds]]), torch.tensor([kinds])


@pytest.fixture(scope="module")
def plain(tiny_ckpt):
    """The tiny model as transformers 5.24 runs it (never installed)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_ckpt).eval()


@pytest.fixture(scope="module")
def fixed(tiny_ckpt):
    from transformers import AutoModelForImageTextToText

    return install_original_rope_index(AutoModelForImageTextToText.from_pretrained(tiny_ckpt).eval())


@pytest.fixture(scope="module")
def config(plain):
    return plain.config


# --- 1. hand-computed positions ---------------------------------------------------------------


def test_video_between_text_spans(config, plain):
    # 3 text, video grid (4, 4, 4) -> llm grid 4 x 2 x 2, second 1.0 x 2 tokens/s = time step 2, 2 text.
    ids, types = seq(config, (TEXT, 3), (VIDEO, 16), (TEXT, 2))
    kw = dict(video_grid_thw=torch.tensor([[4, 4, 4]]), second_per_grid_ts=torch.tensor([1.0]))
    pos, delta = rope_index(ids, types, **kw, spatial_merge_size=2, tokens_per_second=2)
    assert pos.dtype == delta.dtype == torch.int64 and pos.shape == (3, 1, 21)
    assert pos[:, 0].tolist() == [
        [0, 1, 2, 3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7, 9, 9, 9, 9, 10, 11],
        [0, 1, 2, 3, 3, 4, 4, 3, 3, 4, 4, 3, 3, 4, 4, 3, 3, 4, 4, 10, 11],
        [0, 1, 2, 3, 4, 3, 4, 3, 4, 3, 4, 3, 4, 3, 4, 3, 4, 3, 4, 10, 11],
    ]
    assert delta.tolist() == [[12 - 21]]
    # transformers 5.24: same vision positions, but the text resumes at 3 + max(2, 2) = 5, inside the
    # video's time span (its positions 5..9).
    hf_pos, hf_delta = plain.model.get_rope_index(ids, mm_token_type_ids=types, **kw)
    assert torch.equal(hf_pos[:, :, :19], pos[:, :, :19])
    assert hf_pos[:, 0, 19:].tolist() == [[5, 6]] * 3


def test_image_between_text_spans(config, plain):
    # grid (1, 4, 6) -> 1 x 2 x 3 merged tokens; an image's time index is its start.
    ids, types = seq(config, (TEXT, 2), (IMAGE, 6), (TEXT, 3))
    kw = dict(image_grid_thw=torch.tensor([[1, 4, 6]]))
    pos, delta = rope_index(ids, types, **kw)
    assert pos[:, 0].tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6, 7],
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 7],
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7],
    ]
    assert delta.tolist() == [[8 - 11]]
    hf_pos, hf_delta = plain.model.get_rope_index(ids, mm_token_type_ids=types, **kw)  # images agree
    assert torch.equal(hf_pos, pos) and torch.equal(hf_delta, delta)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch(config, side):
    # Row 0 as test_video_between_text_spans; row 1: 4 pads + 2 text + video grid (3, 4, 4) at
    # second 0.5 (time step 1) + 3 text. Videos are consumed in batch order.
    ids0, types0 = seq(config, (TEXT, 3), (VIDEO, 16), (TEXT, 2))
    ids1, types1 = seq(config, (TEXT, 2), (VIDEO, 12), (TEXT, 3))
    pad = torch.zeros(1, 4, dtype=torch.long)
    cat = (lambda a, b: torch.cat([a, b], 1)) if side == "left" else (lambda a, b: torch.cat([b, a], 1))
    ids = torch.cat([ids0, cat(pad, ids1)])
    types = torch.cat([types0, cat(pad, types1)])
    mask = torch.cat([torch.ones(1, 21, dtype=torch.long), cat(pad, torch.ones_like(ids1))])
    grids, secs = torch.tensor([[4, 4, 4], [3, 4, 4]]), torch.tensor([1.0, 0.5])
    pos, delta = rope_index(ids, types, video_grid_thw=grids, second_per_grid_ts=secs, attention_mask=mask)

    want1 = [
        [0, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 6, 7],
        [0, 1, 2, 2, 3, 3, 2, 2, 3, 3, 2, 2, 3, 3, 5, 6, 7],
        [0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 5, 6, 7],
    ]
    keep = mask[1].bool()
    assert pos[:, 1, keep].tolist() == want1
    assert (pos[:, 1, ~keep] == PAD_POSITION).all() and PAD_POSITION == 1
    assert delta.tolist() == [[12 - 21], [8 - 17]]
    # Each row equals the unpadded row alone (with its own grid).
    alone0 = rope_index(ids0, types0, video_grid_thw=grids[:1], second_per_grid_ts=secs[:1])
    alone1 = rope_index(ids1, types1, video_grid_thw=grids[1:], second_per_grid_ts=secs[1:])
    assert torch.equal(pos[:, :1], alone0[0]) and torch.equal(pos[:, 1:, keep], alone1[0])
    assert torch.equal(delta, torch.cat([alone0[1], alone1[1]]))


@pytest.mark.parametrize("second, time_row", [
    (0.25, [0, 1, 1, 2, 2, 3, 4, 5]),  # 0.25 x 2 = 0.5 per patch: floor(0, .5, 1, 1.5, 2) + 1
    (0.75, [0, 1, 2, 4, 5, 7, 8, 9]),  # 1.5 per patch: floor(0, 1.5, 3, 4.5, 6) + 1
])  # fmt: skip
def test_fractional_second_per_grid_floors(config, second, time_row):
    ids, types = seq(config, (TEXT, 1), (VIDEO, 5), (TEXT, 2))  # grid (5, 2, 2): 5 x 1 x 1 tokens
    pos, delta = rope_index(ids, types, video_grid_thw=torch.tensor([[5, 2, 2]]),
                            second_per_grid_ts=torch.tensor([second]))  # fmt: skip
    after = time_row[-2:]
    assert pos[:, 0].tolist() == [time_row, [0, 1, 1, 1, 1, 1, *after], [0, 1, 1, 1, 1, 1, *after]]
    assert delta.tolist() == [[after[-1] + 1 - 8]]


def test_text_only(config, plain):
    ids, types = seq(config, (TEXT, 5))
    pos, delta = rope_index(ids, types)
    assert pos[:, 0].tolist() == [[0, 1, 2, 3, 4]] * 3 and delta.tolist() == [[0]]
    pos, delta = rope_index(ids, types, attention_mask=torch.tensor([[1, 1, 1, 0, 0]]))
    assert pos[:, 0].tolist() == [[0, 1, 2, 1, 1]] * 3 and delta.tolist() == [[0]]


def test_every_tensor_is_made_on_the_inputs_device(config):
    # Under a meta default device, a tensor made without device= would be meta and break the result.
    ids, types = seq(config, (TEXT, 2), (TEXT, 3), (VIDEO, 16), (TEXT, 2))  # the first 2: padding
    kw = dict(video_grid_thw=torch.tensor([[4, 4, 4]]), second_per_grid_ts=torch.tensor([1.0]),
              attention_mask=(torch.arange(23) >= 2).long()[None])
    want = rope_index(ids, types, **kw)
    with torch.device("meta"):
        got = rope_index(ids, types, **kw)
    assert got[0].device.type == got[1].device.type == "cpu"
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_errors_name_the_problem(config):
    ids, types = seq(config, (TEXT, 2), (VIDEO, 4))
    with pytest.raises(ValueError, match="video grids"):
        rope_index(ids, types)
    with pytest.raises(ValueError, match="16 tokens but its segment only 4"):
        rope_index(ids, types, video_grid_thw=torch.tensor([[4, 4, 4]]))
    with pytest.raises(ValueError, match="attention_mask"):
        rope_index(ids, types, video_grid_thw=torch.tensor([[1, 4, 4]]), attention_mask=torch.ones(1, 5))


# --- 2. equal to transformers 5.24 where the rules agree ------------------------------------


def test_equal_to_transformers_with_one_temporal_patch(config, plain):
    # Row 0: text, video (1, 4, 6), text, image (1, 4, 4), text; row 1: 5 pads, text, video (1, 6, 4), text.
    ids0, types0 = seq(config, (TEXT, 3), (VIDEO, 6), (TEXT, 4), (IMAGE, 4), (TEXT, 2))
    ids1, types1 = seq(config, (TEXT, 5), (VIDEO, 6), (TEXT, 3))
    pad = torch.zeros(1, 5, dtype=torch.long)
    ids, types = torch.cat([ids0, torch.cat([pad, ids1], 1)]), torch.cat([types0, torch.cat([pad, types1], 1)])
    mask = (torch.arange(19) >= torch.tensor([[0], [5]])).long()
    kw = dict(video_grid_thw=torch.tensor([[1, 4, 6], [1, 6, 4]]), second_per_grid_ts=torch.tensor([1.0, 0.5]),
              image_grid_thw=torch.tensor([[1, 4, 4]]), attention_mask=mask)
    pos, delta = rope_index(ids, types, **kw)
    hf_pos, hf_delta = plain.model.get_rope_index(ids, mm_token_type_ids=types, **kw)
    keep = mask.bool()
    assert torch.equal(pos[:, keep], hf_pos[:, keep]) and torch.equal(delta, hf_delta)
    assert (hf_pos[:, ~keep] == 0).all()  # 5.24 writes 0 at pads; we write PAD_POSITION


@pytest.mark.parametrize("t", [2, 3])
def test_rules_part_when_time_outruns_space(config, plain, t):
    # Grid (t, 8, 8), time step 2: 5.24 resumes at st + 4, we at st + max(2 (t - 1), 3) + 1.
    ids, types = seq(config, (TEXT, 2), (VIDEO, t * 16), (TEXT, 1))
    kw = dict(video_grid_thw=torch.tensor([[t, 8, 8]]), second_per_grid_ts=torch.tensor([1.0]))
    pos, _ = rope_index(ids, types, **kw)
    hf_pos, _ = plain.model.get_rope_index(ids, mm_token_type_ids=types, **kw)
    assert hf_pos[0, 0, -1] == 2 + 4
    assert pos[0, 0, -1] == 2 + max(2 * (t - 1), 3) + 1  # t = 2: 6 (agree); t = 3: 7
    assert torch.equal(pos[:, :, :-1], hf_pos[:, :, :-1])


# --- 3. installed in a model: forward and generate ------------------------------------------


@pytest.fixture(scope="module")
def setup(tiny_ckpt, synth_data, tmp_path_factory):
    """The processor, data config, and prompts: a video sampled at 2 fps (Video-R1's rate: second 1.0,
    time step 2, where the rules part) and, from synth_data, an 8-fps video (time step 0.5: 4 patches of
    2 x 2 give time 0, 0, 1, 1, where they agree) and an image."""
    from transformers import AutoProcessor

    from videor1.config import Config
    from videor1.rollout import prepare_prompt
    from videor1.synthetic import generate_dataset

    processor = AutoProcessor.from_pretrained(tiny_ckpt)
    data = Config().data
    data.video_min_pixels, data.video_max_pixels = 3136, 12544
    data.image_min_pixels, data.image_max_pixels = 3136, 12544
    two_fps = generate_dataset(str(tmp_path_factory.mktemp("synth2fps")), n=1, seed=0, frames=8, fps=2, size=64)
    prompts = {}
    for name, path, fps, kind in [("video_2fps", two_fps, 2.0, "video"), ("video_8fps", synth_data, 8.0, "video"),
                                  ("image", synth_data, 8.0, "image")]:
        with open(path) as f:
            row = next(r for r in json.load(f) if r["data_type"] == kind)
        data.fps = fps
        prompts[name] = prepare_prompt(row, processor, data, os.path.dirname(path), shuffled=False)
    assert prompts["video_2fps"].vision["second_per_grid_ts"].tolist() == [1.0]
    assert prompts["video_8fps"].vision["second_per_grid_ts"].tolist() == [0.25]
    assert prompts["video_2fps"].vision["video_grid_thw"].tolist() == [[4, 4, 4]]
    return processor, prompts


def typed_inputs(config, prompt):
    from videor1.policy import with_mm_token_types

    ids = prompt.input_ids[None]
    return with_mm_token_types({"input_ids": ids, "attention_mask": torch.ones_like(ids), **prompt.vision}, config)


def test_installed_forward_uses_the_original_rule(plain, fixed, setup):
    _, prompts = setup
    inputs = typed_inputs(fixed.config, prompts["video_2fps"])
    pos = position_ids_for(fixed.config, inputs)
    video = (inputs["mm_token_type_ids"][0] == VIDEO).nonzero()[:, 0]
    end = int(video[-1]) + 1
    assert pos[0, 0, video].unique().tolist() == [int(video[0]) + i for i in (0, 2, 4, 6)]
    assert pos[:, 0, end].tolist() == [int(pos[:, 0, :end].max()) + 1] * 3
    with torch.no_grad():
        got = fixed.model(**inputs).last_hidden_state
        want = fixed.model(**inputs, position_ids=pos).last_hidden_state
        old = plain.model(**inputs).last_hidden_state
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (got - old).abs().max() > 1e-3  # the fix matters here
    # At 8 fps the rules coincide (time 0, 0, 1, 1 within a 2 x 2 grid): the same numbers.
    inputs8 = typed_inputs(fixed.config, prompts["video_8fps"])
    with torch.no_grad():
        torch.testing.assert_close(fixed.model(**inputs8).last_hidden_state, plain.model(**inputs8).last_hidden_state,
                                   rtol=0, atol=0)  # fmt: skip


def test_install_is_per_instance_idempotent_and_typed(plain, fixed, tiny_ckpt):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    from videor1.policy import PolicyModule

    bound = fixed.model.__dict__["get_rope_index"]
    assert bound.func is rope_index and bound.keywords == {"spatial_merge_size": 2, "tokens_per_second": 2}
    assert install_original_rope_index(fixed) is fixed
    again = fixed.model.__dict__["get_rope_index"]
    assert again.func is bound.func and again.keywords == bound.keywords
    assert install_original_rope_index(fixed.model) is fixed.model
    assert "get_rope_index" not in plain.model.__dict__  # the class is untouched
    assert Qwen2_5_VLModel.get_rope_index is not rope_index
    wrapped = PolicyModule(plain)
    try:  # a wrapper's inner model is found too
        install_original_rope_index(wrapped)
        assert plain.model.get_rope_index.func is rope_index
    finally:
        del plain.model.get_rope_index
    with pytest.raises(TypeError, match=r"torch\.nn\.modules\.linear\.Linear has no Qwen2_5_VLModel"):
        install_original_rope_index(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="dict"):
        install_original_rope_index({})


def test_cached_decode_without_position_ids_follows_rope_deltas(fixed, setup):
    """A hand-rolled decode step (cache, no position_ids, no grids) places the new token at
    cache length + rope_deltas = max + 1: the deltas follow transformers 5.24's convention."""
    _, prompts = setup
    inputs = typed_inputs(fixed.config, prompts["video_2fps"])
    with torch.no_grad():
        first = fixed(**inputs, use_cache=True)
        token = first.logits[:, -1:].argmax(-1)
        step = fixed(input_ids=token, cache=first.cache, use_cache=True).logits[:, -1]
        ids = torch.cat([inputs["input_ids"], token], 1)
        full = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(token)], 1)}
        pos = position_ids_for(fixed.config, full)
        want = fixed(**full, position_ids=pos).logits[:, -1]
        lower = pos.clone()
        lower[:, :, -1] -= 1
        other = fixed(**full, position_ids=lower).logits[:, -1]
    assert pos[:, 0, -1].tolist() == [int(pos[:, 0, :-1].max()) + 1] * 3
    torch.testing.assert_close(step, want, rtol=0, atol=1e-4)
    assert (other - want).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["one_prompt", "left_padded_batch"])
def test_generate_continues_at_max_plus_one(fixed, setup, case):
    """generate's sampled log-probs equal a teacher-forced forward at the original positions, where
    the completion runs on from max + 1; completion positions one lower give other numbers."""
    from videor1.policy import with_mm_token_types
    from videor1.rollout import vision_token_ids

    processor, prompts = setup
    if case == "one_prompt":
        p = prompts["video_2fps"]
        inputs, num = typed_inputs(fixed.config, p), 3
    else:  # the video prompt and an image prompt of another length, left padded with id 0
        v, im = prompts["video_2fps"], prompts["image"]
        width = max(len(v.input_ids), len(im.input_ids))
        ids = torch.zeros(2, width, dtype=torch.long)
        mask = torch.zeros(2, width, dtype=torch.long)
        for i, q in enumerate((v, im)):
            ids[i, width - len(q.input_ids):] = q.input_ids
            mask[i, width - len(q.input_ids):] = 1
        assert (mask == 0).any()
        inputs = with_mm_token_types({"input_ids": ids, "attention_mask": mask, **v.vision, **im.vision}, fixed.config)
        num = 1
    prompt_len = inputs["input_ids"].shape[1]
    torch.manual_seed(0)
    with torch.no_grad():
        out = fixed.generate(**inputs, do_sample=True, max_new_tokens=8, num_return_sequences=num, use_cache=True,
                             output_logits=True, return_dict_in_generate=True, eos_token_id=[], pad_token_id=0,
                             suppress_tokens=vision_token_ids(processor.tokenizer))  # fmt: skip
    completion = out.sequences[:, prompt_len:]
    assert completion.shape[1] == 8
    gen_logp = torch.stack([torch.log_softmax(l.float(), -1) for l in out.logits], 1)
    gen_logp = gen_logp.gather(-1, completion[..., None])[..., 0]

    b = completion.shape[0]
    rep = {k: v.repeat(num) if k == "second_per_grid_ts" else v.repeat(num, 1) for k, v in inputs.items()
           if k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "pixel_values", "image_grid_thw")}
    full = {"input_ids": torch.cat([inputs["input_ids"].repeat_interleave(num, 0), completion], 1),
            "attention_mask": torch.cat([inputs["attention_mask"].repeat_interleave(num, 0),
                                         torch.ones_like(completion)], 1), **rep}  # fmt: skip
    full = with_mm_token_types(full, fixed.config)
    pos = position_ids_for(fixed.config, full)
    keep = full["attention_mask"][:, :prompt_len].bool()
    for i in range(b):  # the completion starts at max(prompt) + 1
        assert pos[:, i, prompt_len].tolist() == [int(pos[:, i, :prompt_len][:, keep[i]].max()) + 1] * 3

    def teacher_forced(position_ids):
        with torch.no_grad():
            logits = fixed(**full, position_ids=position_ids).logits[:, prompt_len - 1:-1]
        return torch.log_softmax(logits.float(), -1).gather(-1, completion[..., None])[..., 0]

    got = teacher_forced(pos)
    assert torch.allclose(got, gen_logp, atol=1e-4), (got - gen_logp).abs().max()
    with torch.no_grad():  # the forward without position_ids is the same rule
        implicit = fixed(**full).logits[:, prompt_len - 1:-1]
    assert torch.equal(torch.log_softmax(implicit.float(), -1).gather(-1, completion[..., None])[..., 0], got)
    lower = pos.clone()
    lower[:, :, prompt_len:] -= 1
    assert (teacher_forced(lower) - gen_logp).abs().max() > 1e-3  # the check can tell positions apart


FSDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForImageTextToText
    from videor1.mrope import install_original_rope_index, position_ids_for, rope_index

    ckpt, store = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", init_method="file://" + store, rank=0, world_size=1)
    model = install_original_rope_index(AutoModelForImageTextToText.from_pretrained(ckpt).eval())
    bound = model.model.get_rope_index
    cls = type(model.model)
    mesh = init_device_mesh("cpu", (1,))
    # As videor1.engine (decoder layers, vision blocks, root), plus the Qwen2_5_VLModel itself.
    units = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    for module in (*units, model.model, model):
        fully_shard(module, mesh=mesh)
    assert type(model.model) is not cls and issubclass(type(model.model), cls), type(model.model)
    assert model.model.get_rope_index is bound
    c = model.config
    ids = torch.tensor([[5] * 3 + [c.video_token_id] * 16 + [5] * 2])
    torch.manual_seed(0)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), video_grid_thw=torch.tensor([[4, 4, 4]]),
                  second_per_grid_ts=torch.tensor([1.0]), pixel_values_videos=torch.randn(64, 1176),
                  mm_token_type_ids=(ids == c.video_token_id).long() * 2)
    with torch.no_grad():
        got = model(**inputs).logits
        want = model(**inputs, position_ids=position_ids_for(c, inputs)).logits
    assert torch.equal(got, want)
    dist.destroy_process_group()
    print("ok", type(model.model).__name__)
""")


def test_binding_survives_fsdp2_fully_shard(tiny_ckpt, tmp_path):
    """fully_shard swaps the module's __class__ for an FSDP subclass but keeps its __dict__ (one CPU
    rank over gloo, in a subprocess so no process group leaks into this one)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", FSDP_SCRIPT, tiny_ckpt, str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["ok", "FSDPQwen2_5_VLModel"]
