"""``s2fast ui``: a local page that samples CFG and S² (or SGG) from the same noise and shows them side by side,
with the per-step times, the masks drawn and a sweep over ω from one seed.

The page runs the command's own code: its inputs become ``s2fast generate`` options, parsed and checked by the
command's parser (so a bad value reads as the command's message), and each sample is drawn by
``generate.sample`` on pipelines set up by ``generate.method_pipelines``, as ``s2fast generate --compare`` draws
them. The page listens on 127.0.0.1 only, makes no share link and sends no analytics; the browser loads
nothing but the page's own files.
"""

from __future__ import annotations

import argparse
import math
import os
import threading
from typing import Dict, List, Optional, Sequence

from .errors import UserError
from .families import ModelInfo
from .methods import default_skip_blocks

METHOD_CHOICES = (("S²", "s2"), ("SGG", "sgg"))
DISPLAY_SIDE = 256          # small images (digits: 28×28) are shown upscaled, nearest neighbour, to at least this
SWEEP_DEFAULT = "0, 0.1, 0.25, 0.5, 1"
SWEEP_MAX = 8               # values per sweep: each is one full pipeline call


def import_gradio():
    """gradio, with its analytics and version check off (both would reach out to the network)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError:
        raise UserError("s2fast ui needs gradio: pip install 's2fast[ui]'") from None
    return gradio


class Page:
    """What the page does, without gradio: turn its inputs into the command's options and sample.

    One pipeline serves every request, one request at a time (a wrapped pipeline holds per-call state)."""

    def __init__(self, pipe, family, device, model: str, dtype: str, offload: Optional[str]):
        from s2fast.adapters import adapter_for

        self.pipe, self.family, self.device = pipe, family, device
        self.model, self.dtype, self.offload = model, dtype, offload
        self.num_blocks = adapter_for(pipe).num_blocks(pipe.transformer)
        self.lock = threading.Lock()

    # --- inputs -> the command's options --------------------------------------------------------------------------

    def options(self, prompt, guidance, omega, drop_ratio, steps, seed, method, skip_blocks, skip_scale) -> argparse.Namespace:
        """The ``s2fast generate`` options for these inputs, through the command's parser and checks; UserError with
        the parser's message for a bad value. A blank λ or steps means the pipeline's default."""
        from . import _check, build_parser

        argv = ["generate", self.model, "--prompt", str(prompt or ""), "--out", "-", "--method", str(method),
                "--dtype", self.dtype]
        for flag, value in (("--guidance", guidance), ("--omega", omega), ("--drop-ratio", drop_ratio),
                            ("--steps", steps), ("--seed", seed), ("--skip-blocks", skip_blocks),
                            ("--skip-scale", skip_scale)):
            if value is not None and str(value).strip() != "":
                argv += [flag, _number_text(value)]
        if self.offload:
            argv += ["--offload", self.offload]
        parser = build_parser()
        generate = parser.subcommands["generate"]

        def refuse(message: str):
            raise UserError(message.replace("argument ", "", 1))

        generate.error = refuse  # the parser's one-line message, raised instead of exiting
        args = parser.parse_args(argv)
        _check(parser, args)
        if not args.prompt.strip():
            raise UserError("the prompt is empty" + (" (give a class: a name or an id)" if self.family.class_conditional
                                                     else ""))
        info = ModelInfo.of_pipeline(self.model, self.pipe)
        self.family.check_options(info, args)
        self.family.condition(info, args.prompt)  # a bad class name or id fails here, before any sampling
        return args

    # --- sampling: the command's path ---------------------------------------------------------------------------

    def sample(self, args: argparse.Namespace, methods: List[str]) -> Dict:
        """Each of ``methods`` from the same noise (``args.seed``), as ``s2fast generate`` samples one prompt."""
        import torch

        from .generate import method_pipelines, sample

        with self.lock, torch.no_grad():  # gradio runs handlers in worker threads, where grad mode is on again
            pipes = method_pipelines(self.pipe, methods, args)
            return sample(pipes, self.family, args, args.prompt, args.seed, self.device, where=" in this request")

    def compare(self, *inputs):
        """CFG and the method from the same noise: (cfg image, method image, times, masks image, status)."""
        args = self.options(*inputs)
        runs = self.sample(args, ["cfg", args.method])
        cfg, other = runs["cfg"], runs[args.method]
        label = _label(args.method)
        status = (f"{type(self.pipe).__name__}, prompt {args.prompt!r}, seed {args.seed}: CFG (left) and {label} "
                  f"(right) from the same noise, λ {self.family.guidance(self.pipe, args):g}, "
                  f"{self.family.steps(self.pipe, args)} steps, {_scale_text(args)}.")
        return (cfg.output, other.output, timing_table(label, cfg, other),
                masks_image(other.trace, self.num_blocks), status)

    def sweep(self, *inputs_and_values):
        """The method at each scale of the sweep (S²: ω; SGG: its skip scale), all from the inputs' seed:
        [(image, caption)]."""
        *inputs, values_text = inputs_and_values
        args = self.options(*inputs)
        values = sweep_values(values_text)
        scale = "omega" if args.method == "s2" else "skip_scale"
        shown = []
        for value in values:
            setattr(args, scale, value)
            run = self.sample(args, [args.method])[args.method]
            shown.append((run.output, f"{'ω' if scale == 'omega' else 'skip scale'} = {value:g}"))
        return shown


def sweep_values(text) -> List[float]:
    parts = [p for p in str(text or "").replace(";", ",").split(",") if p.strip()]
    if not parts:
        raise UserError("the sweep needs at least one value (e.g. 0, 0.25, 0.5)")
    if len(parts) > SWEEP_MAX:
        raise UserError(f"the sweep takes at most {SWEEP_MAX} values (each is a full sampling run), got {len(parts)}")
    values = []
    for p in parts:
        try:
            value = float(p)
        except ValueError:
            raise UserError(f"sweep value {p.strip()!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise UserError(f"sweep values must be finite numbers ≥ 0, got {p.strip()}")
        values.append(value)
    return values


def _number_text(value) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 53:
        return str(int(value))  # gradio's numbers arrive as floats; --steps and --seed take whole numbers
    return str(value).strip()


def _label(method: str) -> str:
    return dict((v, k) for k, v in METHOD_CHOICES)[method]


def _scale_text(args) -> str:
    if args.method == "s2":
        return f"ω {args.omega:g}, drop ratio {args.drop_ratio:g} (mask seed {args.seed})"
    return f"skip blocks {','.join(map(str, args.skip_blocks))}, skip scale {args.skip_scale:g}"


def timing_table(label: str, cfg, other) -> str:
    """Markdown: each method's median and total step time, the ratio, and every step's time."""
    def median(xs: Sequence[float]) -> float:
        xs = sorted(xs)
        n = len(xs)
        return (xs[n // 2] + xs[(n - 1) // 2]) / 2 if n else float("nan")

    def steps(run) -> str:
        return ", ".join(f"{1e3 * t:.1f}" for t in run.step_times_s)

    mc, mo = median(cfg.step_times_s), median(other.step_times_s)
    return "\n".join([
        f"| | CFG | {label} | {label} / CFG |",
        "|---|---|---|---|",
        f"| median per step | {1e3 * mc:.1f} ms | {1e3 * mo:.1f} ms | {mo / mc:.2f} |",
        f"| whole call | {1e3 * cfg.total_time_s:.0f} ms | {1e3 * other.total_time_s:.0f} ms | "
        f"{other.total_time_s / cfg.total_time_s:.2f} |",
        "",
        f"Every step, ms (the first includes the call's set-up): CFG {steps(cfg)}; {label} {steps(other)}. "
        "One request on a shared machine: a glimpse, not a benchmark (`s2fast bench` times in interleaved rounds).",
    ])


def masks_image(trace, num_blocks: int, cell: int = 20):
    """The blocks skipped at each step: one row per step (first at the top), one column per block; a dark cell is
    a skipped block (S²'s random mask, or SGG's skip blocks where its skip pass ran). Block numbers run along the
    top band (``cell`` high), step numbers down the left band (2 × ``cell`` wide)."""
    from PIL import Image, ImageDraw

    trace = trace or []
    top, left = cell, 2 * cell
    width, height = left + max(1, num_blocks) * cell + 1, top + max(1, len(trace)) * cell + 1
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for block in range(num_blocks):
        draw.text((left + block * cell + cell // 3, 2), str(block), fill=(90, 90, 90))
    for row, mask in enumerate(trace):
        draw.text((2, top + row * cell + cell // 4), str(row + 1), fill=(90, 90, 90))
        dropped = {b for m in mask for b in (m if isinstance(m, list) else [m])}
        for block in range(num_blocks):
            box = (left + block * cell, top + row * cell, left + (block + 1) * cell, top + (row + 1) * cell)
            draw.rectangle(box, fill=(40, 40, 40) if block in dropped else (235, 235, 235), outline=(255, 255, 255))
    return image


def display(image):
    """``image`` upscaled (nearest neighbour) so its longer side is at least DISPLAY_SIDE: a 28×28 digit stays
    readable; the pixels are the sample's, only repeated."""
    longest = max(image.size)
    if longest >= DISPLAY_SIDE:
        return image
    factor = math.ceil(DISPLAY_SIDE / longest)
    from PIL import Image

    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


