import json
import subprocess
import sys

import torch

from tmd_megatron.cli.convert import main, parse_size
from tmd_megatron.models.wan import WanModel
from wan_reference import diffusers_wan, ours_from_diffusers, sample_inputs


def test_convert_round_trip_through_both_formats(tmp_path, capsys):
    ref = diffusers_wan()
    src = tmp_path / "src"
    ours_from_diffusers(ref).save_pretrained(src, format="original")
    assert main([str(src), str(tmp_path / "d"), "--to", "diffusers", "--shard-size", "30KB"]) == 0
    assert json.loads((tmp_path / "d" / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    assert len(list((tmp_path / "d").glob("*-of-*.safetensors"))) > 1
    assert main([str(tmp_path / "d"), str(tmp_path / "o"), "--to", "original"]) == 0
    x, t, ctx = sample_inputs()
    with torch.no_grad():
        a = WanModel.from_pretrained(src)(x, t, ctx)
        b = WanModel.from_pretrained(tmp_path / "o")(x, t, ctx)
    assert torch.equal(a, b)
    assert "wrote" in capsys.readouterr().out


def test_convert_reports_bad_input_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tmd_megatron.cli.convert", str(tmp_path / "nope"), str(tmp_path / "x"), "--to", "original"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_parse_size():
    assert parse_size("5GB") == 5 * 2**30 and parse_size("30KB") == 30 * 1024 and parse_size("123") == 123
