"""The studio end to end in headless Chromium (Selenium + Debian's chromium/chromium-driver): the real server on
loopback with the tiny model; set the key, generate, move an adapter weight and compare with the base, edit an
uploaded image, see a 422 for a bad file, download a result and reproduce it with the copied curl command, run a
batch and unpack its ZIP, read a run; screenshots land in the test's tmp_path for a person to look at."""

import io
import json
import os
import shutil
import subprocess
import threading
import time
import zipfile

import numpy as np
import pytest
import uvicorn
from PIL import Image
from psd_tools import PSDImage
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from qwen_image_lora.config import Config
from qwen_image_lora.image_files import read_settings
from qwen_image_lora.inference.generator import Generator
from qwen_image_lora.inference.requests import request_models
from qwen_image_lora.inference.server import create_app
from qwen_image_lora.inference.testing import make_random_lora
from qwen_image_lora.serve_config import ServeAdapter

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium is not installed (Debian/Ubuntu: apt-get install -y chromium chromium-driver)",
)
KEY = "browser-key-0123456789"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):

    root = tmp_path_factory.mktemp("studio")
    gen = Generator.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", resolution=64)
    run = root / "runs" / "brand-v1"
    (run / "samples" / "step_000010").mkdir(parents=True)
    Image.new("RGB", (64, 64), (30, 90, 200)).save(run / "samples" / "step_000010" / "t2i_0.png")
    (run / "losses.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1 / s}) + "\n" for s in range(1, 31)))
    (run / "config.yaml").write_text("train:\n  max_steps: 20000\n")  # stopped at step 30 of 20,000
    (run / "README.md").write_text(
        f"---\nbase_model: {root}/models/tiny\n---\n# brand-v1\nTrigger word: <brand>\n\n"
        f'```python\npipe.load_lora_weights("{run}")\n```\n\n'
        f"- trained on `{root}/data/manifest.jsonl`\n- samples in {run}/samples/step_000010\n"
    )
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text(
        json.dumps(
            {
                "variants": ["base", "brand"],
                "verdicts": {"brand": {"line": "brand: better palette distance (ΔE -3.1)"}},
                "metrics": {
                    "palette_delta_e": {
                        "label": "Palette distance",
                        "higher_is_better": False,
                        "variants": {
                            "base": {"mean": 9.5, "low": 8.0, "high": 11.0},
                            "brand": {"mean": 6.4, "low": 5.1, "high": 7.7},
                        },
                    }
                },
            }
        )
    )
    cfg = Config()
    cfg.model.pretrained = str(tiny_model_dir)
    cfg.data.resolution, cfg.serve.max_steps, cfg.serve.runs_dir = 64, 4, str(root / "runs")
    cfg.serve.adapters = [
        ServeAdapter("brand", str(make_random_lora(gen.pipe.transformer, run, seed=5)), 0.8),
        ServeAdapter("sketch", str(make_random_lora(gen.pipe.transformer, root / "sketch", seed=6)), -0.5),
    ]
    app = create_app(cfg, [KEY], generator=gen)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}", app
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def browser(tmp_path):

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1100",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path / "downloads")}
    )
    yield driver
    driver.quit()


def png_file(path, size=(64, 48), seed=0):
    arr = np.random.RandomState(seed).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return str(path)


