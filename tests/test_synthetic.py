"""The synthetic temporal video set: real mp4s that decode as declared, the exact Video-R1 schema,
answers that are right by construction (checked on the decoded pixels), order-dependence of the
temporal tasks, determinism, disjoint splits and tokenizer coverage."""

import json
import os
import subprocess
import sys
from collections import Counter, deque

import av
import decord
import numpy as np
import pytest
from PIL import Image

from videor1 import synthetic as syn
from videor1.data import ROW_FIELDS, load_rows
from videor1.prompts import PROBLEM_TYPES, build_sft_target
from videor1.rewards import accuracy_reward, format_reward

N = 22  # two cycles of the 11 default tasks


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """{name: (json path, rows, manifest)}: train seed 0, held-out seed 1 (same dir), and a
    non-default geometry (96x96, 8 frames, 4 fps)."""
    root = str(tmp_path_factory.mktemp("syn"))
    other = str(tmp_path_factory.mktemp("syn96"))
    paths = {
        "train": syn.generate_dataset(root, N, seed=0, split="train"),
        "heldout": syn.generate_dataset(root, N, seed=1, split="heldout"),
        "small": syn.generate_dataset(other, 11, seed=3, size=96, frames=8, fps=4),
    }
    return {k: (p, load_rows(p), syn.load_manifest(p)) for k, p in paths.items()}


def _media(json_path, rel):
    return os.path.join(os.path.dirname(json_path), rel)


