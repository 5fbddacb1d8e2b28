"""Plain PyTorch loader: the reference the DALI pipeline must match batch for batch."""
from __future__ import annotations

import numpy as np
import torch

from .format import OPTIONAL_ARRAYS, to_tensor
from .stream import LoaderPosition, SampleStream, StreamSample


def stack_into(arrays: list[tuple], rows: int | None = None) -> torch.Tensor:
    """One batch tensor, each sample copied in once; with rows, zero-padded along dim 0 to that length.
    numpy does the copies: single-threaded, so the loader does not compete for the trainer's torch threads."""
    first, dtype_name = arrays[0]
    shape = (rows, *first.shape[1:]) if rows is not None else first.shape
    out = np.zeros((len(arrays), *shape), dtype=first.dtype)
    for i, (arr, _) in enumerate(arrays):
        out[i, : arr.shape[0]] = arr
    return to_tensor(out, dtype_name)


def collate(items: list[StreamSample], text_len: int) -> dict:
    """Stack latents (and noise, cond, clip), zero-pad each context to text_len (Wan's rule), keep strings as lists."""
    samples = [it.sample for it in items]
    for s in samples:
        n = s["arrays"]["context"][0].shape[0]
        if n > text_len:
            raise ValueError(f"sample {s['key']!r}: context has {n} rows, more than text_len={text_len}: "
                             f"tokenize with max_length={text_len}")
    batch = {
        "latent": stack_into([s["arrays"]["latent"] for s in samples]),
        "context": stack_into([s["arrays"]["context"] for s in samples], rows=text_len),
        "context_len": torch.tensor([s["arrays"]["context"][0].shape[0] for s in samples], dtype=torch.int64),
        "index": torch.tensor([it.index for it in items], dtype=torch.int64),
    }
    for name in OPTIONAL_ARRAYS:  # KD noise, I2V conditioning latent, CLIP image tokens
        if name in samples[0]["arrays"]:
            batch[name] = stack_into([s["arrays"][name] for s in samples])
    batch.update(prompt=[s["prompt"] for s in samples], key=[s["key"] for s in samples],
                 meta=[s["meta"] for s in samples])
    return batch


class TorchLoader:
    """Iterator of batch dicts; `position()` is the state after the last batch it returned."""

    def __init__(self, stream: SampleStream, batch_size: int, text_len: int):
        self.stream, self.batch_size, self.text_len = stream, batch_size, text_len
        self._batches = stream.batches(batch_size)
        self._position = LoaderPosition(stream.epoch, stream.cursor, stream.seed, stream.dp_rank, stream.dp_size,
                                        len(stream.shards))

    def __iter__(self) -> "TorchLoader":
        return self

    def __next__(self) -> dict:
        items = next(self._batches)
        self._position = self.stream.position_after(items[-1].epoch, items[-1].cursor)
        return collate(items, self.text_len)

    def position(self) -> dict:
        return self._position.to_dict()

    def close(self) -> None:
        self.stream.shards.close()
