"""A non-editable install (a wheel, as the container installs it) finds its recipes without the checkout."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_wheel_install_finds_the_recipes(tmp_path):
    src = tmp_path / "src"  # built from a copy: building writes build/ and *.egg-info next to setup.py
    src.mkdir()
    for name in ("setup.py", "recipes", "tmd_megatron", "kernels"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(
            REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if (REPO / name).is_dir() else {}))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(src)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "wheel").glob("tmd_megatron-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    shutil.rmtree(src)  # nothing of the checkout is left to find
    probe = ("import tmd_megatron; from tmd_megatron.training.config import compose, recipe_dir, resolve; "
             "r = resolve(compose(['experiment=wan14b_tmd_n4h5_m1', 'model.init=/x'])); "
             "print(tmd_megatron.__file__, recipe_dir(), r.raw.parallel.tp, sep='\\n')")
    env = {k: v for k, v in os.environ.items() if k not in ("TMD_RECIPES", "PYTHONPATH")}
    env["PYTHONPATH"] = str(tmp_path / "site")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    module, recipes, tp = out.stdout.split()
    assert module.startswith(str(tmp_path / "site")) and recipes == str(tmp_path / "site" / "tmd_megatron" / "recipes")
    assert tp == "4"  # recipes/parallel/h100_14b.yaml, read from the installed wheel
