"""``s2fast ui``: the page's handler draws the same samples as ``s2fast generate --compare`` (same code path, same
noise), refuses bad inputs with the command's messages, and the page works in a real browser (Debian's chromium
through selenium) on 127.0.0.1 without reaching anything beyond it.

``S2FAST_UI_SCREENSHOT=docs/ui.png pytest tests/test_ui.py -k browser`` rewrites the README's screenshot."""

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from s2fast.cli import main
from s2fast.cli.errors import UserError

gr = pytest.importorskip("gradio", reason="the page needs the ui extra: pip install 's2fast[ui]'")

from s2fast.cli import methods, ui  # noqa: E402

# prompt, λ, ω, drop ratio, steps, seed, method, skip blocks, skip scale: few steps keep each request under seconds
INPUTS = ("3", None, 0.5, 0.1, 4, 7, "s2", "2", 3.0)


@pytest.fixture(autouse=True)
def quiet_and_offline(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def page():
    return ui.load_page("digits", "auto", None, None)


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


# --- the handler, without a browser ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["s2", "sgg"])
def test_page_draws_what_generate_compare_writes(page, tmp_path, method):
    """Exact equality (tolerance 0): the page and the command run the same function on the same CPU pipeline with
    the same seed; any difference would mean a second sampling path or other noise."""
    cfg, other, times, masks, status = page.compare(*INPUTS[:6], method, *INPUTS[7:])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "digits", "--prompt", "3", "--omega", "0.5", "--steps", "4", "--seed", "7", "--method", method,
              "--skip-blocks", "2", "--compare", "--out", str(out)])
    assert exit_.value.code == 0
    np.testing.assert_array_equal(pixels(cfg), png(out / "00000-3-cfg.png"))
    np.testing.assert_array_equal(pixels(other), png(out / f"00000-3-{method}.png"))
    assert not np.array_equal(pixels(cfg), pixels(other))  # the method's guidance changed the sample
    assert "median per step" in times and status.startswith("DigitsFlowPipeline, prompt '3', seed 7")


def test_masks_image_marks_exactly_the_skipped_blocks(page):
    args = page.options(*INPUTS)
    run = page.sample(args, ["s2"])["s2"]
    assert len(run.trace) == 4 and len(run.step_times_s) == 4
    image = pixels(ui.masks_image(run.trace, page.num_blocks, cell=10))
    assert image.shape[:2] == (10 + 4 * 10 + 1, 20 + page.num_blocks * 10 + 1)  # the number bands, then the cells
    dark = image[15::10, 25::10, 0] < 128  # the centre of each cell: rows = steps, columns = blocks
    expected = np.zeros((4, page.num_blocks), bool)
    for step, mask in enumerate(run.trace):
        expected[step, list(mask)] = True
    np.testing.assert_array_equal(dark, expected)
    assert expected.any(axis=1).all()  # S² drops at least one block every step


def test_sweep_draws_one_sample_per_value_from_one_seed(page):
    shown = page.sweep(*INPUTS, "0, 0.5")
    assert [caption for _, caption in shown] == ["ω = 0", "ω = 0.5"]
    compared = page.compare(*INPUTS)  # ω 0.5 from the same seed: the sweep's second image
    np.testing.assert_array_equal(pixels(shown[1][0]), pixels(compared[1]))
    assert not np.array_equal(pixels(shown[0][0]), pixels(shown[1][0]))
    sgg = page.sweep(*INPUTS[:6], "sgg", *INPUTS[7:], "1")
    assert [caption for _, caption in sgg] == ["skip scale = 1"]


@pytest.mark.parametrize("change, message", [
    ({0: "12"}, "class id 12 is outside 0..9"),
    ({0: " "}, "the prompt is empty"),
    ({2: -1}, "--omega: must be a finite number ≥ 0, got -1"),
    ({3: 1.0}, "--drop-ratio: must be < 1"),
    ({4: 0}, "--steps: must be at least 1, got 0"),
    ({6: "sgg", 7: "9"}, "--method sgg: SGGConfig.skip_blocks names block 9, but the model has 6 blocks"),
    ({7: "a,b"}, "--skip-blocks: expected block indices separated by commas"),
])
def test_bad_inputs_show_the_commands_message(page, change, message):
    inputs = [change.get(i, v) for i, v in enumerate(INPUTS)]
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        page.compare(*inputs)
    with pytest.raises(gr.Error) as shown:  # what the page shows: the message, no traceback
        ui.guarded(gr, page.compare)(*inputs)
    assert message in shown.value.message and "Traceback" not in shown.value.message


@pytest.mark.parametrize("text, message", [("", "at least one value"), ("0, x", "'x' is not a number"),
                                           ("-1", "finite numbers ≥ 0"), (",".join(["1"] * 9), "at most 8")])
def test_bad_sweep_values_are_refused(page, text, message):
    with pytest.raises(gr.Error, match=message):
        ui.guarded(gr, page.sweep)(*INPUTS, text)


