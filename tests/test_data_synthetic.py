"""Synthetic task: labels agree with what the pixels show, latents decode exactly, the generator is seeded."""
import pytest
import torch

from tmd_megatron.cli.preprocess import main as cli
from tmd_megatron.data import make_loader
from tmd_megatron.data.synthetic import ATTRIBUTES, RGB, SYNTHETIC_VERSION, VOCAB, SyntheticTask


def object_stats(clip):
    """From pixels alone: per-frame object mask, mean object colour, centroid (row, col), pixel count."""
    mask = (clip > -1).any(dim=0)  # [F, S, S]: background is -1 in every channel
    rows = torch.arange(clip.shape[-2]).view(1, -1, 1).float()
    cols = torch.arange(clip.shape[-1]).view(1, 1, -1).float()
    count = mask.sum(dim=(1, 2)).float()
    centroid = torch.stack([(mask * rows).sum(dim=(1, 2)) / count, (mask * cols).sum(dim=(1, 2)) / count], dim=1)
    colour = (clip * mask).sum(dim=(1, 2, 3)) / mask.sum()
    return mask, colour, centroid, count


def test_labels_match_the_pixels():
    task = SyntheticTask(frames=3, size=16)
    seen = {k: set() for k in ATTRIBUTES}
    for i in range(200):
        s = task.sample(i, seed=1)
        mask, colour, centroid, count = object_stats(s.clip)
        assert s.prompt == f"a {s.labels['size']} {s.labels['colour']} {s.labels['shape']} moving {s.labels['motion']}"
        nearest = min(RGB, key=lambda c: float((torch.tensor(RGB[c]) - colour).norm()))
        assert nearest == s.labels["colour"]
        d_row, d_col = (centroid[-1] - centroid[0]).tolist()
        direction = ("down" if d_row > 0 else "up") if abs(d_row) > abs(d_col) else ("right" if d_col > 0 else "left")
        assert direction == s.labels["motion"] and max(abs(d_row), abs(d_col)) == pytest.approx(4.0)  # 2 px per frame
        assert bool((count == count[0]).all())  # the shape stays fully inside the frame
        assert (float(count[0]) > 30) == (s.labels["size"] == "large")
        for k, v in s.labels.items():
            seen[k].add(v)
    assert all(seen[k] == set(v) for k, v in ATTRIBUTES.items())  # every attribute value occurs


def test_scale_draws_the_same_scene_larger():
    """scale 2 on 32x32: the same labels, 2x the travel (4 px per frame), about 4x the pixel area of the scale-1
    shape; scale 1 is the default task, pixel for pixel."""
    small, big = SyntheticTask(size=16), SyntheticTask(size=32, scale=2)
    ratios = []
    assert torch.equal(SyntheticTask(size=16, scale=1).sample(3, 1).clip, small.sample(3, 1).clip)
    for i in range(40):
        a, b = small.sample(i, seed=1), big.sample(i, seed=1)
        assert a.labels == b.labels and b.clip.shape == (3, 3, 32, 32)
        _, _, c_a, n_a = object_stats(a.clip)
        _, _, c_b, n_b = object_stats(b.clip)
        assert float((c_b[-1] - c_b[0]).abs().max()) == pytest.approx(2 * float((c_a[-1] - c_a[0]).abs().max()))
        assert bool((n_b == n_b[0]).all())  # still fully inside the frame
        ratios.append(float(n_b[0] / n_a[0]))
    assert 3.6 < sum(ratios) / len(ratios) < 4.4  # area ~ radius^2; single thin crosses rasterise up to 7x
    with pytest.raises(ValueError, match="at least 24"):
        SyntheticTask(size=16, scale=2)


def test_shapes_are_distinct_at_equal_size_and_place():
    task = SyntheticTask()
    masks = [task.render({"shape": sh, "colour": "red", "motion": "left", "size": "large"}, (7.5, 11.5))[0] > 0
             for sh in ATTRIBUTES["shape"]]
    assert len({tuple(m.flatten().tolist()) for m in masks}) == len(masks)


