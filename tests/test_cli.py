"""The s2fast command: help without torch, generate on every family (tiny pipelines saved as diffusers folders, the
embedded digits model), --compare, resumable --prompts, the split over two processes, every user error as one line
and a non-zero exit, and bench's table."""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import cli_models
import numpy as np
import pytest
import torch
from cli_models import quiet_and_offline  # noqa: F401  (autouse: no progress bars, no hub)
from PIL import Image

import s2fast
from s2fast import S2Config
from s2fast.cli import main, media
from s2fast.cli.methods import METHODS

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny DiT, SD3 and Flux pipelines saved with save_pretrained (SD3 and Flux with tokenizers and encoders)."""
    root = tmp_path_factory.mktemp("models")
    return {name: save(str(root / name)) for name, save in
            (("dit", cli_models.save_dit), ("sd3", cli_models.save_sd3), ("flux", cli_models.save_flux))}


def cli(*argv) -> int:
    """Run the command in this process; its exit status."""
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    return exit_.value.code


def error_lines(err: str):
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "error:" in line]


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def run_json(out):
    with open(os.path.join(out, "run.json")) as f:
        return json.load(f)


# --- help and option errors answer without torch ----------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["bench", "--help"], ["demo", "--help"],
                                  ["generate", "digits", "--prompt", "1", "--steps", "0", "--out", "x"],
                                  ["generate", "digits", "--out", "x"]])
def test_help_and_option_errors_import_no_torch(argv):
    code = ("import sys\nfrom s2fast.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('EXIT', e.code)\nprint('TORCH', 'torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd="/")
    assert "TORCH False" in r.stdout, r.stdout + r.stderr
    if "--help" in argv:
        assert "EXIT 0" in r.stdout and "usage:" in r.stdout
    else:  # argparse's exit status, one line naming the option
        assert "EXIT 2" in r.stdout and len(error_lines(r.stderr)) == 1 and r.stderr.count("\n") == 1, r.stderr


def test_console_script_is_declared_and_installed():
    r = subprocess.run([str(BIN / "s2fast"), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "generate" in r.stdout and "bench" in r.stdout and "demo" in r.stdout


def test_method_choices_come_from_the_registry(capsys):
    assert cli("generate", "--help") == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert name in out


# --- generate ----------------------------------------------------------------------------------------------------


def test_generate_digits_matches_the_library_and_records_the_run(tmp_path):
    out = tmp_path / "out"
    assert cli("generate", "digits", "--prompt", "3", "--steps", "3", "--omega", "0.5", "--seed", "5",
               "--guidance", "3", "--out", out) == 0
    run = run_json(out)
    assert {k: run["settings"][k] for k in ("model", "method", "omega", "steps", "guidance", "seed", "compare")} == \
        dict(model="digits", method="s2", omega=0.5, steps=3, guidance=3.0, seed=5, compare=False)
    assert run["versions"]["torch"] == torch.__version__ and run["device"]["device"] == "cpu"
    (record,) = run["images"]
    assert record["files"] == {"s2": "00000-3.png"} and os.path.exists(out / "00000-3.png")
    s2 = record["runs"]["s2"]
    assert len(s2["step_times_s"]) == 3 and s2["total_time_s"] >= sum(s2["step_times_s"]) > 0
    # The same image and masks as the library gives for the same request: the command changes nothing.
    from s2fast.digits import load_default_pipeline

    pipe = load_default_pipeline()
    s2fast.wrap(pipe, S2Config(omega=0.5, seed=5))
    image = pipe([3], guidance_scale=3.0, num_inference_steps=3, generator=torch.Generator().manual_seed(5)).images[0]
    assert s2["trace"] == [list(m) for m in s2fast.trace(pipe)] and len(s2["trace"]) == 3
    np.testing.assert_array_equal(png(out / "00000-3.png"), np.asarray(image.convert("RGB")))


def test_compare_samples_cfg_and_the_method_from_the_same_noise(tmp_path):
    out = tmp_path / "out"
    assert cli("generate", "digits", "--prompt", "7", "--steps", "3", "--compare", "--out", out) == 0
    record = run_json(out)["images"][0]
    assert set(record["files"]) == {"cfg", "s2", "compare"} and record["runs"]["cfg"]["trace"] is None
    cfg, s2, both = (png(out / record["files"][k]) for k in ("cfg", "s2", "compare"))
    # 28×28 digits upscaled 5× (nearest) to at least 128 px, under a label band, 4 px apart
    k, top = 5, media.LABEL_HEIGHT
    assert both.shape == (top + 28 * k, 2 * 28 * k + media.GAP, 3)
    big = lambda a: a.repeat(k, 0).repeat(k, 1)  # noqa: E731
    np.testing.assert_array_equal(both[top:, :28 * k], big(cfg))
    np.testing.assert_array_equal(both[top:, -28 * k:], big(s2))
    assert (both[:top] < 128).any()  # the labels are drawn (dark text on white)
    from s2fast.digits import load_default_pipeline

    pipe = load_default_pipeline()  # stock CFG from seed 0: the left image
    stock = pipe([7], num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images[0]
    np.testing.assert_array_equal(cfg, np.asarray(stock.convert("RGB")))
    assert not np.array_equal(cfg, s2)


def test_compare_sets_each_method_up_once_per_run(tmp_path, monkeypatch):
    # CFG runs on a sibling pipeline, so the S² one is wrapped once, not unwrapped and re-wrapped per prompt
    # (an unwrap releases its block graphs on a GPU, and every prompt would capture them again).
    import dataclasses

    attached = []
    for name in ("cfg", "s2"):
        method = METHODS[name]
        counting = (lambda m: lambda pipe, args: (attached.append((m.name, id(pipe))), m.attach(pipe, args)))(method)
        monkeypatch.setitem(METHODS, name, dataclasses.replace(method, attach=counting))
    prompts = tmp_path / "p.txt"
    prompts.write_text("1\n2\n3\n")
    assert cli("generate", "digits", "--prompts", prompts, "--steps", "2", "--compare", "--out", tmp_path / "o") == 0
    assert [m for m, _ in attached] == ["cfg", "s2"] and attached[0][1] != attached[1][1]
    assert len(run_json(tmp_path / "o")["images"]) == 3


def test_prompts_file_resumes_and_refuses_other_settings(tmp_path, capsys):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("0\n\n1\n2\n")
    assert cli("generate", "digits", "--prompts", prompts, "--steps", "2", "--out", out) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000-0.json", "00000-0.png", "00001-1.json", "00001-1.png", "00002-2.json", "00002-2.png",
                     "run.json"]
    kept = {n: (out / n).stat().st_mtime_ns for n in names if not n.startswith("00001")}
    (out / "00001-1.png").unlink()  # prompt 1 unfinished: its image is missing
    capsys.readouterr()
    assert cli("generate", "digits", "--prompts", prompts, "--steps", "2", "--out", out) == 0
    assert "2 of 3 prompts already done" in capsys.readouterr().out
    assert (out / "00001-1.png").exists()
    assert all((out / n).stat().st_mtime_ns == t for n, t in kept.items() if n != "run.json")
    assert [r["index"] for r in run_json(out)["images"]] == [0, 1, 2]
    # other settings in the same folder: refused, nothing written
    assert cli("generate", "digits", "--prompts", prompts, "--steps", "3", "--out", out) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "other settings" in line and "--out" in line


def test_offload_model_gives_the_same_image(tmp_path):
    # On the CPU, diffusers' model CPU offload installs its hooks with a CPU execution device: the path runs,
    # and S² under it must sample exactly what it samples without.
    for name, extra in (("plain", []), ("offload", ["--offload", "model"])):
        assert cli("generate", "digits", "--prompt", "4", "--steps", "2", "--device", "cpu", *extra,
                   "--out", tmp_path / name) == 0
    assert run_json(tmp_path / "offload")["settings"]["offload"] == "model"
    np.testing.assert_array_equal(png(tmp_path / "offload" / "00000-4.png"), png(tmp_path / "plain" / "00000-4.png"))


def test_dit_takes_class_names_from_id2label(tmp_path, folders):
    out = tmp_path / "out"
    assert cli("generate", folders["dit"], "--prompt", "golden retriever", "--steps", "2", "--compare",
               "--out", out) == 0
    record = run_json(out)["images"][0]
    assert run_json(out)["settings"]["pipeline"] == "DiTPipeline" and len(record["runs"]["s2"]["trace"]) == 2
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(folders["dit"])
    assert pipe.labels["golden retriever"] == 207
    stock = pipe([207], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    np.testing.assert_array_equal(png(out / record["files"]["cfg"]), np.asarray(stock.convert("RGB")))


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_text_pipelines_generate_from_their_own_tokenizers(tmp_path, folders, name):
    out = tmp_path / "out"
    assert cli("generate", folders[name], "--prompt", "a red fox", "--steps", "2", "--guidance", "4",
               "--height", "16", "--width", "16", "--compare", "--out", out) == 0
    run = run_json(out)
    record = run["images"][0]
    assert run["settings"]["guidance"] == 4.0 and len(record["runs"]["s2"]["trace"]) == 2
    assert png(out / record["files"]["cfg"]).shape == (16, 16, 3)
    # CFG through the command is the pipeline's own CFG (Flux: true CFG with an empty negative prompt)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folders[name])
    guidance = dict(true_cfg_scale=4.0, negative_prompt="") if name == "flux" else dict(guidance_scale=4.0)
    stock = pipe("a red fox", num_inference_steps=2, height=16, width=16, generator=torch.Generator().manual_seed(0),
                 **guidance).images[0]
    np.testing.assert_array_equal(png(out / record["files"]["cfg"]), np.asarray(stock.convert("RGB")))


# --- errors a user can cause: one line, non-zero exit, no traceback ----------------------------------------------


def _pipeline_folder(tmp_path, name, class_name, **index):
    path = tmp_path / name
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": class_name, **index}))
    return path


def _unsupported_folder(tmp_path):
    return _pipeline_folder(tmp_path, "sd15", "StableDiffusionPipeline")


@pytest.mark.parametrize("case, argv, words", [
    ("missing folder", ["./no/such/model", "--prompt", "x"], "no model folder"),
    ("not a pipeline", ["{tmp}", "--prompt", "x"], "no model_index.json"),
    ("unsupported", ["{unsupported}", "--prompt", "x"], "does not support"),
    # known from model_index.json alone: these folders hold no weights, so a check after loading would read
    # "cannot load" instead
    ("image-to-image without an image", ["{img2img}", "--prompt", "x"], "needs an input image"),
    ("inpainting without a mask", ["{inpaint}", "--prompt", "x", "--image", "{png}"], "needs a mask"),
    ("an image for text-to-image", ["{sd3}", "--prompt", "x", "--image", "{png}"], "takes no image"),
    ("two images for one", ["{img2img}", "--prompt", "x", "--image", "{png}", "--image", "{png}"], "takes 1 input"),
    ("strength for text-to-image", ["{sd3}", "--prompt", "x", "--strength", "0.5"], "takes no strength"),
    ("frames on an image model", ["{sd3}", "--prompt", "x", "--frames", "5"], "makes images, not videos"),
    ("second λ on one expert", ["{wan21}", "--prompt", "x", "--guidance-2", "3"], "has one expert"),
    ("video-to-video without a video", ["{v2v}", "--prompt", "x"], "needs an input video"),
    ("missing image file", ["{img2img}", "--prompt", "x", "--image", "{tmp}/none.png"], "no such file"),
    ("not an image", ["{img2img}", "--prompt", "x", "--image", "{empty}"], "not an image"),
    ("digit out of range", ["digits", "--prompt", "12"], "outside 0..9"),
    ("digit by name", ["digits", "--prompt", "seven"], "class id"),
    ("negative prompt on digits", ["digits", "--prompt", "1", "--negative-prompt", "x"], "--negative-prompt"),
    ("frames on images", ["digits", "--prompt", "1", "--frames", "8"], "--frames"),
    ("missing prompts file", ["digits", "--prompts", "{tmp}/none.txt"], "cannot read --prompts"),
    ("empty prompts file", ["digits", "--prompts", "{empty}"], "holds no prompt"),
    ("bad device", ["digits", "--prompt", "1", "--device", "nonsense"], "--device"),
    ("out is a file", ["digits", "--prompt", "1", "--out", "{empty}"], "cannot create --out"),
])
def test_user_errors_end_with_one_line(tmp_path, capsys, case, argv, words):
    (tmp_path / "empty.txt").write_text("\n\n")
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")
    subs = dict(tmp=tmp_path, unsupported=_unsupported_folder(tmp_path), empty=tmp_path / "empty.txt",
                png=tmp_path / "in.png", sd3=_pipeline_folder(tmp_path, "sd3", "StableDiffusion3Pipeline"),
                img2img=_pipeline_folder(tmp_path, "img2img", "StableDiffusion3Img2ImgPipeline"),
                inpaint=_pipeline_folder(tmp_path, "inpaint", "StableDiffusion3InpaintPipeline"),
                wan21=_pipeline_folder(tmp_path, "wan21", "WanPipeline", transformer_2=[None, None]),
                v2v=_pipeline_folder(tmp_path, "v2v", "WanVideoToVideoPipeline"))
    argv = [a.format(**subs) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert cli("generate", *argv, "--steps", "2") == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("s2fast: error:") and words in line, line


def test_dit_unknown_class_name(tmp_path, folders, capsys):
    assert cli("generate", folders["dit"], "--prompt", "unicorn", "--out", tmp_path / "out") == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "unknown class name 'unicorn'" in line


def test_pipeline_refusal_is_one_line(tmp_path, folders, capsys):
    assert cli("generate", folders["sd3"], "--prompt", "x", "--height", "17", "--steps", "2",
               "--out", tmp_path / "out") == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "StableDiffusion3Pipeline refused the options" in line and "divisible" in line


def test_unknown_hub_model_offline_is_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TQDM_DISABLE="1")
    r = subprocess.run([str(BIN / "s2fast"), "generate", "nobody/no-such-model", "--prompt", "x", "--out",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1, r.stderr
    (line,) = error_lines(r.stderr)
    assert "cannot load 'nobody/no-such-model': it is not in the local cache, and HF_HUB_OFFLINE is set" in line
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").rglob("*.safetensors"))


def test_unknown_hub_model_with_the_hub_unreachable_says_so(tmp_path, monkeypatch, capsys):
    # Online mode with a hub endpoint nothing answers (a closed local port): huggingface_hub would retry for half
    # a minute, then blame a missing model_index.json; the command says what is wrong, in one line.
    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert cli("generate", "nobody/no-such-model", "--prompt", "x", "--out", tmp_path / "out") == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "it is not in the local cache, and the hub cannot be reached" in line, line
    assert not (tmp_path / "out").exists()


def test_out_of_memory_keeps_the_finished_part_of_a_batch(tmp_path, capsys, monkeypatch):
    from s2fast.digits import DigitsFlowPipeline

    original, calls = DigitsFlowPipeline.__call__, []

    @functools.wraps(original)  # the command reads the call's defaults from its signature
    def failing_on_the_second_prompt(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DigitsFlowPipeline, "__call__", failing_on_the_second_prompt)
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text("1\n2\n3\n")
    assert cli("generate", "digits", "--prompts", prompts, "--steps", "2", "--out", out) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "out of memory" in line and "00001-2" in line
    assert (out / "00000-1.png").exists() and not (out / "00001-2.png").exists()
    run = run_json(out)
    assert run["finished"] == 1 and run["prompts"] == 3


# --- scale-out: two CPU processes under torchrun, accelerate's PartialState splits the prompts -------------------


def test_torchrun_two_processes_write_each_prompt_once(tmp_path):
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text("".join(f"{i}\n" for i in range(5)))
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    r = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "s2fast", "generate",
                        "digits", "--prompts", str(prompts), "--steps", "2", "--out", str(out), "--device", "cpu"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = run_json(out)
    assert run["device"]["processes"] == 2
    by_process = {0: [], 1: []}
    for record in run["images"]:
        by_process[record["process"]].append(record["index"])
    assert sorted(by_process[0] + by_process[1]) == list(range(5)) and by_process[0] and by_process[1]
    assert not list(out.glob("*.tmp"))
    # each process sampled what one process would: the same seed per prompt. Under torchrun each process runs
    # one thread, whose fp32 sums round differently from two threads': at most one 8-bit level apart.
    single = tmp_path / "single"
    assert cli("generate", "digits", "--prompts", prompts, "--steps", "2", "--out", single) == 0
    for record in run["images"]:
        name = record["files"]["s2"]
        diff = np.abs(png(out / name).astype(int) - png(single / name).astype(int)).max()
        assert diff <= 1, (name, diff)


# --- bench -------------------------------------------------------------------------------------------------------


def test_bench_table_has_every_case(tmp_path, capsys):
    result_file = tmp_path / "bench.json"
    assert cli("bench", "digits", "--steps", "3", "--rounds", "2", "--json", result_file) == 0
    out = capsys.readouterr().out
    cases = ["stock CFG", "s2fast CFG", "naive three-pass S²", "s2fast S²", "s2fast SGG"]
    table = [line for line in out.splitlines() if any(line.startswith(c) for c in cases)]
    assert [line.split("  ")[0] for line in table] == cases
    result = json.loads(result_file.read_text())
    assert list(result["cases"]) == cases
    rows = result["cases"]
    assert rows["stock CFG"]["ratio"] == 1.0 and rows["stock CFG"]["block_row_floor"] == 1.0
    assert all(len(r["ratios"]) == 2 for r in rows.values())
    # the floors follow the masks drawn: the naive version recomputes the prefix the fork reuses
    assert len(result["masks"]) == 3
    assert 1 < rows["s2fast S²"]["block_row_floor"] <= rows["naive three-pass S²"]["block_row_floor"]
    assert "2 rounds only" in rows["s2fast S²"]["warning"] and "!! s2fast S²" in out
    assert rows["s2fast S²"]["peak_memory_mib"] is None  # CPU: no allocator statistics
    assert result["s2_difference"] < 1e-5 < result["s2_effect"]
    assert "columns: ms/step = the case's median step" in out  # says what each column is


def test_bench_times_sgg_where_its_blocks_exist(capsys):
    assert cli("bench", "digits", "--steps", "4", "--rounds", "1", "--skip-blocks", "2,3") == 0
    out = capsys.readouterr().out
    (row,) = [line for line in out.splitlines() if line.startswith("s2fast SGG")]
    # CFG on steps 0-1 (12 rows each), cond + skip rows from block 2 less 2 blocks on steps 2-3 (6 + 2): 40 of 48
    from s2fast.cli.bench import sgg_floor

    args = type("Args", (), {"skip_blocks": (2, 3), "skip_scale": 3.0, "steps": 4})()
    assert sgg_floor(args, 6) == pytest.approx(40 / 48)
    # SD3-medium's 7,8,9 on the 6-block model: no such blocks, no SGG row, and the table says why
    assert cli("bench", "digits", "--steps", "3", "--rounds", "1", "--skip-blocks", "7,8,9") == 0
    out = capsys.readouterr().out
    assert not [line for line in out.splitlines() if line.startswith("s2fast SGG")]
    assert "s2fast SGG not timed: --skip-blocks 7,8,9 names blocks the model's 6" in out


def test_sgg_default_skip_blocks_follow_the_depth():
    from s2fast.cli.methods import default_skip_blocks

    # SD3-medium's own set at its depth; the same position and share elsewhere, never block 0, at least one block
    assert default_skip_blocks(24) == (7, 8, 9)
    assert default_skip_blocks(6) == (2,) and default_skip_blocks(4) == (1,) and default_skip_blocks(38) == (11, 12, 13, 14, 15)
    assert all(0 < min(default_skip_blocks(d)) and max(default_skip_blocks(d)) < d for d in range(2, 80))


def test_bench_refuses_too_few_steps(capsys):
    assert cli("bench", "digits", "--steps", "2") == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "--steps must be at least 3" in line


def test_demo_subcommand_is_the_demo(capsys):
    # routed to the demo's own parser (the demo itself runs in test_digits_embedded.py), under its own name
    assert cli("demo", "--steps", "1") == 2
    assert "--steps must be at least 2" in capsys.readouterr().err
    assert cli("demo", "--help") == 0
    assert capsys.readouterr().out.startswith("usage: s2fast demo")


def test_bench_on_a_pipeline_without_step_callbacks(tmp_path, folders, capsys):
    # DiTPipeline takes no callback_on_step_end: steps are stamped after each transformer call instead
    result_file = tmp_path / "bench.json"
    assert cli("bench", folders["dit"], "--prompt", "goldfish", "--steps", "3", "--rounds", "1",
               "--json", result_file) == 0
    result = json.loads(result_file.read_text())
    assert result["pipeline"] == "DiTPipeline" and result["blocks"] == 4 and len(result["masks"]) == 3
    assert all(r["ms_per_step"] > 0 and len(r["ratios"]) == 1 for r in result["cases"].values())
    assert "1 round only" in result["cases"]["s2fast S²"]["warning"]
    assert result["s2_difference"] < 1e-5


def test_method_cfg_alone_is_the_stock_pipeline(tmp_path):
    out = tmp_path / "out"
    assert cli("generate", "digits", "--prompt", "5", "--method", "cfg", "--steps", "2", "--out", out) == 0
    record = run_json(out)["images"][0]
    assert record["files"] == {"cfg": "00000-5.png"} and record["runs"]["cfg"]["trace"] is None
    from s2fast.digits import load_default_pipeline

    stock = load_default_pipeline()([5], num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    np.testing.assert_array_equal(png(out / "00000-5.png"), np.asarray(stock.convert("RGB")))


def test_method_sgg_matches_the_library(tmp_path):
    out = tmp_path / "out"
    assert cli("generate", "digits", "--prompt", "4", "--steps", "4", "--method", "sgg", "--skip-blocks", "2,3",
               "--skip-scale", "2", "--out", out) == 0
    run = run_json(out)
    assert run["settings"]["method"] == "sgg" and run["settings"]["skip_blocks"] == [2, 3]
    record = run["images"][0]
    from s2fast.digits import load_default_pipeline

    pipe = load_default_pipeline()
    s2fast.wrap(pipe, s2fast.SGGConfig(skip_blocks=(2, 3), skip_scale=2.0))
    image = pipe([4], num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    # CFG on steps 0-1, the skip pass on steps 2-3: the trace names the skipped blocks where it ran
    assert record["runs"]["sgg"]["trace"] == [list(m) for m in s2fast.trace(pipe)] == [[], [], [2, 3], [2, 3]]
    np.testing.assert_array_equal(png(out / record["files"]["sgg"]), np.asarray(image.convert("RGB")))
    # a resumed run with the same settings finds the image done (the file is not rewritten)
    written = os.path.getmtime(out / record["files"]["sgg"])
    assert cli("generate", "digits", "--prompt", "4", "--steps", "4", "--method", "sgg", "--skip-blocks", "2,3",
               "--skip-scale", "2", "--out", out) == 0
    assert os.path.getmtime(out / record["files"]["sgg"]) == written


def test_method_sgg_with_blocks_the_model_lacks_is_one_line(tmp_path, capsys):
    # 7,8,9 are SD3-medium's; the digits DiT has 6 blocks. The folder the run created is not left behind empty.
    out = tmp_path / "out"
    assert cli("generate", "digits", "--prompt", "4", "--steps", "2", "--method", "sgg", "--skip-blocks", "7,8,9",
               "--out", out) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "--method sgg" in line and "skip_blocks" in line
    assert not out.exists()


def test_method_sgg_defaults_on_digits_and_an_s2_record_carries_no_sgg_settings(tmp_path):
    assert cli("generate", "digits", "--prompt", "4", "--steps", "4", "--method", "sgg", "--out", tmp_path / "sgg") == 0
    assert run_json(tmp_path / "sgg")["settings"]["skip_blocks"] == [2]  # 7,8,9 of 24 scaled to 6 blocks
    assert cli("generate", "digits", "--prompt", "4", "--steps", "2", "--out", tmp_path / "s2") == 0
    settings = run_json(tmp_path / "s2")["settings"]
    assert "skip_blocks" not in settings and "skip_scale" not in settings


def test_cache_and_correction_reuse_match_the_library_and_are_recorded(tmp_path):
    out = tmp_path / "out"
    assert cli("generate", "digits", "--prompt", "3", "--steps", "10", "--omega", "0.5", "--cache", "0.3",
               "--correction-every", "2", "--out", out) == 0
    run = run_json(out)
    assert run["settings"]["cache"] == 0.3 and run["settings"]["correction_every"] == 2
    (record,) = run["images"]
    from s2fast.digits import load_default_pipeline

    pipe = load_default_pipeline()
    s2fast.wrap(pipe, S2Config(omega=0.5, seed=0, cache=s2fast.BlockCache(threshold=0.3), correction_every=2))
    image = pipe([3], num_inference_steps=10, generator=torch.Generator().manual_seed(0)).images[0]
    steps = [[r.blocks, r.correction] for r in s2fast.trace_steps(pipe)]
    assert record["runs"]["s2"]["steps"] == steps
    assert ["cached", "reused"] in steps  # the options did something (else the equality says little)
    np.testing.assert_array_equal(png(out / "00000-3.png"), np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("argv, words", [
    (["--method", "cfg", "--cache", "0.1"], "apply to --method s2 or sgg"),
    (["--method", "cfg", "--correction-every", "2"], "apply to --method s2 or sgg"),
    (["--method", "sgg", "--correction-every", "2"], "applies to --method s2, not sgg"),
    (["--cache", "-0.5"], "--cache"),
    (["--correction-every", "0"], "--correction-every"),
])
def test_cache_option_errors_are_one_line(tmp_path, capsys, argv, words):
    assert cli("generate", "digits", "--prompt", "1", "--out", tmp_path / "out", *argv) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert words in line, line
    assert not (tmp_path / "out").exists()


# --- writing --out: every failure one line, nothing finished lost ----------------------------------------------


READ_ONLY = PermissionError(13, "Permission denied")


def _refuse_writes_under(monkeypatch, folder, error=READ_ONLY, when=lambda path: True):
    """Writes under ``folder`` fail with ``error`` where ``when(path)``, as on a read-only folder (root ignores the
    permission bits, so the test stands in for the file system at the calls the command makes)."""
    import builtins

    folder, real_open = str(folder), builtins.open
    refused = lambda path: str(path).startswith(folder) and when(str(path))  # noqa: E731

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and refused(file):
            raise type(error)(error.errno, error.strerror, str(file))
        return real_open(file, mode, *args, **kwargs)

    def path_call(real):
        def call(path, *args, **kwargs):
            if refused(path) and (real is os.link or os.path.lexists(path)):  # a missing file: ENOENT, as any fs
                raise type(error)(error.errno, error.strerror, str(path))
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(builtins, "open", open_)
    for name in ("unlink", "link", "replace", "rmdir"):
        monkeypatch.setattr(os, name, path_call(getattr(os, name)))


def test_read_only_out_is_one_line_before_loading(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    _refuse_writes_under(monkeypatch, out)
    assert cli("generate", "digits", "--prompt", "3", "--steps", "2", "--out", out) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert f"cannot write in --out {out}: Permission denied" in line
    assert list(out.iterdir()) == []


def test_a_failed_write_mid_batch_is_one_line_and_keeps_what_finished(tmp_path, capsys, monkeypatch):
    # the disk fills at prompt 1's picture: prompt 0 stays, with its record, and run.json lists it; the error
    # handler's own writes failing too must not add a second message
    import errno

    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_text("1\n2\n")
    _refuse_writes_under(monkeypatch, out, OSError(errno.ENOSPC, "No space left on device"),
                         when=lambda path: "00001-2" in path)
    assert cli("generate", "digits", "--prompts", prompts, "--steps", "2", "--out", out) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "cannot write" in line and "00001-2" in line and "No space left on device" in line
    assert (out / "00000-1.png").exists() and (out / "00000-1.json").exists()
    assert run_json(out)["finished"] == 1
    monkeypatch.undo()
    # and when run.json itself cannot be written either, the first failure is still the one line shown
    _refuse_writes_under(monkeypatch, out, OSError(errno.ENOSPC, "No space left on device"),
                         when=lambda path: "00001-2" in path or "run.json" in path)
    assert cli("generate", "digits", "--prompts", prompts, "--steps", "2", "--out", out) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "00001-2" in line and (out / "00000-1.png").exists()


def test_a_byte_order_mark_is_not_part_of_the_first_prompt(tmp_path):
    prompts, out = tmp_path / "p.txt", tmp_path / "out"
    prompts.write_bytes("\ufeff3\n5\n".encode("utf-8"))  # as Windows editors save UTF-8
    assert cli("generate", "digits", "--prompts", prompts, "--steps", "2", "--out", out) == 0
    assert [r["prompt"] for r in run_json(out)["images"]] == ["3", "5"]
    assert (out / "00000-3.png").exists()


def test_another_run_writing_the_same_out_is_named_as_such(tmp_path, capsys, monkeypatch):
    # a second run writes prompt 0's picture while this one samples it: this run refuses to overwrite, and says
    # that another run (not another process of this one) wrote it
    from s2fast.digits import DigitsFlowPipeline

    out, original = tmp_path / "out", DigitsFlowPipeline.__call__

    @functools.wraps(original)
    def meanwhile_another_run_writes(self, *args, **kwargs):
        (out / "00000-4.png").write_bytes(b"the other run's picture")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DigitsFlowPipeline, "__call__", meanwhile_another_run_writes)
    assert cli("generate", "digits", "--prompt", "4", "--steps", "2", "--out", out) == 1
    (line,) = error_lines(capsys.readouterr().err)
    assert "another s2fast run is writing to the same --out" in line and "another process of this run" not in line
    assert (out / "00000-4.png").read_bytes() == b"the other run's picture"