def test_an_unexpected_failure_shows_one_line():
    def broken(*_):
        raise RuntimeError("something inside broke\nsecond line")

    with pytest.raises(gr.Error) as shown:
        ui.guarded(gr, broken)()
    assert shown.value.message == "RuntimeError: something inside broke"


def test_the_page_offers_the_commands_default_skip_blocks():
    """The page's SGG default is the command's (s2fast/cli/methods.py: SD3-medium's 7, 8, 9 scaled to the depth)."""
    assert ui.default_skip_blocks is methods.default_skip_blocks
    assert ui.default_skip_blocks(24) == (7, 8, 9)
    assert ui.default_skip_blocks(6) == (2,)  # the digits model: 7/24 of its depth
    for depth in range(2, 10):
        blocks = ui.default_skip_blocks(depth)
        assert blocks and all(0 < b < depth - 1 or depth <= 2 for b in blocks) and len(blocks) < depth


def test_ui_help_and_option_errors_import_neither_torch_nor_gradio():
    code = ("import sys\nfrom s2fast.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('EXIT', e.code)\nprint('HEAVY', 'torch' in sys.modules or 'gradio' in sys.modules)\n")
    for argv, status in ((["ui", "--help"], 0), (["ui", "--port", "0"], 2), (["--help"], 0)):
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd="/")
        assert f"EXIT {status}" in r.stdout and "HEAVY False" in r.stdout, r.stdout + r.stderr
        if argv == ["--help"]:
            assert "ui" in r.stdout


# --- the page in a real browser ----------------------------------------------------------------------------------


def browser_or_skip():
    """Debian's chromium and chromium-driver (CI's .ci/run installs them), driven by selenium."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="the browser test needs selenium (the dev extra)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no browser here: the page's browser test needs Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1400", "--disable-background-networking", "--no-first-run"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium's manager must not look for drivers online
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OUTSIDE = []  # addresses this process tried to reach beyond the loopback while the page served


def _audit(event, args):
    if event == "socket.connect" and WATCHING:
        address = args[1]
        host = address[0] if isinstance(address, tuple) else str(address)
        if isinstance(address, tuple) and host not in ("127.0.0.1", "::1", "localhost"):
            OUTSIDE.append(host)


WATCHING = False


def test_the_page_in_a_browser(page, tmp_path):
    global WATCHING
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser = browser_or_skip()
    sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only while WATCHING
    port = free_port()
    WATCHING = True
    app = ui.launch(ui.build_app(page), port, block=False)
    base = f"http://127.0.0.1:{port}"
    try:
        assert app.local_url.startswith(base) and not app.share_url
        wait = WebDriverWait(browser, 60)
        browser.get(base)
        wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#compare")))

        def type_into(selector, text):
            box = browser.find_element(By.CSS_SELECTOR, selector)
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(str(text), Keys.TAB)

        type_into("#omega input[type=number]", "0.75")
        type_into("#steps input", "6")
        browser.find_element(By.CSS_SELECTOR, "#compare").click()
        status = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#status p")))
        wait.until(lambda _: "ω 0.75" in status.text)
        assert "6 steps" in status.text
        sources = [wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f"#{name} img"))).get_attribute("src")
                   for name in ("cfg-image", "method-image", "masks")]
        cfg, s2, masks = (Image.open(BytesIO(urllib.request.urlopen(src, timeout=30).read())) for src in sources)
        assert cfg.size == s2.size and min(cfg.size) >= ui.DISPLAY_SIDE  # the 28×28 digits, upscaled alike
        assert not np.array_equal(pixels(cfg), pixels(s2))  # ω 0.75 > 0: S² changed the sample
        assert masks.size[1] == 20 + 6 * 20 + 1  # the band of block numbers, then one row per step
        assert "median per step" in browser.find_element(By.CSS_SELECTOR, "#times").text
        assert "S²" in browser.find_element(By.CSS_SELECTOR, "#method-image").text  # its label names the method

        browser.find_element(By.CSS_SELECTOR, "#sweep").click()  # the default sweep: 5 values of ω, one seed
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#gallery img")) == 5)
        browser.save_screenshot(str(tmp_path / "ui.png"))
        if os.environ.get("S2FAST_UI_SCREENSHOT"):
            browser.save_screenshot(os.environ["S2FAST_UI_SCREENSHOT"])

        type_into("#prompt textarea", "12")  # a class the model lacks: a message on the page, no traceback
        browser.find_element(By.CSS_SELECTOR, "#compare").click()
        wait.until(lambda b: "class id 12 is outside 0..9" in b.find_element(By.TAG_NAME, "body").text)
        assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text

        requested = [entry["message"] for entry in browser.get_log("performance")
                     if '"Network.requestWillBeSent"' in entry["message"]]
        assert requested
        urls = [json.loads(m)["message"]["params"]["request"]["url"] for m in requested]
        beyond = [u for u in urls if not u.startswith((base, "data:", "blob:"))]
        assert not beyond, f"the page fetched from outside 127.0.0.1: {beyond[:5]}"
        assert not OUTSIDE, f"the server reached out to {sorted(set(OUTSIDE))}"
    finally:
        WATCHING = False
        browser.quit()
        app.close()
