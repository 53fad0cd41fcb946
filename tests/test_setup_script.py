"""scripts/setup.sh refuses a disk too full for torch up front, with the way out, instead of pip's Errno 28."""

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _copy_of_setup(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    return tmp_path


def _run(root: Path, need_gb: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "SETUP_NEED_GB": str(need_gb)}
    env.pop("TORCH_INDEX_URL", None)
    return subprocess.run(["bash", "scripts/setup.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=60)


def test_a_disk_too_small_for_torch_is_refused_before_the_venv_with_the_cpu_build_as_next_step(tmp_path):
    root = _copy_of_setup(tmp_path)
    done = _run(root, need_gb=10**6)
    assert done.returncode == 1
    assert "GB free" in done.stderr and "needs about 1000000 GB" in done.stderr
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in done.stderr
    assert not (root / ".venv").exists(), "a refused set-up must not leave a half-made .venv"


def test_a_venv_that_already_has_torch_skips_the_disk_check_and_installs(tmp_path):
    root = _copy_of_setup(tmp_path)
    torch_pkg = root / ".venv" / "lib" / "python3.11" / "site-packages" / "torch"
    torch_pkg.mkdir(parents=True)
    (torch_pkg / "__init__.py").write_text("")
    fake_python = root / ".venv" / "bin" / "python"
    fake_python.parent.mkdir()
    fake_python.write_text(f'#!/usr/bin/env bash\necho "$*" >> {root / "calls.log"}\n')
    fake_python.chmod(0o755)

    done = _run(root, need_gb=10**6)

    assert done.returncode == 0, done.stderr
    calls = (root / "calls.log").read_text()
    assert "pip --disable-pip-version-check install" in calls and "-e .[" in calls
    assert (root / ".venv" / ".qwen-lora-setup").exists()
