"""The studio's server side: the page and its assets (types, CSP, no inline code), `GET /v1/adapters`, and the
read-only run endpoints (auth, what a run shows, paths outside a run refused)."""

import contextlib
import fcntl
import html.parser
import io
import json
import os
import re
import shutil
import threading
import urllib.parse
from fnmatch import fnmatch
from pathlib import Path

import pytest
import tomllib
from fastapi.testclient import TestClient
from PIL import Image

from qwen_image_lora import run_layout as layout
from qwen_image_lora.config import Config
from qwen_image_lora.inference.generator import Generator
from qwen_image_lora.inference.server import create_app
from qwen_image_lora.inference.studio import (
    ASSETS,
    MAX_LOSS_POINTS,
    STATIC_PATHS,
    STUDIO_DIR,
    describe_run,
    list_runs,
    read_losses,  # fmt: skip
    run_progress,
)
from qwen_image_lora.inference.testing import make_random_lora
from qwen_image_lora.serve_config import ServeAdapter

KEY = "studio-key-0123456789"
AUTH = {"x-api-key": KEY}
ROOT = Path(__file__).resolve().parents[1]


def png_bytes(colour=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def make_run(folder: Path) -> Path:
    """A run folder as training and evaluation leave it (names from train/lora.py, train/export.py, eval/report.py)."""
    (folder / "samples" / "step_000010").mkdir(parents=True)
    (folder / "samples" / "step_000020").mkdir(parents=True)
    (folder / "samples" / "step_000010" / "t2i_0.png").write_bytes(png_bytes())
    (folder / "samples" / "step_000020" / "t2i_0.png").write_bytes(png_bytes((0, 0, 200)))
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4, "grad_norm": 0.5}) for s in range(1, 21)]
    lines.insert(5, '{"step": 99, "loss": NaN}')
    (folder / "losses.jsonl").write_text("\n".join(lines) + '\n{"step": 21, "lo')  # a line still being written
    (folder / "README.md").write_text("# brand adapter\n<script>alert(1)</script>\n")
    (folder / "training_metadata.json").write_text(json.dumps({"steps": 20, "first_loss": 0.3, "final_loss": 0.07}))
    (folder / "eval").mkdir()
    (folder / "eval" / "report.json").write_text(json.dumps({"variants": ["base", "brand"], "metrics": {}}))
    (folder / "eval" / "report.html").write_text("<html><script>alert(1)</script></html>")
    (folder / "config.yaml").write_text("output_dir: x\n")
    return folder


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return Generator.from_pretrained(tiny_model_dir, dtype="float32", device="cpu", resolution=64)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    make_run(root / "brand-v1")
    (root / "scratch").mkdir()  # no run files: not listed
    (root.parent / "secret.txt").write_text("not yours")
    (root / "brand-v1" / "leak.png").symlink_to(root.parent / "secret.txt")
    return root


@pytest.fixture(scope="module")
def client(gen, runs_dir, tiny_model_dir, tmp_path_factory):
    cfg = Config()
    cfg.model.pretrained = str(tiny_model_dir)
    cfg.data.resolution = 64
    cfg.serve.runs_dir = str(runs_dir)
    cfg.serve.api_keys_env = "STUDIO_TEST_KEYS"
    other = tmp_path_factory.mktemp("elsewhere")
    cfg.serve.adapters = [
        ServeAdapter("brand", str(make_random_lora(gen.pipe.transformer, runs_dir / "brand-v1", seed=5)), 0.8),
        ServeAdapter("sketch", str(make_random_lora(gen.pipe.transformer, other / "sketch", seed=6)), 1.0),
    ]
    with TestClient(create_app(cfg, [KEY], generator=gen)) as c:
        yield c


class _Markup(html.parser.HTMLParser):
    """Collects what a strict CSP would block or what could carry script: inline scripts, styles, handlers."""

    def __init__(self):
        super().__init__()
        self.inline, self.scripts, self.ids, self.labels_for = [], [], set(), set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts.append(attrs.get("src"))
        if tag == "style" or "style" in attrs or any(a.startswith("on") for a in attrs):
            self.inline.append((tag, attrs))
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "label" and "for" in attrs:
            self.labels_for.add(attrs["for"])