# --- the gradio page ----------------------------------------------------------------------------------------------


def guarded(gr, handler):
    """``handler`` for a gradio event: a UserError shows as its message, any other exception as its one-line
    message (its traceback goes to the server's log), never as a traceback on the page."""
    def run(*inputs):
        try:
            return handler(*inputs)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise gr.Error(f"{type(e).__name__}: {first}", print_exception=False) from None
    run.__name__ = handler.__name__
    return run


def build_app(page: Page):
    """The gradio Blocks of the page; errors a user can cause show as a message (gr.Error), never a traceback."""
    gr = import_gradio()
    class_conditional = page.family.class_conditional
    default_prompt = page.family.default_prompt
    default_guidance = page.family.guidance(page.pipe, argparse.Namespace(guidance=None))
    default_steps = min(page.family.steps(page.pipe, argparse.Namespace(steps=None)), 28)

    def compare(*inputs):
        cfg, other, times, masks, status = page.compare(*inputs)
        label = _label(inputs[6])
        return display(cfg), gr.Image(display(other), label=label), times, masks, status

    def sweep(*inputs):
        return [(display(im), caption) for im, caption in page.sweep(*inputs)]

    with gr.Blocks(title="s2fast: CFG vs S²", analytics_enabled=False) as app:
        gr.Markdown(f"## s2fast: CFG vs S² on {page.model} ({type(page.pipe).__name__}, {page.num_blocks} blocks, "
                    f"{page.device})\nBoth images start from the same noise (the seed); the right one adds the method's "
                    "guidance. S²: D = D_u + λ(D_c − D_u) − ω(D_s − D_c), D_s with a random share of blocks skipped "
                    "each step. SGG: CFG on the first half of the steps, skip-layer guidance on the second.")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                prompt = gr.Textbox(label="class (a name or an id)" if class_conditional else "prompt",
                                    value=default_prompt, elem_id="prompt")
                method = gr.Radio(choices=list(METHOD_CHOICES), value="s2", label="method", elem_id="method")
                guidance = gr.Number(value=default_guidance, label="λ (CFG scale)", elem_id="guidance")
                omega = gr.Slider(0, 2, value=0.25, step=0.01, label="ω (S² scale)", elem_id="omega")
                drop_ratio = gr.Slider(0.01, 0.9, value=0.1, step=0.01, label="drop ratio (S²)", elem_id="drop-ratio")
                with gr.Row():
                    steps = gr.Number(value=default_steps, precision=0, label="steps", elem_id="steps")
                    seed = gr.Number(value=0, precision=0, label="seed (noise and masks)", elem_id="seed")
                with gr.Row():
                    skip_blocks = gr.Textbox(value=",".join(map(str, default_skip_blocks(page.num_blocks))),
                                             label="skip blocks (SGG)", elem_id="skip-blocks")
                    skip_scale = gr.Number(value=3.0, label="skip scale (SGG)", elem_id="skip-scale")
                run_compare = gr.Button("Compare", variant="primary", elem_id="compare")
            with gr.Column(scale=2):
                with gr.Row():
                    cfg_image = gr.Image(label="CFG", type="pil", format="png", elem_id="cfg-image", interactive=False)
                    method_image = gr.Image(label="S² or SGG", type="pil", format="png", elem_id="method-image",
                                            interactive=False)
                status = gr.Markdown(elem_id="status")
                times = gr.Markdown(elem_id="times")
                masks = gr.Image(label="skipped blocks: a row per step, a column per block; dark = skipped", type="pil",
                                 format="png", elem_id="masks", interactive=False)
        with gr.Row():
            sweep_values_box = gr.Textbox(value=SWEEP_DEFAULT, label="sweep: ω values (S²) or skip scales (SGG), "
                                          "one seed", elem_id="sweep-values")
            run_sweep = gr.Button("Sweep", elem_id="sweep")
        gallery = gr.Gallery(label="the method at each value, same seed", columns=SWEEP_MAX, height="auto",
                             elem_id="gallery")

        inputs = [prompt, guidance, omega, drop_ratio, steps, seed, method, skip_blocks, skip_scale]
        # one request at a time over both buttons: the pipeline is shared
        run_compare.click(guarded(gr, compare), inputs, [cfg_image, method_image, times, masks, status],
                          concurrency_id="pipeline", concurrency_limit=1)
        run_sweep.click(guarded(gr, sweep), [*inputs, sweep_values_box], gallery, concurrency_id="pipeline",
                        concurrency_limit=1)
    return app