def test_the_studio_generates_edits_compares_refuses_and_downloads(server, browser, tmp_path):
    server, app = server

    d = browser
    wait = WebDriverWait(d, 120)
    css = lambda sel: d.find_element(By.CSS_SELECTOR, sel)  # noqa: E731
    cards = lambda: d.find_elements(By.CSS_SELECTOR, "#results > li")  # noqa: E731

    def fill(sel, value):
        css(sel).clear()
        css(sel).send_keys(str(value))

    d.get(server + "/")
    wait.until(lambda _: d.execute_script("return document.activeElement.id") == "api-key")  # focus starts at the key
    css("#api-key").send_keys(KEY + Keys.ENTER)
    wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "#adapter-list input[type=range]")) == 2)
    assert d.execute_script("return sessionStorage.getItem('qwen-lora-api-key')") == KEY
    # the pipeline's 40 steps, within this service's max_steps of 4 (the form stayed at 30 and Generate was refused)
    assert (css("#steps").get_property("value"), css("#steps").get_attribute("max")) == ("4", "4")

    # text to image: a typed seed is used as it is
    fill("#prompt", "a red bottle on marble")
    fill("#steps", 1)
    fill("#seed", 7)
    css("#generate").click()
    wait.until(lambda _: len(cards()) == 1)
    assert "seed 7" in cards()[0].text
    assert d.execute_script("return document.querySelector('#results img').naturalWidth") == 64

    # while another job holds the model worker, the page says the request is queued, then finishes it
    gate = threading.Event()
    app.state.worker.submit(lambda: gate.wait(60))
    css("#generate").click()
    wait.until(lambda _: "Queued: 1 job(s) waiting" in css("#state").text)
    gate.set()
    wait.until(lambda _: len(cards()) == 2)

    # adapter weights: the service's whole range (sketch's -0.5 showed, and was sent, as off); brand off, sketch up by
    # keyboard; base vs adapters at one seed
    brand, sketch = d.find_elements(By.CSS_SELECTOR, "#adapter-list input[type=range]")
    assert [o.text for o in d.find_elements(By.CSS_SELECTOR, "#adapter-list output")] == ["0.80", "-0.50"]
    assert (sketch.get_attribute("min"), sketch.get_attribute("max")) == ("-4", "4")  # LoraRef.weight's bounds
    brand.send_keys(*[Keys.ARROW_LEFT] * 16)
    sketch.send_keys(*[Keys.ARROW_RIGHT] * 30)
    outputs = [o.text for o in d.find_elements(By.CSS_SELECTOR, "#adapter-list output")]
    assert outputs == ["0.00", "1.00"]
    css("#compare").click()
    wait.until(lambda _: len(cards()) == 3)
    pair = d.find_elements(By.CSS_SELECTOR, "#results .pair img")
    assert [img.get_attribute("alt").split(":")[0] for img in pair] == ["Result 3", "Result 4"]  # side by side
    differ = d.execute_script("""
        const pixels = (img) => {
          const c = document.createElement('canvas');
          [c.width, c.height] = [img.naturalWidth, img.naturalHeight];
          const ctx = c.getContext('2d');
          ctx.drawImage(img, 0, 0);
          return ctx.getImageData(0, 0, c.width, c.height).data;
        };
        const [a, b] = [...document.querySelectorAll('#results .pair img')].map(pixels);
        return a.length !== b.length || a.some((v, i) => v !== b[i]);""")
    assert differ, "the adapter image equals the base image"
    history = json.loads(d.find_elements(By.CSS_SELECTOR, "#history > li pre")[0].get_attribute("textContent"))
    assert history["loras"] == [{"name": "sketch", "weight": 1}] and history["seed"] == 7
    # guidance acts only against a negative prompt: without one the field is off and no scale is recorded
    assert (
        not css("#guidance").is_enabled() and css("#guidance-note").is_displayed() and "guidance_scale" not in history
    )
    fill("#negative", "blurry")
    assert css("#guidance").is_enabled() and not css("#guidance-note").is_displayed()

    # edit with an upload: the result beside the input, with a before/after slider
    css("input[name=mode][value=edit]").click()
    css("#edit-files").send_keys(png_file(tmp_path / "product.png"))
    wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "#edit-thumbs li")) == 1)
    # the browser's own "No file chosen" text never shows beside the thumbnails: the native input is hidden
    assert (
        d.execute_script(
            "const r = document.querySelector('#edit-files').getBoundingClientRect(); return r.width * r.height"
        )
        <= 1
    )
    fill("#prompt", "put it on a beach")
    css("#generate").click()
    wait.until(lambda _: len(cards()) == 4)
    first = cards()[0]
    assert first.find_elements(By.CSS_SELECTOR, ".compare img.before") and first.find_elements(
        By.CSS_SELECTOR, ".compare-wrap input"
    )
    assert [t.text for t in first.find_elements(By.CSS_SELECTOR, ".compare .tag") if t.is_displayed()] == [
        "Before",
        "After",
    ]
    assert d.execute_script("return document.querySelector('#results .compare img.after').naturalWidth") == 64
    edited = json.loads(d.find_elements(By.CSS_SELECTOR, "#history > li pre")[0].get_attribute("textContent"))
    assert (edited["negative_prompt"], edited["guidance_scale"]) == ("blurry", 4)

    # a text file named .webp is refused when picked, in plain words, and never becomes a thumbnail
    css("#edit-thumbs button").click()
    (tmp_path / "notes.webp").write_text("meeting notes, not a picture")
    css("#edit-files").send_keys(str(tmp_path / "notes.webp"))
    wait.until(lambda _: css("#alert").is_displayed())
    assert css("#alert").text == "notes.webp is not an image." and not d.find_elements(
        By.CSS_SELECTOR, "#edit-thumbs li"
    )
    # a GIF named .png: the browser shows it, the server refuses it (422), naming the file
    Image.new("RGB", (64, 48), (10, 200, 10)).save(tmp_path / "animated.png", format="GIF")
    css("#edit-files").send_keys(str(tmp_path / "animated.png"))
    wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "#edit-thumbs li")) == 1)
    css("#generate").click()
    wait.until(lambda _: "bad file" in css("#alert").text)
    assert "animated.png" in css("#alert").text and len(cards()) == 4

    # download a result
    cards()[-1].find_element(By.XPATH, ".//button[text()='Download']").click()
    downloads = tmp_path / "downloads"
    wait.until(lambda _: downloads.exists() and any(p.suffix == ".png" for p in downloads.iterdir()))
    saved = next(p for p in downloads.iterdir() if p.suffix == ".png")
    assert saved.name == "result-1-seed7.png" and Image.open(saved).size == (64, 64)
    assert read_settings(saved)["seed"] == 7  # the server's bytes, settings and all

    # "copy as curl" reproduces that result byte for byte outside the browser
    d.execute_cdp_cmd(
        "Browser.grantPermissions", {"origin": server, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]}
    )
    cards()[-1].find_element(By.XPATH, ".//button[text()='Copy as curl']").click()
    wait.until(lambda _: "Copied" in css("#state").text)
    command = d.execute_async_script("navigator.clipboard.readText().then(arguments[arguments.length - 1])")
    assert KEY not in command and "--fail" in command
    # the server's variable (serve.api_keys_env) as the server reads it: a comma-separated list, the first key used
    env = {**os.environ, "QWEN_LORA_API_KEYS": f"{KEY},another-key"}
    subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, check=True, timeout=120)
    assert (tmp_path / saved.name).read_bytes() == saved.read_bytes()
    (tmp_path / saved.name).unlink()
    refused = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env={**env, "QWEN_LORA_API_KEYS": "wrong"}, timeout=120, check=False
    )
    assert refused.returncode == 22 and not (tmp_path / saved.name).exists()  # a 401 is an error, not result.png
    d.execute_script("window.scrollTo(0, 0)")
    d.save_screenshot(str(tmp_path / "studio-create.png"))

    # batch: two images and stray files, one instruction; a ZIP (store-only, written in JS) with a manifest
    css("#tab-batch").click()
    (tmp_path / "notes.txt").write_text("not an image")
    paths = [png_file(tmp_path / "a.png", seed=1), png_file(tmp_path / "b.png", seed=2), str(tmp_path / "notes.txt"),
             str(tmp_path / "notes.webp")]  # fmt: skip
    css("#batch-files").send_keys("\n".join(paths))
    css("#batch-prompt").send_keys("white background")
    css("#batch-start").click()
    wait.until(lambda _: css("#batch-summary").text == "2 of 2 done, 0 failed.")
    assert "notes.txt" in css("#alert").text and "notes.webp is not an image" in css("#alert").text
    d.save_screenshot(str(tmp_path / "studio-batch.png"))
    css("#batch-zip").click()
    wait.until(lambda _: (downloads / "batch.zip").exists())
    with zipfile.ZipFile(downloads / "batch.zip") as archive:
        assert archive.testzip() is None and archive.namelist() == ["a.png", "b.png", "manifest.json"]
        manifest = json.loads(archive.read("manifest.json"))
        assert Image.open(io.BytesIO(archive.read("b.png"))).size == (64, 48)
        assert read_settings(archive.read("b.png"))["prompt"] == "white background"  # zipped as the server wrote it
    assert [(j["id"], j["status"], j["seed"], j["request"]["image"]) for j in manifest["jobs"]] == [
        ("a", "done", 7, ["a.png"]),
        ("b", "done", 7, ["b.png"]),
    ]
    assert manifest["jobs"][0]["request"]["prompt"] == "white background"

    # a JSONL of `qwen-lora batch` jobs: images by path, adapters as a dict; a broken line fails alone, named
    # (a masked edit's mask was dropped, so every pixel could change; a misspelt field was dropped without a word)
    Image.new("L", (64, 48), 255).save(tmp_path / "m.png")
    lines = [{"id": "mug", "prompt": "a mug", "images": ["in/a.png"], "seed": 3, "loras": {"brand": 0.5}},
             {"id": "typo", "prompt": "a mug", "images": ["in/a.png"], "guidance": 5},
             {"prompt": "a mug", "images": ["in/a.png"], "mask": "m.png", "mask_feather": 2,
              "output": "masked.webp"},
             {"id": "nested", "prompt": "a mug", "images": ["in/a.png"], "output": "dir/x.png"}]  # fmt: skip
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    css("#batch-files").clear()
    css("#batch-files").send_keys(f"{tmp_path / 'jobs.jsonl'}\n{tmp_path / 'a.png'}\n{tmp_path / 'm.png'}")
    css("#batch-start").click()
    wait.until(lambda _: css("#batch-summary").text == "2 of 5 done, 3 failed.")
    rows = [r.text for r in d.find_elements(By.CSS_SELECTOR, "#batch-jobs tr")]
    assert rows[0].startswith("mug done") and rows[2].startswith("masked done")
    assert "jobs.jsonl:2: unknown field(s) guidance; a job takes prompt," in rows[1]
    assert 'jobs.jsonl:4: output "dir/x.png" must be a plain file name' in rows[3]  # was written as dir_x.png
    assert "jobs.jsonl:5: not a JSON object" in rows[4]
    assert not css("#batch-retry").is_enabled()  # nothing a retry could fix
    settings = [
        json.loads(pre.get_attribute("textContent")) for pre in d.find_elements(By.CSS_SELECTOR, "#history pre")
    ]
    masked, job = settings[:2]  # the newest first
    assert (masked["mask"], masked["mask_feather"], masked["image"]) == ("m.png", 2, ["a.png"])
    assert masked["output_format"] == "webp"  # from its output's extension, as `qwen-lora batch` reads it (was PNG)
    assert (job["loras"], job["seed"], job["image"], job["num_inference_steps"]) == (
        [{"name": "brand", "weight": 0.5}],
        3,
        ["a.png"],
        1,
    )

    # runs: the loss curve and the samples of the run the brand adapter came from
    css("#tab-runs").click()
    wait.until(lambda _: d.find_elements(By.XPATH, "//ul[@id='run-list']//button[text()='brand-v1']"))
    assert "interrupted at step 30 of 20,000" in css("#run-list").text  # no metadata, no live trainer: it stopped
    d.find_element(By.XPATH, "//ul[@id='run-list']//button[text()='brand-v1']").click()
    wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, "#run-detail polyline.loss"))
    wait.until(lambda _: d.execute_script("return document.querySelector('.sample-grid img')?.naturalWidth") == 64)
    assert "Interrupted at step 30 of 20,000" in css("#run-detail").text
    # the model card as a document (front matter dropped), markup shown as text, paths inside the run made relative
    card = css("#run-detail .card-text")
    assert [h.text for h in card.find_elements(By.CSS_SELECTOR, "h4")] == ["brand-v1"]
    assert card.find_element(By.CSS_SELECTOR, "p").text == "Trigger word: <brand>"
    assert card.find_element(By.CSS_SELECTOR, "pre").text == 'pipe.load_lora_weights(".")'
    assert [li.text for li in card.find_elements(By.CSS_SELECTOR, "li")] == [
        "trained on manifest.jsonl",
        "samples in samples/step_000010",
    ]
    assert "better palette distance" in css("#run-detail .verdicts").text
    assert [c.text for c in d.find_elements(By.CSS_SELECTOR, "#run-detail tbody td")] == [
        "9.5000 [8.0000, 11.0000]",
        "6.4000 [5.1000, 7.7000]",
    ]
    assert d.find_elements(By.XPATH, "//button[contains(., 'Try adapter')]")
    d.save_screenshot(str(tmp_path / "studio-runs.png"))
    d.find_element(By.XPATH, "//button[contains(., 'Try adapter')]").click()  # brand was off: on at its own 0.8
    assert [o.text for o in d.find_elements(By.CSS_SELECTOR, "#adapter-list output")] == ["0.80", "1.00"]

    # phone width: nothing wider than the screen
    css("#tab-create").click()
    d.set_window_size(390, 900)
    d.execute_script("window.scrollTo(0, 0)")
    d.save_screenshot(str(tmp_path / "studio-phone.png"))
    too_wide = d.execute_script("""return [...document.querySelectorAll('body *')].filter(e => e.offsetParent !== null &&
        e.getBoundingClientRect().right > window.innerWidth + 1).map(e => e.tagName + '#' + e.id + '.' + e.className)""")
    assert too_wide == [] and d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    # on a phone the result lands below the form: the page scrolls to it
    css("input[name=mode][value=t2i]").click()
    count = len(cards())
    css("#generate").click()
    wait.until(lambda _: len(cards()) == count + 1)
    top = d.execute_script("return document.querySelector('#results > li').getBoundingClientRect().top")
    assert 0 <= top < d.execute_script("return window.innerHeight"), top
    messages = [e["message"] for e in d.get_log("browser")]
    assert [m for m in messages if "Content Security Policy" in m] == []
    assert [m for m in messages if "favicon" in m] == []  # the page names its icon: no request for /favicon.ico


