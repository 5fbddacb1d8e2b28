"""The bad-input battery (cases: bad_input_cases.py, harness: bad_inputs.py): for every case, the exit code, one
message with the expected phrase, no traceback, and nothing changed outside the case's own new files."""
import re

import pytest

from bad_input_cases import CASES
from bad_inputs import REPO, build_world, run_case, unshare_prefix

TOOLS = {"tmd-train", "tmd-plan", "tmd-sample", "tmd-convert", "tmd-preprocess", "launcher", "run dir"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def test_the_battery_covers_every_tool():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert {c.tool for c in CASES} == TOOLS
    for needed in ("rundir-planted-pickle", "rundir-latest-relative-escape", "convert-over-user-dir",
                   "convert-over-run", "rundir-resume-never"):
        assert any(c.id == needed for c in CASES), needed


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(world, case):
    if case.mode == "unshare" and unshare_prefix() is None:
        pytest.skip("needs a private mount namespace (unshare --mount, or a user namespace), refused here")
    r = run_case(case, world)
    assert r.code == case.code, r.output
    assert not r.traceback, r.output
    assert case.says in r.output, r.output
    assert not r.changed, (r.changed, r.output)
    if case.check:
        case.check(world, world / "cases" / case.id, r.output)


def _launcher_default(script: str, name: str) -> str:
    return re.search(rf'^: "\${{{name}:=([^}}]*)}}"', (REPO / "launch" / script).read_text(), re.M).group(1)


@pytest.mark.parametrize("script", ["tmd_14b.sh", "tmd_1p3b.sh"])
def test_launcher_layout_defaults_are_the_recipes(script):
    """What a launcher passes as parallel.tp/cp/pp by default is what its recipe plans (tmd-plan shows the layout
    that runs); tmd_1p3b.sh used to force CP1 over the recipe's CP2."""
    from tmd_megatron.training.config import compose, resolve

    recipe = _launcher_default(script, "TMD_RECIPE")
    parallel = resolve(compose([f"experiment={recipe}", "model.init=/x"])).raw.parallel
    got = {k: int(_launcher_default(script, f"TMD_{k.upper()}")) for k in ("tp", "cp", "pp")}
    assert got == {"tp": parallel.tp, "cp": parallel.cp, "pp": parallel.pp}, (script, recipe)


def test_default_threads_share_the_cpus_among_local_ranks():
    from tmd_megatron.cli.train import default_threads

    assert default_threads({"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "8"}, 96) is None  # the operator's choice
    assert default_threads({"LOCAL_WORLD_SIZE": "8"}, 96) == 12
    assert default_threads({"SLURM_NTASKS_PER_NODE": "8(x2)"}, 96) == 12
    assert default_threads({"LOCAL_WORLD_SIZE": "8"}, 2) == 1
    assert default_threads({}, 16) == 16


def test_exports_are_group_readable(world):
    """safetensors writes 0600 files; exports get the modes the umask allows (0644 under umask 022)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    export = world / "run0" / "export"
    files = [p for p in export.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o777 == 0o666 & ~mask for p in files), \
        [(p.name, oct(p.stat().st_mode)) for p in files]


def test_the_operator_quick_start_uses_keys_and_options_that_exist():
    """docs/operations.md's quick start, command by command: every tmd-train line composes into a valid recipe and
    every other tool accepts its arguments (the whole flow was run by hand from a fresh clone; the demo test runs
    the same stages)."""
    import shlex

    from tmd_megatron.cli.preprocess import build_parser
    from tmd_megatron.training.config import compose, resolve
    from tmd_megatron.training.plan import check_recipe

    text = (REPO / "docs" / "operations.md").read_text()
    block = text.split("## Operator quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [ln.split("#", 1)[0].strip() for ln in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(ln) for ln in lines if ln]
    tools = [c[0] if not c[0].startswith("TMD_") else c[1] for c in commands]
    assert tools == ["make", "tmd-train", "tmd-preprocess", "tmd-plan", "tmd-train", "tmd-train", "tmd-sample",
                     "bash"], tools
    for cmd in commands:
        if cmd[0] == "tmd-train":
            res = resolve(compose(cmd[1:]))
            assert check_recipe(res, 1) == [], cmd
        elif cmd[0] == "tmd-plan":
            assert resolve(compose([f"experiment={cmd[1]}", *[a for a in cmd[2:] if "=" in a]])) is not None
        elif cmd[0] == "tmd-preprocess":
            build_parser().parse_args(cmd[1:])