def _decode_pyav(path):
    with av.open(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _decode(json_path, item):
    path = _media(json_path, item["path"])
    if item["data_type"] == "video":
        return _decode_pyav(path)
    return np.asarray(Image.open(path).convert("RGB"))[None]


# --- oracles: read the answer from decoded pixels (grey background, saturated shapes) -----------


def _lit(frame):
    """Pixels that differ from the background (every palette colour is >= 93 levels away from it
    in some channel; yuv420p and the encoder move the background by a few levels)."""
    return np.abs(frame.astype(int) - np.array(syn.BACKGROUND)).max(-1) > 50


def _erode(mask):
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def _color_name(frame):
    """Nearest palette colour of the lit pixels (median of the interior, away from yuv420p's
    half-resolution chroma at the edges) and its L-inf distance; None if nothing is lit."""
    lit = _lit(frame)
    if lit.sum() < 10:
        return None, None
    inner = _erode(_erode(lit))
    rgb = np.median(frame[inner if inner.any() else lit].astype(float), axis=0)
    name = min(syn.PALETTE, key=lambda c: np.abs(rgb - syn.PALETTE[c]).max())
    return name, np.abs(rgb - syn.PALETTE[name]).max()


def _centroids(frames):
    out = []
    for f in frames:
        ys, xs = np.nonzero(_lit(f))
        out.append((xs.mean(), ys.mean()))
    return np.array(out)


def _motion(frames):
    """(direction, speed px/frame) from a least-squares line through the centroids."""
    c = _centroids(frames)
    t = np.arange(len(frames))
    sx, sy = np.polyfit(t, c[:, 0], 1)[0], np.polyfit(t, c[:, 1], 1)[0]
    if abs(sx) > abs(sy):
        return ("right" if sx > 0 else "left"), abs(sx), abs(sy)
    return ("down" if sy > 0 else "up"), abs(sy), abs(sx)


def _present(frames):
    return [bool(_lit(f).sum() >= 10) for f in frames]


def _runs(on):
    return sum(1 for t, v in enumerate(on) if v and (t == 0 or not on[t - 1]))


def _components(mask):
    """Number of 4-connected components of a boolean mask (BFS)."""
    seen = np.zeros_like(mask)
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        count += 1
        seen[y, x] = True
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


def _shape_name(frame, radius):
    """The shape whose mask best overlaps (IoU) the lit pixels around their centre."""
    pad = radius + 3
    lit = np.pad(_lit(frame), pad)
    ys, xs = np.nonzero(lit)  # the box centre is the shape centre (not so the centroid)
    cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
    crop = lit[cy - radius - 2 : cy + radius + 3, cx - radius - 2 : cx + radius + 3]

    def iou(shape):
        best = 0.0
        for dy in (-1, 0, 1):  # decoded edges may grow or lose a pixel
            for dx in (-1, 0, 1):
                ref = np.zeros_like(crop)
                m = syn.shape_mask(shape, radius)
                ref[2 + dy : 2 + dy + m.shape[0], 2 + dx : 2 + dx + m.shape[1]] = m
                best = max(best, (ref & crop).sum() / (ref | crop).sum())
        return best

    return max(syn.SHAPES, key=iou)


def _label(task, frames, item, radius):
    """The answer label of a sample read from its decoded frames (scene only for what pixels
    cannot name: the OCR word is checked against the rendered mask in test_ocr_word_is_drawn)."""
    if task in ("motion_direction", "motion_caption"):
        return _motion(frames)[0]
    if task == "motion_speed":
        return _motion(frames)[1]
    if task == "flash_count":
        return str(_runs(_present(frames)))
    if task == "color_first":
        return _color_name(frames[0])[0]
    if task == "appear_disappear":
        p = _present(frames)
        return "appears" if (not p[0] and p[-1]) else "disappears" if (p[0] and not p[-1]) else "neither"
    if task == "image_color":
        return _color_name(frames[0])[0]
    if task == "image_shape":
        return _shape_name(frames[0], radius)
    if task == "image_count":
        return str(_components(_lit(frames[0])))
    if task in ("video_ocr", "image_ocr"):
        return item["scene"]["word"]
    raise AssertionError(task)


def _option_text(row, letter):
    matches = [op[3:] for op in row["options"] if op.startswith(f"{letter}. ")]
    assert len(matches) == 1, (letter, row["options"])
    return matches[0]


def _answer(row):
    return row["solution"][len("<answer>") : -len("</answer>")]


# --- schema and decoding ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["train", "heldout", "small"])
def test_json_has_exact_video_r1_schema(datasets, name):
    path, rows, manifest = datasets[name]
    with open(path) as f:
        raw = json.load(f)
    assert raw == rows and len(rows) == manifest["n"] == len(manifest["items"])
    for row, item in zip(rows, manifest["items"]):
        assert list(row) == list(ROW_FIELDS)  # exactly the schema's fields, nothing extra
        assert row["path"] == item["path"] and row["path"].startswith(("./videos/", "./images/"))
        assert os.path.isfile(_media(path, row["path"]))
        assert row["data_source"] == "synthetic/" + item["task"]
        assert row["process"].startswith("<think>") and row["process"].endswith("</think>")
        assert row["solution"].startswith("<answer>") and row["solution"].endswith("</answer>")
        assert row["process"].count(".") <= 4  # short: a few sentences at most
        if row["problem_type"] == "multiple choice":
            letters = [op.split(". ", 1)[0] for op in row["options"]]
            assert letters == list("ABCD"[: len(letters)]) and _answer(row) in letters
        else:
            assert row["options"] == []
        if row["problem_type"] == "numerical":
            assert _answer(row).isdigit()
        if row["problem_type"] == "regression":
            float(_answer(row))
            assert "." in _answer(row)
        # The SFT target earns full Video-R1 format and accuracy rewards.
        assert format_reward(build_sft_target(row)) == 1.0
        reward = accuracy_reward(build_sft_target(row), row["solution"], row["problem_type"])
        assert reward == pytest.approx(1.0, abs=1e-6)  # regression: 1 - 1e-9 / gt, as in Video-R1


def test_every_problem_type_present(datasets, tmp_path):
    for name in ("train", "heldout"):
        assert {r["problem_type"] for r in datasets[name][1]} == set(PROBLEM_TYPES)
        assert {r["data_type"] for r in datasets[name][1]} == {"image", "video"}
    rows = load_rows(syn.generate_dataset(str(tmp_path), 5, seed=9))  # the smallest n that has them all
    assert {r["problem_type"] for r in rows} == set(PROBLEM_TYPES)


@pytest.mark.parametrize("name", ["train", "heldout", "small"])
def test_every_video_decodes_as_declared_with_decord_and_pyav(datasets, name):
    path, rows, manifest = datasets[name]
    videos = [it for it in manifest["items"] if it["data_type"] == "video"]
    assert videos
    for item in videos:
        assert (item["frames"], item["height"], item["width"], item["fps"]) == (
            manifest["frames"], manifest["size"], manifest["size"], manifest["fps"])  # fmt: skip
        file = _media(path, item["path"])
        with av.open(file) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
        by_pyav = _decode_pyav(file)
        assert by_pyav.shape == (item["frames"], item["height"], item["width"], 3)
        reader = decord.VideoReader(file)
        assert len(reader) == item["frames"]
        assert reader.get_avg_fps() == pytest.approx(item["fps"])
        by_decord = reader.get_batch(list(range(len(reader)))).asnumpy()
        assert by_decord.shape == by_pyav.shape
        assert np.abs(by_decord.astype(int) - by_pyav).max() <= 2  # the same pictures
    for item in manifest["items"]:
        if item["data_type"] == "image":
            with Image.open(_media(path, item["path"])) as im:
                assert im.size == (item["width"], item["height"]) and im.format in ("PNG", "JPEG")


# --- answers right by construction, read back from the decoded pixels ------------------------


@pytest.mark.parametrize("name", ["train", "heldout", "small"])
def test_answers_match_decoded_pixels(datasets, name):
    path, rows, manifest = datasets[name]
    radius = syn.Geometry(manifest["size"], manifest["frames"]).radius
    for row, item in zip(rows, manifest["items"]):
        task, frames = item["task"], _decode(path, item)
        label = _label(task, frames, item, radius)
        where = f"{name} {row['path']}"
        if row["problem_type"] == "multiple choice":
            assert _option_text(row, _answer(row)) == label, where
        elif task == "motion_speed":
            assert label == pytest.approx(float(_answer(row)), abs=0.1), where
        elif task == "motion_caption":
            color = _color_name(frames[0])[0]
            assert _answer(row) == f"The {color} {item['scene']['shape']} moves {label}.", where
            assert _shape_name(frames[0], radius) == item["scene"]["shape"], where
        else:
            assert _answer(row) == label, where
        for f in frames:  # decoded colours are close to the drawn ones
            name_, dist = _color_name(f)
            if name_ is not None and task not in ("video_ocr", "image_ocr", "image_count"):
                assert dist <= 8, (where, name_, dist)


def test_motion_is_straight_and_constant(datasets):
    path, rows, manifest = datasets["train"]
    for item in manifest["items"]:
        if item["task"].startswith("motion_"):
            frames = _decode(path, item)
            direction, speed, across = _motion(frames)
            assert direction == item["scene"]["direction"]
            assert speed == pytest.approx(float(item["scene"]["speed"]), abs=0.1) and across < 0.05
            assert speed >= (syn.MIN_DIRECTION_SPEED - 0.1 if item["task"] != "motion_speed" else 0.9)


def test_flash_pattern_matches_scene(datasets):
    path, rows, manifest = datasets["train"]
    for item in manifest["items"]:
        if item["task"] == "flash_count":
            on = _present(_decode(path, item))
            assert [int(v) for v in on] == item["scene"]["on"]
            assert _runs(on) == int(item["scene"]["answer"])


def test_ocr_word_is_drawn(datasets):
    path, rows, manifest = datasets["train"]
    font = syn.Geometry(manifest["size"], manifest["frames"]).font_size
    seen = 0
    for row, item in zip(rows, manifest["items"]):
        if item["task"] in ("video_ocr", "image_ocr"):
            seen += 1
            word = item["scene"]["word"]
            assert _answer(row) == word
            x, y, w, h = item["scene"]["box"]
            ref = syn.text_mask(word, font)
            assert ref.shape == (h, w)
            for frame in _decode(path, item):
                ink = frame.min(-1) > 128  # white text
                assert ink.sum() == ink[y : y + h, x : x + w].sum()  # nothing outside the box
                iou = (ink[y : y + h, x : x + w] & ref).sum() / (ink[y : y + h, x : x + w] | ref).sum()
                assert iou > 0.9, (row["path"], iou)
    assert seen == 4


# --- temporal order ---------------------------------------------------------------------------


def test_order_tasks_change_answer_under_reordering(datasets):
    """Same frames, other order, other answer: no order-free reading of the frames answers them."""
    path, rows, manifest = datasets["train"]
    radius = syn.Geometry(manifest["size"], manifest["frames"]).radius
    checked = Counter()
    for item in manifest["items"]:
        task, frames = item["task"], _decode(path, item)
        if item["data_type"] != "video":
            continue
        assert item["needs_order"] == syn.TASKS[task].needs_order
        forward, backward = _label(task, frames, item, radius), _label(task, frames[::-1], item, radius)
        if task == "flash_count":
            lit_first = sorted(frames, key=lambda f: -int(_lit(f).sum() >= 10))  # merges all flashes
            reordered = _label(task, np.stack(lit_first), item, radius)
            assert (reordered != forward) == (forward != "1")
        elif syn.TASKS[task].needs_order:
            assert backward != forward, (task, forward)
        elif task == "motion_speed":
            assert backward == pytest.approx(forward)
        else:
            assert backward == forward
        checked[task] += 1
    assert set(checked) == {n for n, t in syn.TASKS.items() if t.data_type == "video"}


def test_changes_fall_inside_one_temporal_patch(datasets):
    """color_first / appear_disappear change between frames 2j and 2j+1 (one Qwen2.5-VL patch)."""
    for name in ("train", "small"):
        path, rows, manifest = datasets[name]
        for item in manifest["items"]:
            if item["task"] in ("color_first", "appear_disappear"):
                frames = _decode(path, item)
                state = [_color_name(f)[0] for f in frames]
                changes = [t for t in range(1, len(state)) if state[t] != state[t - 1]]
                assert changes == [item["scene"]["change_frame"]] and changes[0] % 2 == 1


def test_background_normalises_to_zero(datasets):
    """The background is the processor's normalisation mean (OpenAI CLIP's, which transformers and
    Qwen2.5-VL use): after (x / 255 - mean) / std it is within 0.01 of 0, as decoded too."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
    assert np.abs((np.array(syn.BACKGROUND) / 255 - mean) / std).max() < 0.01
    path, rows, manifest = datasets["train"]
    item = next(it for it in manifest["items"] if it["task"] == "motion_direction")
    frames = _decode(path, item)
    background = ~_lit(frames[0])
    assert background.mean() > 0.8  # most of the frame
    decoded = np.median(frames[0][background].astype(float), axis=0)  # edges bleed chroma (yuv420p)
    assert np.abs(decoded - np.array(syn.BACKGROUND)).max() <= 3, decoded


def test_fixed_option_order_lists_the_vocabulary_order_with_the_same_scenes(datasets, tmp_path):
    """option_order="fixed": options always in the vocabulary's order (so the letter names the answer
    by itself), answers still right on the decoded pixels, and the same scenes as the shuffled set."""
    tasks = ["motion_direction", "appear_disappear", "color_first"]
    shuffled = syn.generate_dataset(str(tmp_path / "s"), 9, seed=3, size=64, frames=8, tasks=tasks)
    fixed = syn.generate_dataset(str(tmp_path / "f"), 9, seed=3, size=64, frames=8, tasks=tasks,
                                 option_order="fixed")
    m_s, m_f = syn.load_manifest(shuffled), syn.load_manifest(fixed)
    assert m_f["option_order"] == "fixed" and m_s["option_order"] == "shuffled"
    assert [it["content_key"] for it in m_s["items"]] == [it["content_key"] for it in m_f["items"]]
    order = {"motion_direction": list(syn.DIRECTIONS), "appear_disappear": list(syn.EVENTS)}
    radius = syn.Geometry(64, 8).radius
    for row, item in zip(load_rows(fixed), m_f["items"]):
        labels = [op[3:] for op in row["options"]]
        assert [op[:3] for op in row["options"]] == [f"{c}. " for c in syn.LETTERS[: len(labels)]]
        if item["task"] in order:
            assert labels == order[item["task"]]
        else:  # color_first: its four colours, in palette order
            assert labels == sorted(labels, key=list(syn.COLORS).index) and len(labels) == 4
        assert _option_text(row, _answer(row)) == _label(item["task"], _decode(fixed, item), item, radius)
        assert f"option {_answer(row)}".lower() in row["process"].lower()  # the reasoning names the same letter
    with pytest.raises(ValueError, match="'option_order'"):
        syn.generate_dataset(str(tmp_path / "bad"), 2, seed=0, option_order="sorted")


def test_option_letters_uniform():
    geom = syn.Geometry(64, 16)
    for name, task in syn.TASKS.items():
        if task.problem_type != "multiple choice":
            continue
        rng = np.random.default_rng(123)
        letters = Counter(_answer({"solution": task.make(rng, geom).solution}) for _ in range(400))
        k = len(letters)
        assert k in (2, 4), (name, letters)
        for letter, count in letters.items():  # expected 400/k; bounds are > 4 standard deviations
            assert abs(count - 400 / k) < 4.5 * np.sqrt(400 * (1 / k) * (1 - 1 / k)), (name, letters)


# --- determinism and splits -------------------------------------------------------------------


def test_same_seed_same_bytes(datasets, tmp_path):
    path, rows, manifest = datasets["train"]
    again = syn.generate_dataset(str(tmp_path), N, seed=0, split="train")
    with open(path, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()
    # The mp4 bytes too, against the session fixture, made in another process state (before
    # tests/test_devices.py's lazy-device runs, after which x264's lookahead once gave one video other
    # bytes: write_video turns the lookahead off), and between two generations made here.
    twice = syn.generate_dataset(str(tmp_path / "twice"), N, seed=0, split="train")
    for item in manifest["items"]:
        with open(_media(path, item["path"]), "rb") as f:
            first = f.read()
        for build in (again, twice):
            with open(_media(build, item["path"]), "rb") as f:
                assert f.read() == first, (build, item["path"])
    video = next(item["path"] for item in manifest["items"] if item["path"].endswith(".mp4"))
    with open(_media(path, video), "rb") as f:
        settings = f.read().split(b"x264 - core", 1)[1][:2000].split(b" ")
    assert b"threads=1" in settings and b"mbtree=0" in settings, settings  # x264's own record of its options
    prefix = load_rows(syn.generate_dataset(str(tmp_path / "p"), 7, seed=0))
    assert prefix == rows[:7]  # sample i does not depend on n
    other = load_rows(syn.generate_dataset(str(tmp_path / "o"), N, seed=2))
    assert sum(a["problem"] + a["solution"] != b["problem"] + b["solution"] for a, b in zip(other, rows)) > N // 2


def test_train_and_heldout_disjoint(datasets, tmp_path):
    train, held = datasets["train"], datasets["heldout"]
    assert not {r["problem_id"] for r in train[1]} & {r["problem_id"] for r in held[1]}
    assert not {r["path"] for r in train[1]} & {r["path"] for r in held[1]}
    assert len({r["path"] for r in train[1] + held[1]}) == 2 * N  # both splits share one directory
    # Scenes too, whatever the seeds: the same seed for both splits still shares nothing.
    same_seed = syn.load_manifest(syn.generate_dataset(str(tmp_path), 40, seed=0, split="heldout"))
    train_keys = {it["content_key"] for it in train[2]["items"]}
    for items in (held[2]["items"], same_seed["items"]):
        assert not train_keys & {it["content_key"] for it in items}
    for it in train[2]["items"]:
        assert it["content_key"] == syn.content_key(it["task"], it["scene"], syn.Geometry(64, 16))


# --- tokenizer corpus -------------------------------------------------------------------------


def test_text_corpus_covers_every_emitted_string(datasets):
    corpus = syn.text_corpus()
    assert corpus == sorted(set(corpus)) and all(isinstance(s, str) and s for s in corpus)
    vocab = set(corpus)
    emitted = set()
    for name in datasets:
        for row in datasets[name][1]:
            emitted |= {row["problem"], row["process"], row["solution"], *row["options"]}
    assert emitted <= vocab, sorted(emitted - vocab)[:5]
    # and a few hundred random samples of every task, without writing media
    geom = syn.Geometry(64, 16)
    for task in syn.TASKS.values():
        rng = np.random.default_rng(7)
        for _ in range(100):
            s = task.make(rng, geom)
            assert {s.problem, s.process, s.solution, *s.options} <= vocab


def test_template_refuses_values_outside_its_sets():
    t = syn.Template("the {color} one", color=("red", "blue"))
    assert t.render(color="red") == "the red one" and t.expand() == ["the red one", "the blue one"]
    with pytest.raises(ValueError, match="slot 'color'"):
        t.render(color="green")
    with pytest.raises(ValueError, match="placeholders"):
        syn.Template("the {colour} one", color=("red",))


# --- bad input and the command line -----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"size": 63}, "'size'"),
        ({"size": 32}, "'size'"),
        ({"frames": 4}, "'frames'"),
        ({"frames": 64, "size": 48}, "'frames' = 64 is too many"),
        ({"fps": 0}, "'fps'"),
        ({"n": 0}, "'n'"),
        ({"seed": -1}, "'seed'"),
        ({"split": "test"}, "'split'"),
        ({"tasks": ["motion_direction", "telepathy"]}, "telepathy"),
        ({"tasks": []}, "'tasks'"),
    ],
)
def test_bad_arguments_are_named_before_writing(tmp_path, kwargs, match):
    args = {"out_dir": str(tmp_path / "out"), "n": 3, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        syn.generate_dataset(**args)
    assert not (tmp_path / "out").exists()


def test_cli(tmp_path, capsys):
    path = syn.main(["--out", str(tmp_path), "--n", "4", "--seed", "5", "--split", "heldout",
                     "--tasks", "color_first", "appear_disappear", "--frames", "8", "--size", "56"])  # fmt: skip
    assert path == str(tmp_path / "heldout.json") and "4 samples" in capsys.readouterr().out
    rows = load_rows(path)
    assert [r["data_source"] for r in rows] == ["synthetic/color_first", "synthetic/appear_disappear"] * 2
    assert [r["problem_id"] for r in rows] == [syn.HELDOUT_ID_OFFSET + i for i in range(4)]
    assert len(_decode_pyav(_media(path, rows[0]["path"]))) == 8
    proc = subprocess.run(
        [sys.executable, "-m", "videor1.synthetic", "--out", str(tmp_path / "x"), "--n", "2", "--seed", "0",
         "--size", "63"],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    assert proc.returncode != 0 and "'size'" in proc.stderr
