"""scripts/setup.sh installs exactly requirements.lock, swaps in torch's CPU build only where it should, and refuses a
disk too full for torch up front, with the way out, instead of pip's Errno 28."""

import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
# The lock the suite's venv was built from: scripts/lock.sh runs the suite against its candidate (QWEN_LORA_LOCK), which
# differs from the committed one by exactly what it is testing (the committed one failed every added package).
LOCK = Path(os.environ.get("QWEN_LORA_LOCK") or REPO / "requirements.lock").resolve()
CUDA_ONLY = ("nvidia-", "cuda-", "triton")


def _locked() -> dict[str, str]:
    pins = [line.split("==") for line in LOCK.read_text().splitlines() if line and not line.startswith("#")]
    return {name.lower().replace("_", "-"): version for name, version in pins}


def _copy_of_setup(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(LOCK, tmp_path / "requirements.lock")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    return tmp_path


def _fake_venv(root: Path) -> Path:
    """A .venv whose python only records how it was called (and the requirement files it was given)."""
    torch_pkg = root / ".venv" / "lib" / "python3.11" / "site-packages" / "torch"
    torch_pkg.mkdir(parents=True)
    (torch_pkg / "__init__.py").write_text("")
    fake_python = root / ".venv" / "bin" / "python"
    fake_python.parent.mkdir()
    log = root / "calls.log"
    fake_python.write_text(
        f'#!/usr/bin/env bash\necho "$*" >> {log}\n'
        f'for a in "$@"; do [ -f "$a" ] && sed "s/^/  /" "$a" >> {log}; done; true\n'
    )
    fake_python.chmod(0o755)
    return log


def _run(
    root: Path, need_gb: int = 0, gpu: bool = False, cpu_index: str = "http://127.0.0.1:9/whl/cpu", **env
) -> subprocess.CompletedProcess:
    bin_dir = root / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(
        "#!/usr/bin/env bash\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n" if gpu else "#!/bin/false\n"
    )
    smi.chmod(0o755)
    full_env = {
        **os.environ,
        "SETUP_NEED_GB": str(need_gb),
        "QWEN_LORA_CPU_INDEX": cpu_index,
        "HF_HOME": str(root / "hf-home"),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        **env,
    }
    for name in ("TORCH_INDEX_URL", "QWEN_LORA_VENV", "QWEN_LORA_LOCK"):
        if name not in env:
            full_env.pop(name, None)
    return subprocess.run(
        ["bash", "scripts/setup.sh"], cwd=root, env=full_env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def cpu_index():
    """A loopback stand-in for torch's CPU wheel index: it answers, which is all setup.sh asks of it."""

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<a href='torch-2.14.1+cpu-cp311-cp311-linux_x86_64.whl'>torch</a>")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/whl/cpu"
    server.shutdown()


def test_the_venv_holds_exactly_the_lock():
    """What the suite runs in is what setup installed: pip freeze equals the lock (with the CPU build documented
    as the one swap: the same torch version, and none of the CUDA-only packages)."""
    venv = Path(os.environ.get("QWEN_LORA_VENV", REPO / ".venv"))
    frozen = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "freeze",
            "--all",
            "--exclude-editable",
            "--disable-pip-version-check",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installed = {
        name.lower().replace("_", "-"): version
        for name, version in (line.split("==") for line in frozen.splitlines() if "==" in line)
        if name != "pip"
    }
    locked = _locked()
    if "+cpu" in installed.get("torch", ""):
        locked = {n: v for n, v in locked.items() if not n.startswith(CUDA_ONLY)}
        installed = {n: v.removesuffix("+cpu") for n, v in installed.items()}
    assert installed == locked, (
        f"differs from the lock: {sorted(set(installed.items()) ^ set(locked.items()))}; run bash scripts/setup.sh"
    )


def test_without_a_gpu_the_cpu_build_of_the_locked_torch_is_swapped_in(tmp_path, cpu_index):
    root = _copy_of_setup(tmp_path)
    log = _fake_venv(root)
    done = _run(root, cpu_index=cpu_index)
    assert done.returncode == 0, done.stderr
    calls = log.read_text()
    torch_line = next(line for line in calls.splitlines() if "--index-url" in line)
    locked = _locked()
    assert (
        f"--no-deps --index-url {cpu_index} torch=={locked['torch']} torchvision=={locked['torchvision']}" in torch_line
    )
    rest = [line.strip() for line in calls.splitlines() if line.startswith("  ")]
    assert rest and not any(line.startswith(("torch==", "torchvision==", *CUDA_ONLY)) for line in rest)
    assert f"accelerate=={locked['accelerate']}" in rest and "-e ." in calls
    # A second run keeps the build this venv was made with and asks no index again.
    again = _run(root, cpu_index="http://127.0.0.1:9/unreachable")
    assert again.returncode == 0 and again.stderr == ""


def test_an_unreachable_cpu_index_falls_back_to_the_lock_and_says_so(tmp_path):
    root = _copy_of_setup(tmp_path)
    log = _fake_venv(root)
    done = _run(root, cpu_index="http://127.0.0.1:9/whl/cpu")
    assert done.returncode == 0, done.stderr
    assert "did not answer within 5 s" in done.stderr and "lock's default torch build" in done.stderr
    calls = log.read_text()
    assert "--index-url" not in calls and "--no-deps -r requirements.lock" in calls


def test_with_a_gpu_the_lock_is_installed_as_it_is_and_no_index_is_asked(tmp_path, cpu_index):
    root = _copy_of_setup(tmp_path)
    log = _fake_venv(root)
    done = _run(root, gpu=True, cpu_index=cpu_index)
    assert done.returncode == 0 and "did not answer" not in done.stderr
    assert "--index-url" not in log.read_text() and "-r requirements.lock" in log.read_text()


def test_torch_index_url_still_overrides(tmp_path):
    root = _copy_of_setup(tmp_path)
    log = _fake_venv(root)
    done = _run(root, TORCH_INDEX_URL="https://download.pytorch.org/whl/cu128")
    assert done.returncode == 0, done.stderr
    torch_line = next(line for line in log.read_text().splitlines() if "--index-url" in line)
    assert "--no-deps" not in torch_line  # a CUDA build brings its own CUDA packages
    assert "--index-url https://download.pytorch.org/whl/cu128 torch==" in torch_line


def test_a_disk_too_small_for_torch_is_refused_before_the_venv_with_the_cpu_build_as_next_step(tmp_path):
    root = _copy_of_setup(tmp_path)
    done = _run(root, need_gb=10**6)
    assert done.returncode == 1
    assert "GB free" in done.stderr and "needs about 1000000 GB" in done.stderr
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in done.stderr
    assert not (root / ".venv").exists(), "a refused set-up must not leave a half-made .venv"


def test_a_venv_that_already_has_torch_skips_the_disk_check_and_installs(tmp_path):
    root = _copy_of_setup(tmp_path)
    log = _fake_venv(root)
    done = _run(root, need_gb=10**6)
    assert done.returncode == 0, done.stderr
    calls = log.read_text()
    assert "pip --disable-pip-version-check install" in calls and "-e ." in calls
    assert (root / ".venv" / ".qwen-lora-setup").exists()


def test_accelerate_gets_a_default_config_once_so_the_readme_command_needs_no_flags(tmp_path):
    root = _copy_of_setup(tmp_path)
    _fake_venv(root)
    accelerate = root / ".venv" / "bin" / "accelerate"
    config = root / "hf-home" / "accelerate" / "default_config.yaml"
    accelerate.write_text(f'#!/usr/bin/env bash\nmkdir -p {config.parent}; echo "$*" > {config}\n')
    accelerate.chmod(0o755)
    done = _run(root)
    assert done.returncode == 0 and config.read_text() == "config default\n" and str(config) in done.stderr
    config.write_text("mine\n")  # a user's own config is never replaced
    assert _run(root).returncode == 0 and config.read_text() == "mine\n"


def test_a_missing_lock_is_one_line_naming_it(tmp_path):
    root = _copy_of_setup(tmp_path)
    (root / "requirements.lock").unlink()
    done = _run(root)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "requirements.lock is missing" in done.stderr


def test_pyproject_bounds_admit_the_locked_versions():
    """A library user's install (pyproject ranges) can resolve to what the lock tested."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    locked = _locked()
    reqs = [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]
    for req in map(Requirement, reqs):
        name = req.name.lower().replace("_", "-")
        assert name in locked, f"{name} is in pyproject.toml but not in the lock"
        assert req.specifier.contains(locked[name]), f"{req} does not admit the locked {locked[name]}"
        assert any(s.operator in ("<", "<=", "==") for s in req.specifier), f"{req} has no upper bound"
