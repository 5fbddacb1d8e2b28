"""Shard format: what is written is what is read (checked with the standard library too), and bad shards or
samples are named and refused, never misread."""
import io
import json
import logging
import tarfile

import numpy as np
import pytest
import torch
from data_fixtures import member_span, npy_bytes, overwrite, refresh_crc, write_random_shards

from tmd_megatron.data import ShardError, ShardWriter, build_index, make_loader, open_shard
from tmd_megatron.data.format import index_path


def read_all(root, **kw):
    """Every sample once, in stream order of rank 0 of 1, as {key: batch row}."""
    loader = make_loader(root, 1, backend="torch", num_epochs=1, text_len=16, **kw)
    return {b["key"][0]: b for b in loader}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    written = write_random_shards(tmp_path, dtype=dtype, noise=True)
    got = read_all(tmp_path)
    assert sorted(got) == sorted(written)
    for key, item in written.items():
        b = got[key]
        n = item["context"].shape[0]
        assert b["latent"].dtype == dtype and torch.equal(b["latent"][0], item["latent"])
        assert torch.equal(b["noise"][0], item["noise"])
        assert torch.equal(b["context"][0, :n], item["context"]) and int(b["context_len"][0]) == n
        assert not b["context"][0, n:].any()
        assert b["prompt"][0] == item["prompt"] and b["meta"][0] == item["meta"]


def test_other_tools_read_the_tar_as_documented(tmp_path):
    """docs/data.md's description, checked with tarfile + numpy only (bf16 stored as its uint16 bits)."""
    written = write_random_shards(tmp_path, num_shards=1, per_shard=2, dtype=torch.bfloat16)
    with tarfile.open(tmp_path / "part-000.tar") as tar:
        names = tar.getnames()
        assert names[:5] == ["s00000.latent.npy", "s00000.context.npy", "s00000.txt", "s00000.json",
                             "s00001.latent.npy"]
        lat = np.load(io.BytesIO(tar.extractfile("s00001.latent.npy").read()))
        meta = json.loads(tar.extractfile("s00001.json").read())
        prompt = tar.extractfile("s00001.txt").read().decode()
    item = written["s00001"]
    assert lat.dtype == np.dtype("<u2")
    assert torch.equal(torch.from_numpy(lat.astype(np.int32)).to(torch.int16).view(torch.bfloat16), item["latent"])
    assert meta == {"context_len": item["context"].shape[0], "meta": item["meta"]} and prompt == item["prompt"]


def test_build_index_for_a_tar_written_elsewhere(tmp_path):
    lat = np.random.default_rng(0).standard_normal((16, 1, 2, 2)).astype(np.float32)
    ctx = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    with tarfile.open(tmp_path / "foreign.tar", "w") as tar:
        for name, data in [("a.latent.npy", npy_bytes(lat)), ("a.context.npy", npy_bytes(ctx)),
                           ("a.txt", b"hello"), ("a.json", json.dumps({"context_len": 3}).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ShardError, match="has no index.*tmd-preprocess index"):
        open_shard(tmp_path / "foreign.tar")
    assert build_index(tmp_path / "foreign.tar") == 1
    b = read_all(tmp_path)["a"]
    assert torch.equal(b["latent"][0], torch.from_numpy(lat))
    assert torch.equal(b["context"][0, :3], torch.from_numpy(ctx))


def test_writer_refuses_bad_samples(tmp_path):
    good_lat, good_ctx = torch.zeros(16, 1, 2, 2), torch.zeros(2, 8)
    with ShardWriter(tmp_path / "x.tar") as w:
        bad = good_lat.clone()
        bad[0, 0, 0, 0] = float("nan")
        with pytest.raises(ShardError, match="non-finite"):
            w.add("a", bad, good_ctx, "p")
        with pytest.raises(ShardError, match="float32 or bfloat16"):
            w.add("a", good_lat.half(), good_ctx, "p")
        with pytest.raises(ShardError, match="4-d"):
            w.add("a", good_lat[0], good_ctx, "p")
        with pytest.raises(ShardError, match="no dots"):
            w.add("a.b", good_lat, good_ctx, "p")
        with pytest.raises(ShardError, match="at least its EOS"):
            w.add("a", good_lat, good_ctx[:0], "p")
        w.add("a", good_lat, good_ctx, "p")
        with pytest.raises(ShardError, match="twice"):
            w.add("a", good_lat, good_ctx, "p")
    assert len(open_shard(tmp_path / "x.tar").samples) == 1
    with pytest.raises(ShardError, match="end in .tar"):
        ShardWriter(tmp_path / "x.bin")


def test_unfinished_shard_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "x.tar") as w:
            w.add("a", torch.zeros(16, 1, 2, 2), torch.zeros(2, 8), "p")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []


def test_truncated_shard_is_refused_or_skipped_by_name(tmp_path, caplog):
    written = write_random_shards(tmp_path)
    path = tmp_path / "part-001.tar"
    path.write_bytes(path.read_bytes()[:3000])
    with pytest.raises(ShardError, match="part-001.tar is 3000 bytes.*truncated"):
        read_all(tmp_path)
    with caplog.at_level(logging.WARNING):
        got = read_all(tmp_path, on_corrupt="skip")
    assert sorted(got) == sorted(k for k in written if not 5 <= int(k[1:]) < 10)
    assert "part-001.tar" in caplog.text


def test_corrupt_bytes_are_caught_by_crc(tmp_path, caplog):
    written = write_random_shards(tmp_path)
    path = tmp_path / "part-002.tar"
    offset, size = member_span(path, "s00012.latent.npy")
    overwrite(path, offset + size - 3, b"\x00\x01\x02")
    with pytest.raises(ShardError, match=r"part-002.tar: sample 's00012' member latent.npy is corrupt"):
        read_all(tmp_path)
    with caplog.at_level(logging.WARNING):
        got = read_all(tmp_path, on_corrupt="skip")
    assert sorted(got) == sorted(k for k in written if k != "s00012")
    assert "s00012" in caplog.text


def test_non_finite_and_bad_header_caught_even_with_matching_crc(tmp_path):
    nan_dir, header_dir = tmp_path / "nan", tmp_path / "header"
    for root in (nan_dir, header_dir):
        write_random_shards(root, num_shards=1, dtype=torch.bfloat16)
    path = nan_dir / "part-000.tar"
    offset, size = member_span(path, "s00003.context.npy")
    overwrite(path, offset + size - 2, np.array([0x7FC0], dtype="<u2").tobytes())  # a bfloat16 NaN
    refresh_crc(path, "s00003", "context.npy")
    with pytest.raises(ShardError, match="s00003.*context has non-finite values"):
        read_all(nan_dir)
    assert sorted(read_all(nan_dir, on_corrupt="skip")) == ["s00000", "s00001", "s00002", "s00004"]
    path = header_dir / "part-000.tar"
    offset, _ = member_span(path, "s00001.latent.npy")
    overwrite(path, offset, b"\x93NUMPX")
    refresh_crc(path, "s00001", "latent.npy")
    with pytest.raises(ShardError, match="s00001.*latent.npy: not a valid npy"):
        read_all(header_dir)


def test_index_must_agree_with_the_arrays(tmp_path):
    write_random_shards(tmp_path, num_shards=1, per_shard=2)
    idx = json.loads(index_path(tmp_path / "part-000.tar").read_text())
    idx["samples"][1]["context_len"] += 1
    index_path(tmp_path / "part-000.tar").write_text(json.dumps(idx))
    with pytest.raises(ShardError, match="s00001.*disagree with the index"):
        read_all(tmp_path)


def test_mixed_datasets_are_refused(tmp_path):
    write_random_shards(tmp_path, num_shards=1)
    with ShardWriter(tmp_path / "zz.tar") as w:
        w.add("odd", torch.zeros(16, 2, 4, 6), torch.zeros(2, 8), "p")
    with pytest.raises(ShardError, match="zz.tar.*latent_shape.*separate datasets"):
        read_all(tmp_path)


def test_cli_verify_names_bad_samples_and_index_builds(tmp_path, capsys):
    from tmd_megatron.cli.preprocess import main as cli

    write_random_shards(tmp_path)
    assert cli(["verify", str(tmp_path)]) == 0
    assert "3 shards, 15 samples" in capsys.readouterr().out
    path = tmp_path / "part-000.tar"
    offset, _ = member_span(path, "s00002.txt")
    overwrite(path, offset, b"X")
    assert cli(["verify", str(tmp_path)]) == 1
    assert "BAD: part-000.tar: sample 's00002' member txt is corrupt" in capsys.readouterr().out
    index_path(tmp_path / "part-001.tar").unlink()
    assert cli(["index", str(tmp_path / "part-001.tar")]) == 0
    assert len(open_shard(tmp_path / "part-001.tar").samples) == 5