def test_latent_round_trip_and_scale():
    task = SyntheticTask()
    clips, ids = task.clips(256, seed=0)
    latent = task.encode_clip(clips)
    assert latent.shape == (256, 16, 3, 8, 8) and ids.shape == (256, 4)
    torch.testing.assert_close(task.decode_latent(latent), clips, rtol=0, atol=1e-5)
    assert 0.8 < float(latent.std()) < 1.25  # about unit scale, like Wan's normalised latents
    # Space-to-depth by hand: latent channels are a fixed linear map of each 2x2 block's 12 colour values.
    block = clips[0, :, 1, 2:4, 6:8] + 1  # [3, 2, 2]: latent cell (h=1, w=3) of frame 1
    torch.testing.assert_close(latent[0, :, 1, 1, 3], 2.33 * task.projection @ block.reshape(12))


def test_text_encoder_is_fixed_and_versioned():
    a, b = SyntheticTask(), SyntheticTask()
    prompt = "a small blue cross moving up"
    assert torch.equal(a.encode_text(prompt), b.encode_text(prompt))
    emb = a.encode_text(prompt)
    assert emb.shape == (7, 32)  # 6 words + EOS
    assert torch.equal(emb[-1], a.encode_text("")[0])  # the negative prompt is the EOS row alone
    assert torch.equal(emb[1], a.text_table[VOCAB.index("small")])
    assert len({tuple(r.tolist()) for r in a.text_table}) == len(VOCAB)
    with pytest.raises(ValueError, match="purple.*not in the synthetic vocabulary"):
        a.encode_text("a purple circle")


def test_shards_are_reproducible_and_carry_labels(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert cli(["synthetic", str(tmp_path / name), "--num-samples", "10", "--seed", str(seed),
                    "--samples-per-shard", "4", "--no-progress"]) == 0
    files = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert files == ["synthetic-000000.tar", "synthetic-000001.tar", "synthetic-000002.tar"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
        assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()
    task = SyntheticTask()
    for b in make_loader(tmp_path / "a", 5, backend="torch", text_len=16, num_epochs=1):
        for j, meta in enumerate(b["meta"]):
            s = task.sample(meta["index"], seed=3)
            assert meta["version"] == SYNTHETIC_VERSION and meta["labels"] == s.labels
            assert meta["label_ids"] == {k: ATTRIBUTES[k].index(v) for k, v in s.labels.items()}
            torch.testing.assert_close(task.decode_latent(b["latent"][j]), s.clip, rtol=0, atol=1e-5)


def test_image_conditioned_mode_gives_the_first_frame(tmp_path):
    """The conditioning latent is the encoding of (first frame, grey frames), Wan's I2V input; the image tokens
    depend on the frame; shards carry both."""
    from tmd_megatron.data import make_loader

    task = SyntheticTask(image_dim=6, image_len=5)
    s, other = task.sample(0, 0), task.sample(1, 0)
    cond = task.image_condition(s.clip[:, 0])
    assert torch.equal(cond["cond"][:, 0], task.encode_clip(s.clip)[:, 0])
    grey = task.encode_clip(torch.zeros_like(s.clip))
    assert torch.equal(cond["cond"][:, 1:], grey[:, 1:])
    assert cond["clip"].shape == (5, 6)
    assert not torch.allclose(task.image_condition(other.clip[:, 0])["clip"], cond["clip"])
    batched = task.image_condition(torch.stack([s.clip[:, 0], other.clip[:, 0]]))
    assert torch.allclose(batched["clip"][0], cond["clip"], atol=1e-6) and torch.equal(batched["cond"][0], cond["cond"])
    task.write_shards(tmp_path, 4, seed=0, image=True)
    b = next(iter(make_loader(tmp_path, 4, backend="torch", text_len=8, num_epochs=1)))
    i = b["meta"][0]["index"]
    assert torch.equal(b["cond"][0], task.image_condition(task.sample(i, 0).clip[:, 0])["cond"])
    assert b["clip"].shape == (4, 5, 6)
