"""Loaders: DP sharding, determinism, exact resume, Wan padding, and DALI == torch batch for batch."""
import json
import logging

import pytest
import torch
from data_fixtures import member_span, overwrite, write_random_shards

from tmd_megatron.data import LoaderPosition, ShardError, make_loader
from tmd_megatron.data.loader_dali import dali_available

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not importable (pip install "
                                "nvidia-dali-cuda130; CI installs it with the test extra)")
BACKENDS = ["torch", pytest.param("dali", marks=needs_dali)]
TEXT_LEN = 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return root, write_random_shards(root, num_shards=3, per_shard=7, noise=True, image=True)  # 21 samples


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


@pytest.mark.parametrize("backend", BACKENDS)
def test_epoch_is_split_between_dp_ranks_and_padded_like_wan(shards, backend):
    root, written = shards
    keys = list(written)
    seen = []
    for rank in range(2):
        batches = list(make_loader(root, 5, rank, 2, seed=3, backend=backend, num_epochs=1, text_len=TEXT_LEN))
        assert len(batches) == 2  # 21 // 2 = 10 samples per rank
        for b in batches:
            for i, key in enumerate(b["key"]):
                item = written[key]
                assert int(b["index"][i]) == keys.index(key)
                ctx = item["context"]
                wan = torch.cat([ctx, ctx.new_zeros(TEXT_LEN - len(ctx), ctx.shape[1])])  # trim + zero-pad rule
                assert torch.equal(b["context"][i], wan) and int(b["context_len"][i]) == len(ctx)
                for name in ("latent", "noise", "cond", "clip"):  # the optional members come in the batch too
                    assert torch.equal(b[name][i], item[name]), name
                assert b["prompt"][i] == item["prompt"] and b["meta"][i] == item["meta"]
            seen.append(set(b["key"]))
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == 20  # disjoint across ranks and batches


def test_order_depends_on_seed_and_epoch_only(shards):
    root, _ = shards

    def order(seed, start=None, n=4):
        loader = make_loader(root, 5, 1, 2, seed=seed, backend="torch", start=start, text_len=TEXT_LEN)
        return [b["index"].tolist() for b in take(loader, n)]

    first = order(7)
    assert first == order(7)
    assert first != order(8)
    assert first[0] != first[2]  # epoch 1 is reshuffled
    # Starting directly at epoch 1 reproduces the second epoch of a run from the beginning.
    assert order(7, LoaderPosition(epoch=1, seed=7, dp_rank=1, dp_size=2, num_samples=21), n=2) == first[2:]


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_continues_the_exact_sequence(shards, backend):
    root, _ = shards
    kw = dict(dp_rank=0, dp_size=2, seed=11, backend=backend, text_len=TEXT_LEN)
    full = take(make_loader(root, 3, **kw), 9)  # 27 samples: crosses two epoch ends mid-batch
    for cut in (1, 3, 4):
        first = make_loader(root, 3, **kw)
        take(first, cut)
        saved = json.loads(json.dumps(first.position()))
        assert_same_batches(take(make_loader(root, 3, start=saved, **kw), 9 - cut), full[cut:])


def test_resume_refuses_a_position_from_another_layout(shards):
    root, _ = shards
    loader = make_loader(root, 3, 0, 2, seed=1, backend="torch", text_len=TEXT_LEN)
    next(loader)
    pos = loader.position()
    with pytest.raises(ValueError, match="dp_size.*same seed, data-parallel layout"):
        make_loader(root, 3, 0, 4, seed=1, backend="torch", start=pos, text_len=TEXT_LEN)
    with pytest.raises(ValueError, match="seed"):
        make_loader(root, 3, 0, 2, seed=2, backend="torch", start=pos, text_len=TEXT_LEN)


@needs_dali
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dali_and_torch_give_identical_batches_on_two_dp_ranks(tmp_path, dtype):
    write_random_shards(tmp_path, num_shards=2, per_shard=6, dtype=dtype, noise=dtype == torch.bfloat16, image=True)
    for rank in range(2):
        kw = dict(dp_rank=rank, dp_size=2, seed=5, text_len=TEXT_LEN, num_epochs=3)
        ref = list(make_loader(tmp_path, 4, backend="torch", **kw))
        got = list(make_loader(tmp_path, 4, backend="dali", **kw))
        assert len(ref) == 4  # 3 epochs x 6 samples / 4, last partial batch dropped
        assert_same_batches(got, ref)
        assert ref[0]["latent"].dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_sample_is_skipped_identically_or_refused(tmp_path, backend, caplog):
    write_random_shards(tmp_path, num_shards=2, per_shard=5)
    path = tmp_path / "part-001.tar"
    offset, _ = member_span(path, "s00007.context.npy")
    overwrite(path, offset + 100, b"\xff\xff\xff\xff")
    kw = dict(dp_rank=1, dp_size=2, seed=0, text_len=TEXT_LEN, num_epochs=2)
    with pytest.raises(ShardError, match="part-001.tar: sample 's00007' member context.npy is corrupt"):
        list(make_loader(tmp_path, 2, backend=backend, **kw))
    with caplog.at_level(logging.WARNING):
        got = list(make_loader(tmp_path, 2, backend=backend, on_corrupt="skip", **kw))
    assert "s00007" in caplog.text
    keys = [k for b in got for k in b["key"]]
    assert "s00007" not in keys
    assert_same_batches(got, list(make_loader(tmp_path, 2, backend="torch", on_corrupt="skip", **kw)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_context_longer_than_text_len_is_refused(shards, backend):
    root, _ = shards
    with pytest.raises(ValueError, match="more than text_len=2: tokenize with max_length=2"):
        list(make_loader(root, 2, backend=backend, text_len=2, num_epochs=1))


def test_bad_arguments_name_the_fix(shards):
    root, _ = shards
    with pytest.raises(ValueError, match="choose one of"):
        make_loader(root, 2, backend="jax")
    with pytest.raises(ValueError, match="dp_rank=2 must be in"):
        make_loader(root, 2, 2, 2, backend="torch")
    with pytest.raises(ValueError, match="move them yourself"):
        make_loader(root, 2, backend="torch", device_id=0)
    with pytest.raises(ShardError, match="no .tar shards"):
        make_loader(root / "nothing-here-*.tar", 2, backend="torch")
