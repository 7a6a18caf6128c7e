"""The command on image- and video-input pipelines and on Wan video: tiny pipelines built from configs and saved as
diffusers folders. Each output equals what s2fast.wrap gives on the same pipeline with the same request (pixels of
PNGs and stills exactly; an MP4, which is lossy, decodes to the same frames as diffusers' export_to_video of the
library's frames); --compare and resume work for video; a missing video extra is one line."""

import functools
import json
import os

import cli_models
import imageio
import numpy as np
import pytest
import torch
from cli_models import quiet_and_offline  # noqa: F401  (autouse: no progress bars, no hub)
from PIL import Image
from test_cli import cli, error_lines, png, run_json

import s2fast
from s2fast import S2Config
from s2fast.cli import media

SIZE = ["--height", "32", "--width", "32"]   # Wan: 4 × 4 latents, a multiple of the MP4's 16-pixel blocks
FRAMES = 5                                   # Wan: 4k + 1; 2 latent frames


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("media-models")
    sd3, flux = cli_models.save_sd3(str(root / "sd3")), cli_models.save_flux(str(root / "flux"))
    return {
        "sd3-img2img": cli_models.save_as(sd3, "StableDiffusion3Img2ImgPipeline", str(root / "sd3-img2img")),
        "sd3-inpaint": cli_models.save_as(sd3, "StableDiffusion3InpaintPipeline", str(root / "sd3-inpaint")),
        "flux-img2img": cli_models.save_as(flux, "FluxImg2ImgPipeline", str(root / "flux-img2img")),
        "kontext": cli_models.save_as(flux, "FluxKontextPipeline", str(root / "kontext")),
        "wan21": cli_models.save_wan(str(root / "wan21")),
        "wan22": cli_models.save_wan(str(root / "wan22"), experts=2, boundary_ratio=0.5),
        "i2v": cli_models.save_wan(str(root / "i2v"), image_to_video=True),
        "v2v": cli_models.save_wan(str(root / "v2v"), video_to_video=True),
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A random RGB image, an inpainting mask (white right half) and a 5-frame input video, as files."""
    root = tmp_path_factory.mktemp("media-inputs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "image.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask).save(root / "mask.png")
    frames = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(FRAMES)]
    media.export_frames(frames, str(root / "video.mp4"), fps=16)
    return {"image": root / "image.png", "mask": root / "mask.png", "video": root / "video.mp4"}


def library(folder, prompt, steps, *, omega=0.25, seed=0, **call):
    """What s2fast.wrap gives on the pipeline saved at ``folder`` for the request: a PIL image or a video's frames."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    s2fast.wrap(pipe, S2Config(omega=omega, seed=seed))
    result = pipe(prompt=prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="pil",
                  **call)
    return result.frames[0] if hasattr(result, "frames") else result.images[0]


def decoded(path) -> np.ndarray:
    with imageio.get_reader(str(path)) as reader:
        return np.stack([np.asarray(f) for f in reader])


def assert_video_equals(out, record, key, frames, tmp_path, fps=16):
    """The command's MP4 of ``key`` holds ``frames`` (the library's): its still equals the library's still pixel
    for pixel, and the MP4 decodes to the same frames as an MP4 of the library's frames."""
    np.testing.assert_array_equal(png(out / record["files"][f"{key}-still"]), np.asarray(media.still(frames)))
    video = decoded(out / record["files"][key])
    assert video.shape == (len(frames), frames[0].height, frames[0].width, 3)
    reference = tmp_path / f"reference-{key}.mp4"
    media.export_frames(frames, str(reference), fps=fps)  # the encoder's rate control depends on the fps
    np.testing.assert_array_equal(video, decoded(reference))


def test_wan21_text_to_video_writes_an_mp4_equal_to_wrap(tmp_path, folders):
    out = tmp_path / "out"
    assert cli("generate", folders["wan21"], "--prompt", "a red fox", "--frames", FRAMES, *SIZE, "--steps", "2",
               "--guidance", "4", "--out", out) == 0
    run = run_json(out)
    assert run["settings"]["fps"] == 16 and run["settings"]["frames"] == FRAMES
    (record,) = run["images"]
    assert record["files"] == {"s2": "00000-a-red-fox.mp4", "s2-still": "00000-a-red-fox.png"}
    assert len(record["runs"]["s2"]["trace"]) == 2
    frames = library(folders["wan21"], "a red fox", 2, guidance_scale=4.0, num_frames=FRAMES, height=32, width=32)
    assert_video_equals(out, record, "s2", frames, tmp_path)


def test_wan22_two_experts_compare_and_resume(tmp_path, folders, capsys):
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text("a red fox\na cat\n")
    argv = ["generate", folders["wan22"], "--prompts", prompts, "--frames", FRAMES, *SIZE, "--steps", "2",
            "--guidance", "4", "--guidance-2", "2", "--compare", "--fps", "8", "--out", out]
    assert cli(*argv) == 0
    run = run_json(out)
    record = run["images"][0]
    assert run["settings"]["guidance_2"] == 2.0 and run["settings"]["fps"] == 8
    assert set(record["files"]) == {"cfg", "cfg-still", "s2", "s2-still", "compare", "compare-still"}
    frames = library(folders["wan22"], "a red fox", 2, guidance_scale=4.0, guidance_scale_2=2.0, num_frames=FRAMES,
                     height=32, width=32)
    assert_video_equals(out, record, "s2", frames, tmp_path, fps=8)
    # the compare MP4: every frame holds both methods side by side, labelled, padded to 16-pixel blocks
    both = decoded(out / record["files"]["compare"])
    assert both.shape[0] == FRAMES and both.shape[1] % 16 == 0 and both.shape[2] % 16 == 0
    assert both.shape[2] >= 2 * 32 * media.upscale_factor(frames)
    # resume: prompt 1 lost its compare video; prompt 0 stays as it was, prompt 1 is sampled again, the same
    kept = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("00000")}
    still_1 = png(out / "00001-a-cat-s2.png")
    (out / "00001-a-cat-compare.mp4").unlink()
    capsys.readouterr()
    assert cli(*argv) == 0
    assert "1 of 2 prompts already done" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("00000")} == kept
    np.testing.assert_array_equal(png(out / "00001-a-cat-s2.png"), still_1)
    assert [r["index"] for r in run_json(out)["images"]] == [0, 1]