def test_page_and_assets_have_their_types_and_a_strict_csp(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self';" in csp and "unsafe" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    page = _Markup()
    page.feed(r.text)
    assert page.inline == [] and page.scripts == ["/studio/studio.js"]
    assert page.labels_for <= page.ids  # every label points at a real control
    # the page names an inline icon, so the browser never asks for /favicon.ico (which stays behind the key)
    assert re.search(r'<link rel="icon" href="data:', r.text) and client.get("/favicon.ico").status_code == 401
    for name, kind in [("studio.js", "text/javascript"), ("studio.css", "text/css"), ("zip.js", "text/javascript")]:
        r = client.get(f"/studio/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
        assert "default-src 'self'" in r.headers["content-security-policy"]
    for path in STATIC_PATHS:  # the page loads before a key is entered; nothing in it runs the model
        assert client.get(path).status_code == 200, path
    assert client.get("/studio/nope.js", headers=AUTH).status_code == 404
    assert client.get("/studio/..%2Fserver.py", headers=AUTH).status_code == 404


def test_every_module_the_page_imports_is_served_and_shipped_in_the_package(client):
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "qwen_image_lora.inference"
    ]
    for path in STUDIO_DIR.iterdir():
        assert any(fnmatch(f"studio_assets/{path.name}", g) for g in globs), f"{path.name} would not be installed"
    for name in ASSETS:
        if name.endswith(".js"):
            for imported in re.findall(r'from "\./([\w.-]+)"', (STUDIO_DIR / name).read_text()):
                assert client.get(f"/studio/{imported}").status_code == 200, f"{name} imports {imported}"


def test_no_script_builds_markup_from_strings():
    for name in ASSETS:
        text = (STUDIO_DIR / name).read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in text, f"{name} uses {sink}"


def test_adapters_need_a_key_and_list_weights_and_their_run(client):
    assert client.get("/v1/adapters").status_code == 401
    assert client.get("/v1/adapters", headers={"x-api-key": "wrong"}).status_code == 401
    r = client.get("/v1/adapters", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["adapters"] == [
        {"name": "brand", "weight": 0.8, "run": "brand-v1"},
        {"name": "sketch", "weight": 1.0, "run": None},
    ]
    assert r.json()["api_keys_env"] == "STUDIO_TEST_KEYS"  # "Copy as curl" reads the key from the server's variable


def test_runs_list_and_one_run_with_curve_samples_card_and_report(client):
    assert client.get("/v1/runs").status_code == 401
    assert client.get("/v1/runs/brand-v1").status_code == 401
    assert client.get("/v1/runs/brand-v1/files/README.md").status_code == 401
    runs = client.get("/v1/runs", headers=AUTH).json()
    assert runs["configured"] is True and [r["name"] for r in runs["runs"]] == ["brand-v1"]
    run = client.get("/v1/runs/brand-v1", headers=AUTH).json()
    assert [p[0] for p in run["losses"]] == list(range(1, 21))  # NaN and the half-written line skipped
    assert run["losses"][-1][1] == pytest.approx(1 / 20)
    assert run["samples"] == [{"step": 10, "files": ["samples/step_000010/t2i_0.png"]},
                              {"step": 20, "files": ["samples/step_000020/t2i_0.png"]}]  # fmt: skip
    assert (run["card"], run["report_json"], run["metadata"]["steps"]) == ("README.md", "eval/report.json", 20)
    assert run["progress"] == {"state": "finished", "step": 20, "max_steps": 20, "checkpoint": None}
    assert run["card_text"] == "# brand adapter\n<script>alert(1)</script>\n"  # shown as text by the page

    r = client.get("/v1/runs/brand-v1/files/samples/step_000020/t2i_0.png", headers=AUTH)
    assert r.headers["content-type"] == "image/png" and Image.open(io.BytesIO(r.content)).getpixel((0, 0)) == (
        0,
        0,
        200,
    )
    r = client.get("/v1/runs/brand-v1/files/README.md", headers=AUTH)
    assert r.headers["content-type"].startswith("text/markdown") and "<script>" in r.text
    r = client.get("/v1/runs/brand-v1/files/eval/report.html", headers=AUTH)
    assert (
        r.headers["content-disposition"].startswith("attachment") and "sandbox" in r.headers["content-security-policy"]
    )


@pytest.mark.parametrize("file_name", ["报告.html", 'a"b.html'])
def test_a_report_with_any_name_downloads_under_that_name(client, runs_dir, file_name):
    """A name outside Latin-1 was a 500 (the header could not be encoded), and a `"` broke the header's quotes."""
    (runs_dir / "brand-v1" / "eval" / file_name).write_text("<p>x</p>")
    try:
        r = client.get(f"/v1/runs/brand-v1/files/eval/{urllib.parse.quote(file_name)}", headers=AUTH)
    finally:
        (runs_dir / "brand-v1" / "eval" / file_name).unlink()
    assert r.status_code == 200 and r.text == "<p>x</p>"
    disposition = r.headers["content-disposition"]
    assert disposition == f"attachment; filename*=utf-8''{urllib.parse.quote('brand-v1-' + file_name)}"
    assert "sandbox" in r.headers["content-security-policy"]


@pytest.mark.parametrize("path,status", [
    ("..%2F..%2Fsecret.txt", 400), ("samples%2F..%2F..%2F..%2Fsecret.txt", 400), ("%2Fetc%2Fpasswd", 400),
    ("leak.png", 400),  # a link inside the run that points outside it
    (".hidden.json", 400), ("pytorch_lora_weights.safetensors", 403), ("config.yaml", 200), ("missing.png", 404),
])  # fmt: skip
def test_run_files_outside_the_run_or_of_other_kinds_are_refused(client, path, status):
    r = client.get(f"/v1/runs/brand-v1/files/{path}", headers=AUTH)
    assert r.status_code == status, r.text
    assert "not yours" not in r.text


@pytest.mark.parametrize(
    "name,status", [("%2E%2E", 400), (".hidden", 400), ("scratch2", 404), ("..%2Fruns", 404)]
)  # a '/' in the name matches no route
def test_run_names_that_are_not_a_folder_under_runs_dir_are_refused(client, name, status):
    assert client.get(f"/v1/runs/{name}", headers=AUTH).status_code == status
    assert client.get(f"/v1/runs/{name}/files/README.md", headers=AUTH).status_code in (status, 404)


def test_without_runs_dir_the_runs_list_says_so(gen, tiny_model_dir):
    cfg = Config()
    cfg.model.pretrained = str(tiny_model_dir)
    with TestClient(create_app(cfg, [KEY], generator=gen)) as c:
        assert c.get("/v1/runs", headers=AUTH).json() == {"configured": False, "runs": []}
        assert c.get("/v1/runs/anything", headers=AUTH).status_code == 404


def test_a_long_loss_log_is_thinned_keeping_the_last_step(tmp_path):
    path = tmp_path / "losses.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 5002)))
    points = read_losses(path)
    assert len(points) <= MAX_LOSS_POINTS + 1 and points[0] == [1, 1.0] and points[-1] == [5001, 5001.0]


def test_a_run_says_whether_it_finished_is_training_or_was_interrupted(tmp_path):
    run = tmp_path / "long-run"
    layout.checkpoint_dir(run, 500).mkdir(parents=True)  # written as the trainer names them (run_layout.py)
    (layout.checkpoint_dir(run, 500) / layout.PROGRESS).write_text(json.dumps({"step": 500, "max_steps": 20000}))
    (run / layout.RUN_ID).write_text(json.dumps({"run_id": "r1", "started": 0}))
    (run / layout.CONFIG).write_text("train:\n  max_steps: 20000\n")
    rows = "".join(json.dumps({"step": s, "loss": 0.1}) + "\n" for s in range(1, 581))
    (run / "losses.jsonl").write_text(rows + '{"step": 581, "lo')  # killed mid-line
    assert describe_run(run)["progress"] == {"state": "interrupted", "step": 580, "max_steps": 20000, "checkpoint": 500}
    with open(run / layout.LOCK, "a+") as lock:  # what a live trainer holds while it runs
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert list_runs(tmp_path)[0]["progress"]["state"] == "training"
    assert run_progress(run)["state"] == "interrupted"  # the lock went with its holder
    (run / "training_metadata.json").write_text(json.dumps({"run_id": "r1", "steps": 20000}))
    assert run_progress(run) == {"state": "finished", "step": 20000, "max_steps": 20000, "checkpoint": 500}
    (run / "config.yaml").write_text("train:\n  max_steps: 30000\n")  # resumed to train further, then stopped
    assert run_progress(run)["state"] == "interrupted"
    (run / "config.yaml").write_text("train:\n  max_steps: 20000\n")
    (run / "run.json").write_text(json.dumps({"run_id": "r2", "started": 1}))  # a new run owns the folder now
    assert run_progress(run)["state"] == "interrupted"
    (tmp_path / "eval-only" / "eval").mkdir(parents=True)
    (tmp_path / "eval-only" / "eval" / "report.json").write_text("{}")
    assert run_progress(tmp_path / "eval-only") is None  # nothing was trained there: nothing to say


def test_the_model_card_shows_paths_in_the_run_relative_and_other_paths_by_name(tmp_path):
    run = tmp_path / "brand-v2"
    run.mkdir()
    (run / "README.md").write_text(
        f"# LoRA for /models/tiny-qwen\nData: `/data/sets/manifest.jsonl`.\nSamples: {run}/samples/step_000010/t2i_0.png.\n"
        f'pipe.load_lora_weights("{run}")\nSee https://example.com/a/b, rank / alpha, a/b.\n'
    )
    assert describe_run(run)["card_text"] == (
        "# LoRA for tiny-qwen\nData: `manifest.jsonl`.\nSamples: samples/step_000010/t2i_0.png.\n"
        'pipe.load_lora_weights(".")\nSee https://example.com/a/b, rank / alpha, a/b.\n'
    )


@pytest.fixture(scope="module")
def damaged_client(gen, tiny_model_dir, tmp_path_factory):
    """An app over a runs_dir holding one sound run; each test below adds one damaged run beside it."""
    root = tmp_path_factory.mktemp("damaged-runs")
    make_run(root / "sound")
    cfg = Config()
    cfg.model.pretrained = str(tiny_model_dir)
    cfg.serve.runs_dir = str(root)
    with TestClient(create_app(cfg, [KEY], generator=gen), raise_server_exceptions=False) as c:
        yield c, root


def _progress_json(run: Path, text: str) -> None:
    layout.checkpoint_dir(run, 10).mkdir(parents=True)
    (layout.checkpoint_dir(run, 10) / layout.PROGRESS).write_text(text)


def _log_line(run: Path, text: str) -> None:
    with (run / "losses.jsonl").open("a") as f:
        f.write(f"\n{text}\n")  # after make_run's half-written line


@pytest.mark.parametrize("damage,expected", [
    (lambda run: (run / "training_metadata.json").write_text("[1, 2]"),
     {"metadata": None, "progress": {"state": "interrupted", "step": 20, "max_steps": None, "checkpoint": None}}),
    (lambda run: (run / "run.json").write_text('"abc"'), {"progress": {"state": "finished", "step": 20,
                                                                       "max_steps": 20, "checkpoint": None}}),
    (lambda run: _progress_json(run, "[5]"),
     {"progress": {"state": "finished", "step": 20, "max_steps": 20, "checkpoint": 10}}),
    (lambda run: _log_line(run, '{"step": 1e400, "loss": 0.5}'), {"progress": {"state": "finished", "step": 20,
                                                                               "max_steps": 20, "checkpoint": None}}),
    (lambda run: _log_line(run, '{"step": 21, "loss": 1' + "0" * 400 + "}"), {"losses": 20}),
    (lambda run: (run / "training_metadata.json").write_text('{"steps": 20, "first_loss": NaN, "final_loss": 1e400}'),
     {"metadata": {"steps": 20, "first_loss": None, "final_loss": None}}),
    (lambda run: (run / "training_metadata.json").write_text("[" * 100_000), {"metadata": None}),  # too deep to parse
    (lambda run: (run / "config.yaml").write_text("when: 2026-13-45\n"), {"losses": 20}),  # a date YAML cannot make
], ids=["metadata-list", "run-json-string", "progress-list", "step-1e400", "loss-400-digits", "metadata-nan",
        "metadata-deep", "config-bad-date"])  # fmt: skip
def test_a_run_with_a_wrongly_shaped_file_reads_it_as_absent_and_the_list_stays_whole(damaged_client, damage, expected):
    c, root = damaged_client
    run = make_run(root / "damaged")
    try:
        damage(run)
        r = c.get("/v1/runs", headers=AUTH)
        assert r.status_code == 200, r.text
        assert sorted(x["name"] for x in r.json()["runs"]) == ["damaged", "sound"]
        r = c.get("/v1/runs/damaged", headers=AUTH)
        assert r.status_code == 200, r.text
        shown = r.json()
        for field, value in expected.items():
            assert (len(shown[field]) if field == "losses" else shown[field]) == value, field
    finally:
        shutil.rmtree(run)


def test_a_runs_files_are_read_only_inside_it_and_only_when_regular(damaged_client, tmp_path):
    """/v1/runs/NAME read README.md and training_metadata.json through links out of the run (a secret file's text in
    card_text), and a FIFO among its files blocked the thread for good, and with it the service's decodes."""
    c, root = damaged_client
    run = make_run(root / "linked")
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "TOPSECRET"}')
    try:
        for name in ("README.md", "training_metadata.json"):
            (run / name).unlink(missing_ok=True)
            (run / name).symlink_to(secret)
        shown = c.get("/v1/runs/linked", headers=AUTH).json()
        assert "TOPSECRET" not in json.dumps(shown) and shown["metadata"] is None
        for name in ("README.md", "training_metadata.json", "losses.jsonl", "config.yaml", "run.json"):
            (run / name).unlink(missing_ok=True)
            os.mkfifo(run / name)
        done = threading.Event()
        worker = threading.Thread(target=lambda: (c.get("/v1/runs/linked", headers=AUTH), done.set()), daemon=True)
        worker.start()
        assert done.wait(30), "reading the run blocked on a FIFO"
        assert c.get("/v1/runs", headers=AUTH).status_code == 200
    finally:
        for _ in range(100):  # a reader still blocked in a FIFO (the bug): open it for writing, then close it
            for fifo in (p for p in run.iterdir() if p.is_fifo()):
                with contextlib.suppress(OSError):
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            if "done" not in locals() or done.wait(0.1):
                break
        shutil.rmtree(run)
