"""`make_loader`: the one entry point the trainer calls."""
from __future__ import annotations

from .stream import LoaderPosition, SampleStream, ShardSet
from .text import WAN_TEXT_LEN

BACKENDS = ("dali", "torch")


def make_loader(shards, batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0, backend: str = "dali",
                start: LoaderPosition | dict | None = None, text_len: int = WAN_TEXT_LEN,
                on_corrupt: str = "raise", num_epochs: int | None = None, device_id: int | None = None):
    """Batches {"latent" [B,C,F,H,W], "context" [B,text_len,D] (zero-padded), "context_len" [B], "index" [B],
    "noise" (KD shards only), "cond" (I2V conditioning latent) and "clip" (CLIP image tokens) where the shards
    hold them, "prompt", "key", "meta" (lists)} for one data-parallel rank.

    shards: directory, glob, path or list of them. Deterministic given (seed, epoch); `loader.position()` is a
    JSON-able dict, and `start=` that dict continues the exact sequence. on_corrupt: "raise" refuses a bad shard
    or sample, "skip" logs its name and moves on. num_epochs=None streams forever (batches cross epoch ends);
    a number stops after that many epochs, dropping a final partial batch. device_id (DALI only) puts the
    tensors on that GPU; None keeps DALI on CPU operators.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    shard_set = shards if isinstance(shards, ShardSet) else ShardSet(shards, on_corrupt)  # opened already: reused
    stream = SampleStream(shard_set, seed, dp_rank, dp_size, start, num_epochs)
    if backend == "torch":
        if device_id is not None:
            raise ValueError("device_id places batches on a GPU through DALI; with backend='torch' move them "
                             "yourself (batch['latent'].cuda())")
        from .loader_torch import TorchLoader

        return TorchLoader(stream, batch_size, text_len)
    from .loader_dali import DaliLoader, dali_available

    if not dali_available():
        raise ImportError("backend='dali' needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or the extra "
                          "tmd_megatron[data]), or pass backend='torch'")
    return DaliLoader(stream, batch_size, text_len, device_id=device_id)
