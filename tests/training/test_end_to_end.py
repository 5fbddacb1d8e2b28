"""The main job end to end on CPU (make demo at a tiny budget), tmd-sample, and the trainer's previews."""
import subprocess
import sys

import pytest
import torch

from tmd_megatron.algorithms.sampling import effective_nfe
from tmd_megatron.cli.sample import main as sample_main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([sys.executable, "-m", "tmd_megatron.demo", "--out", str(out), "--scale", "0.01"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def test_demo_runs_every_stage_and_samples(demo):
    out, text = demo
    for stage in ("teacher", "tmd_stage1", "tmd_stage2", "dmd2v"):
        assert (out / stage / "export").is_dir(), stage
        assert f"  {stage}" in text
    assert (out / "tmd_stage2" / "export" / "student.json").exists()
    for kind in ("teacher", "tmd", "dmd2v"):
        assert len(list((out / "samples" / kind).glob("*.mp4"))) == 4
    # TMD N2H1 with M=2 on 4 blocks: Eq. 16 gives 2·(1 + 1·1/4) = 2.5, measured by counting block calls
    assert "TMD N2H1, M=2                2.50" in text, text
    assert "teacher (Euler, CFG 5)     100.00" in text, text


def test_tmd_sample_measures_eq16_and_writes_videos(demo, tmp_path, capsys):
    out, _ = demo
    student = out / "tmd_stage2" / "export"
    assert sample_main([str(student), "--prompts", "red circle moving left", "blue square moving up", "--synthetic",
                        "--inner-steps", "4", "--out", str(tmp_path)]) == 0
    want = effective_nfe(2, 4, 1, 4)
    assert f"effective NFE {want:.2f} (measured)" in capsys.readouterr().out
    saved = torch.load(tmp_path / "0000.pt", weights_only=True)
    assert saved["latent"].shape == (16, 3, 8, 8) and saved["sampler"] == "tmd"
    assert (tmp_path / "0001.mp4").stat().st_size > 0
    with pytest.raises(SystemExit):
        sample_main([str(out / "dmd2v" / "export"), "--sampler", "tmd", "--prompts", "x", "--synthetic",
                     "--out", str(tmp_path)])


def test_trainer_previews(tmp_path):
    import io

    from tmd_megatron.parallel import Topology
    from tmd_megatron.training.config import compose, resolve
    from tmd_megatron.training.trainer import Trainer

    res = resolve(compose(["experiment=tiny_smoke", f"run.out_dir={tmp_path}", "run.max_steps=2", "run.sample_every=2",
                           "run.num_samples=3", "run.tensorboard=false"]))
    Trainer(res, Topology.single(), stream=io.StringIO()).fit()
    folder = tmp_path / "samples" / "step_00000002"
    saved = torch.load(folder / "latents.pt", weights_only=True)
    assert saved["latents"].shape == (3, 16, 3, 8, 8) and saved["nfe"] == effective_nfe(2, 2, 1, 4)
    assert len(list(folder.glob("*.mp4"))) == 3


def test_tmd_sample_decodes_through_the_wan_vae(demo, tmp_path, capsys):
    """--vae: latents decoded by diffusers' AutoencoderKLWan (a tiny random one here) into mp4 files."""
    from test_data_preprocess import tiny_vae

    import av

    out, _ = demo
    tiny_vae().save_pretrained(tmp_path / "vae")
    assert sample_main([str(out / "tmd_stage2" / "export"), "--prompts", "red circle moving left", "--synthetic",
                        "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "v")]) == 0
    with av.open(str(tmp_path / "v" / "0000.mp4")) as c:
        frames = [f for f in c.decode(video=0)]
    assert len(frames) == 4 * (3 - 1) + 1  # Wan's VAE: 4x temporal upsampling of 3 latent frames


def _write_png(path, rgb_H_W_3):
    import av
    import numpy as np

    with av.open(str(path), "w", format="image2") as out:
        stream = out.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = rgb_H_W_3.shape[1], rgb_H_W_3.shape[0], "rgb24"
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb_H_W_3), format="rgb24")):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


@pytest.mark.parametrize("preset", ["tiny-i2v", "tiny-ti2v"])
def test_image_conditioned_tmd_end_to_end(tmp_path, capsys, preset):
    """Teacher (flow matching), TMD stage 1 (TM-MF) and stage 2 on the synthetic task's image-conditioned mode,
    then tmd-sample with --image; the TI2V sample keeps the given first frame exactly (pinned)."""
    import io

    from tmd_megatron.data.synthetic import SyntheticTask
    from tmd_megatron.parallel import Topology
    from tmd_megatron.training.config import compose, resolve
    from tmd_megatron.training.trainer import Trainer

    common = [f"model.preset={preset}", "run.resume=never", "run.tensorboard=false", "data.synthetic.num_samples=16",
              "data.global_batch=4", "run.ckpt_every=0"]

    def train(name, overrides):
        res = resolve(compose([*overrides, *common, f"run.out_dir={tmp_path / name}"]))
        Trainer(res, Topology.single(), stream=io.StringIO()).fit()
        return tmp_path / name / "export"

    teacher = train("teacher", ["experiment=tiny_teacher", "run.max_steps=6"])
    stage1 = train("s1", ["experiment=tiny_tmd", f"model.teacher={teacher}", "method=tm_mf", "run.max_steps=2"])
    stage2 = train("s2", ["experiment=tiny_tmd", f"model.teacher={teacher}", "method=tmd", f"model.init={stage1}",
                          "run.max_steps=2"])
    assert (stage2 / "student.json").exists()

    task = SyntheticTask()
    frames = [task.sample(i, 7).clip[:, 0] for i in (0, 1)]
    images = []
    for i, frame in enumerate(frames):
        images.append(tmp_path / f"first{i}.png")
        _write_png(images[-1], ((frame.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy())
    prompts = ["red circle moving left", "red circle moving left"]
    out = tmp_path / "samples"
    assert sample_main([str(stage2), "--prompts", *prompts, "--synthetic", "--image", *map(str, images), "--out",
                        str(out)]) == 0
    got = [torch.load(out / f"{i:04d}.pt")["latent"] for i in range(2)]
    assert all(torch.isfinite(g).all() for g in got) and (out / "0001.mp4").exists()
    assert not torch.allclose(got[0], got[1], atol=1e-4)  # same prompt and seed: the images make the difference
    if preset == "tiny-ti2v":  # the first latent frame is the image's, exactly
        for frame, g in zip(frames, got):
            assert torch.allclose(g[:, 0], task.encode_clip(frame[:, None])[:, 0], atol=1e-5)
    assert sample_main([str(teacher), "--sampler", "teacher", "--teacher-steps", "3", "--prompts", prompts[0],
                        "--synthetic", "--image", str(images[0]), "--out", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    if preset == "tiny-i2v":
        with pytest.raises(SystemExit) as stop:
            sample_main([str(stage2), "--prompts", prompts[0], "--synthetic", "--out", str(tmp_path / "x")])
        assert stop.value.code == 2 and "--image" in capsys.readouterr().err
