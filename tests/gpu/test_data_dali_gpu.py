"""DALI with GPU placement: the batches land on the GPU and equal the torch loader's."""
import pytest
import torch
from data_fixtures import write_random_shards

from tmd_megatron.data import make_loader
from tmd_megatron.data.loader_dali import dali_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (DALI GPU placement)"),
    pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not importable"),
]


def test_dali_gpu_batches_equal_torch_batches(tmp_path):
    write_random_shards(tmp_path, num_shards=2, per_shard=6, dtype=torch.bfloat16, noise=True)
    for rank in range(2):
        kw = dict(dp_rank=rank, dp_size=2, seed=5, text_len=12, num_epochs=2)
        ref = list(make_loader(tmp_path, 3, backend="torch", **kw))
        got = list(make_loader(tmp_path, 3, backend="dali", device_id=0, **kw))
        assert len(got) == len(ref) == 4
        for x, y in zip(got, ref):
            for k in ("latent", "context", "noise"):
                assert x[k].is_cuda and torch.equal(x[k].cpu(), y[k])
            assert torch.equal(x["index"].cpu(), y["index"]) and x["prompt"] == y["prompt"]