def test_wan_image_to_video_takes_an_image(tmp_path, folders, inputs):
    out = tmp_path / "out"
    assert cli("generate", folders["i2v"], "--prompt", "a red fox", "--image", inputs["image"], "--frames", FRAMES,
               *SIZE, "--steps", "2", "--out", out) == 0
    record = run_json(out)["images"][0]
    frames = library(folders["i2v"], "a red fox", 2, image=Image.open(inputs["image"]).convert("RGB"),
                     num_frames=FRAMES, height=32, width=32)
    assert_video_equals(out, record, "s2", frames, tmp_path)


def test_wan_video_to_video_takes_a_video(tmp_path, folders, inputs):
    from diffusers.utils import load_video

    out = tmp_path / "out"
    assert cli("generate", folders["v2v"], "--prompt", "a red fox", "--video", inputs["video"], "--strength", "0.7",
               *SIZE, "--steps", "3", "--out", out) == 0
    record = run_json(out)["images"][0]
    frames = library(folders["v2v"], "a red fox", 3, video=load_video(str(inputs["video"])), strength=0.7,
                     height=32, width=32)
    assert_video_equals(out, record, "s2", frames, tmp_path)


@pytest.mark.parametrize("name, extra", [("sd3-img2img", ["--strength", "0.7"]),
                                         ("sd3-inpaint", ["--mask", "{mask}", "--strength", "0.9"]),
                                         ("flux-img2img", ["--strength", "0.7"])])
def test_image_input_pipelines_equal_wrap(tmp_path, folders, inputs, name, extra):
    out = tmp_path / "out"
    extra = [a.format(mask=inputs["mask"]) for a in extra]
    assert cli("generate", folders[name], "--prompt", "a red fox", "--image", inputs["image"], *extra, "--steps", "3",
               "--guidance", "4", "--height", "32", "--width", "32", "--out", out) == 0
    record = run_json(out)["images"][0]
    call = dict(image=Image.open(inputs["image"]).convert("RGB"), height=32, width=32)
    if name.startswith("flux"):  # true CFG with an empty negative prompt, as the command calls Flux
        call.update(true_cfg_scale=4.0, negative_prompt="", strength=0.7)
    else:
        call.update(guidance_scale=4.0, strength=0.7 if name == "sd3-img2img" else 0.9)
    if name == "sd3-inpaint":
        call["mask_image"] = Image.open(inputs["mask"]).convert("L")
    image = library(folders[name], "a red fox", 3, **call)
    np.testing.assert_array_equal(png(out / record["files"]["s2"]), np.asarray(image.convert("RGB")))


def test_missing_video_extra_is_one_line_before_loading(tmp_path, monkeypatch, capsys):
    # the folder holds no weights: a check after loading would read "cannot load" instead
    folder = tmp_path / "wan"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    monkeypatch.setitem(__import__("sys").modules, "imageio_ffmpeg", None)  # import fails as if not installed
    assert cli("generate", folder, "--prompt", "x", "--out", tmp_path / "out") == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "pip install s2fast[video]" in line
    assert not os.path.exists(tmp_path / "out")


@pytest.fixture
def small_kontext(monkeypatch):
    """Kontext at the test's size. Stock Kontext resizes the input image to the preferred resolution nearest its
    aspect ratio (PREFERRED_KONTEXT_RESOLUTIONS, all about a megapixel) and the output to ``max_area`` (1024²) at the
    asked aspect ratio: minutes on a CPU even with tiny models. The module's list becomes one 32 × 32 entry and
    ``max_area`` defaults to 32², for the command and the library alike (both run in this process); the command
    still passes what it passes users, and the pipeline still resizes by its own rule."""
    from diffusers import FluxKontextPipeline
    from diffusers.pipelines.flux import pipeline_flux_kontext

    monkeypatch.setattr(pipeline_flux_kontext, "PREFERRED_KONTEXT_RESOLUTIONS", [(32, 32)])
    stock = FluxKontextPipeline.__call__

    @functools.wraps(stock)  # the signature the command reads is the stock one
    def small_max_area(self, *args, **kwargs):
        kwargs.setdefault("max_area", 32 * 32)
        return stock(self, *args, **kwargs)

    monkeypatch.setattr(FluxKontextPipeline, "__call__", small_max_area)


def test_flux_kontext_takes_an_image_equal_to_wrap(tmp_path, folders, inputs, small_kontext):
    out = tmp_path / "out"
    assert cli("generate", folders["kontext"], "--prompt", "a red fox", "--image", inputs["image"], "--steps", "2",
               "--guidance", "4", "--height", "32", "--width", "32", "--out", out) == 0
    record = run_json(out)["images"][0]
    image = library(folders["kontext"], "a red fox", 2, image=Image.open(inputs["image"]).convert("RGB"), height=32,
                    width=32, true_cfg_scale=4.0, negative_prompt="")  # true CFG, as the command calls Flux
    assert image.size == (32, 32)
    np.testing.assert_array_equal(png(out / record["files"]["s2"]), np.asarray(image.convert("RGB")))