def test_a_batch_zip_taken_mid_run_records_the_running_job_as_running(server, browser, tmp_path):
    server, app = server

    d = browser
    wait = WebDriverWait(d, 120)
    css = lambda sel: d.find_element(By.CSS_SELECTOR, sel)  # noqa: E731
    d.get(server + "/")
    css("#api-key").send_keys(KEY + "\n")
    wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "#adapter-list input[type=range]")) == 2)
    css("#steps").clear()
    css("#steps").send_keys("1")
    css("#tab-batch").click()
    css("#batch-files").send_keys(f"{png_file(tmp_path / 'a.png', seed=1)}\n{png_file(tmp_path / 'b.png', seed=2)}")
    css("#batch-prompt").send_keys("white background")
    # the model worker is held so that job b is still queued when the ZIP is taken
    first_hold, second_hold = threading.Event(), threading.Event()
    app.state.worker.submit(lambda: first_hold.wait(60))
    wait.until(lambda _: app.state.worker.busy)
    css("#batch-start").click()
    wait.until(lambda _: app.state.worker._jobs.qsize() == 1)  # job a waits behind the first hold
    first_hold.set()
    app.state.worker.submit(lambda: second_hold.wait(60))  # ahead of job b, which the page sends once a is done
    try:
        wait.until(
            lambda _: css("#batch-summary").text.startswith("1 of 2 done") and "Queued" in css("#batch-jobs").text
        )
        css("#batch-zip").click()
        wait.until(lambda _: (tmp_path / "downloads" / "batch.zip").exists())
    finally:
        second_hold.set()
    with zipfile.ZipFile(tmp_path / "downloads" / "batch.zip") as archive:
        manifest = json.loads(archive.read("manifest.json"))
    assert [(j["id"], j["status"], j["error"]) for j in manifest["jobs"]] == [
        ("a", "done", None),
        ("b", "running", None),
    ]
    wait.until(lambda _: css("#batch-summary").text == "2 of 2 done, 0 failed.")