def launch(app, port: int, block: bool):
    """Serve ``app`` on 127.0.0.1:``port`` only: no share link, no browser opened, errors shown as messages."""
    try:
        app.launch(server_name="127.0.0.1", server_port=port, share=False, inbrowser=False, show_error=True,
                   prevent_thread_lock=not block, quiet=True)
    except OSError as e:
        raise UserError(f"cannot serve on 127.0.0.1:{port}: {str(e).splitlines()[0]} (try --port)") from None
    return app


def load_page(model: str, dtype_name: str, device_name: Optional[str], offload: Optional[str]) -> Page:
    """Load MODEL as ``s2fast generate`` does and set it up once for the page."""
    from . import build_parser
    from .families import family_named
    from .generate import prepare
    from .models import inspect_model, load_pipeline, resolve_device, resolve_dtype

    info = inspect_model(model)  # what MODEL is, before any weights load
    if family_named(info.class_name).video:
        raise UserError(f"s2fast ui shows pictures, and {model} is a {info.class_name} (video): use "
                        "s2fast generate --compare for a side-by-side MP4")
    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    pipe = load_pipeline(info, dtype)

    # the options the family checks at set-up: the command's defaults
    args = build_parser().parse_args(["generate", model, "--prompt", "-", "--out", "-", "--dtype", dtype_name,
                                      *(["--offload", offload] if offload else [])])
    args.device = device_name
    family = prepare(pipe, args, device)
    return Page(pipe, family, device, model, dtype_name, offload)


def run(args) -> None:
    import_gradio()  # before the model loads: a missing extra is the first thing said
    page = load_page(args.model, args.dtype, args.device, args.offload)
    app = build_app(page)
    print(f"s2fast: the page for {args.model} is at http://127.0.0.1:{args.port} (Ctrl-C stops it)")
    try:
        launch(app, args.port, block=True)
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