@pytest.mark.skipif(
    "mask" not in request_models(Config().serve)[0].model_fields, reason="the HTTP API has no `mask` field yet"
)
def test_a_painted_mask_keeps_every_unpainted_pixel(server, browser, tmp_path):
    server, _ = server

    d = browser
    wait = WebDriverWait(d, 120)
    css = lambda sel: d.find_element(By.CSS_SELECTOR, sel)  # noqa: E731
    d.get(server + "/")
    css("#api-key").send_keys(KEY + "\n")
    wait.until(lambda _: len(d.find_elements(By.CSS_SELECTOR, "#adapter-list input[type=range]")) == 2)
    css("input[name=mode][value=edit]").click()
    source = png_file(tmp_path / "product.png", size=(64, 48), seed=3)
    css("#edit-files").send_keys(source)
    wait.until(
        lambda _: (
            css("#mask-tools").is_displayed()
            and d.execute_script("return document.querySelector('#mask-canvas').width") == 64
        )
    )
    for sel, value in [("#prompt", "a new background"), ("#steps", 1), ("#mask-feather", 0)]:
        css(sel).clear()
        css(sel).send_keys(str(value))
    canvas = css("#mask-canvas")
    w, h = canvas.size["width"], canvas.size["height"]
    # a stroke down the left fifth of the image (offsets are from the canvas centre)
    ActionChains(d).move_to_element_with_offset(canvas, -w * 0.3, -h * 0.4).click_and_hold().move_by_offset(
        0, int(h * 0.8)
    ).release().perform()
    d.save_screenshot(str(tmp_path / "studio-mask.png"))
    css("#generate").click()
    wait.until(lambda _: d.find_elements(By.CSS_SELECTOR, "#results .compare img.after"))
    wait.until(lambda _: d.execute_script("return document.querySelector('#results img.after').naturalWidth") == 64)
    pixels = d.execute_script("""
        const img = document.querySelector('#results img.after'), c = document.createElement('canvas');
        [c.width, c.height] = [img.naturalWidth, img.naturalHeight];
        const ctx = c.getContext('2d');
        ctx.drawImage(img, 0, 0);
        return Array.from(ctx.getImageData(0, 0, c.width, c.height).data);""")
    result = np.array(pixels, dtype=np.uint8).reshape(48, 64, 4)[..., :3].astype(int)
    original = np.asarray(Image.open(source).convert("RGB")).astype(int)
    assert np.array_equal(result[:, 32:], original[:, 32:])  # never painted: identical
    assert np.abs(result[:, 10:16] - original[:, 10:16]).mean() > 1  # painted: re-generated
    settings = json.loads(d.find_element(By.CSS_SELECTOR, "#history pre").get_attribute("textContent"))
    assert settings["mask"] == "painted mask" and settings["mask_feather"] == 0
    # The same painted mask as the subject of a layered PSD, downloaded through POST /v1/layers.

    Select(css("#layers-format")).select_by_value("psd")
    d.execute_script("""window.sent = {}; const original = window.fetch;
        window.fetch = (url, options) => { if (options?.body) window.sent[url] = JSON.parse(options.body);
                                            return original(url, options); };""")
    css("#layers").click()
    wait.until(lambda _: d.execute_script("return window.sent['/v1/layers']"))
    sent = d.execute_script("return window.sent['/v1/layers']")  # the page's settings, as Generate sends them
    assert (sent["loras"], sent["num_inference_steps"], sent["mask_feather"], sent["prompt"]) == (
        [{"name": "brand", "weight": 0.8}, {"name": "sketch", "weight": -0.5}],  # each at its configured weight
        1,
        0,
        "a new background",
    )
    psd_path = tmp_path / "downloads" / f"layers-seed{sent['seed']}.psd"
    wait.until(lambda _: psd_path.exists() and psd_path.stat().st_size > 0)
    psd = PSDImage.open(psd_path)
    assert [layer.name for layer in psd] == ["background", "subject"] and psd.size == (64, 48)
