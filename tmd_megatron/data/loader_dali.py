"""NVIDIA DALI loader: the same sample stream as the torch loader, decoded and padded inside a DALI pipeline.

Why external_source and not DALI's webdataset reader: the reader shuffles with its own generator and keeps its
own position, so it could neither match the torch loader's order nor resume from our LoaderPosition. Here the
Python side picks and checks the samples (order, CRC, shapes, finite values) and hands DALI the npy bytes; DALI
parses them, zero-pads the text to text_len, batches, prefetches and, given a device_id, places them on the GPU.
Strings (prompt, key, metadata) do not travel through DALI: they wait in a side table keyed by stream position.
"""
from __future__ import annotations

import numpy as np
import torch

from .stream import LoaderPosition, SampleStream

ARRAYS = ("latent", "context", "noise", "cond", "clip")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


class DaliLoader:
    """Iterator of batch dicts like TorchLoader's; tensors on CPU, or on GPU `device_id` when given."""

    def __init__(self, stream: SampleStream, batch_size: int, text_len: int, device_id: int | None = None,
                 num_threads: int = 2, prefetch: int = 2):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self.stream, self.batch_size, self.text_len = stream, batch_size, text_len
        desc = stream.shards.describe
        self.arrays = [a for a in ARRAYS if a in ("latent", "context") or a in desc["optional"]]
        # the optional arrays are stored in the latent's dtype (format.ShardWriter.add)
        self.bf16 = {a: desc["latent_dtype"] == "bfloat16" for a in ARRAYS} | {
            "context": desc["context_dtype"] == "bfloat16"}
        self._strings: dict[tuple[int, int], tuple[str, str, dict]] = {}
        self._error: BaseException | None = None
        self._position = LoaderPosition(stream.epoch, stream.cursor, stream.seed, stream.dp_rank, stream.dp_size,
                                        len(stream.shards))
        outputs = self.arrays + ["context_len", "index", "place"]

        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                      prefetch_queue_depth=prefetch)
        def pipeline():
            raw = fn.external_source(source=self._source(), num_outputs=len(outputs), batch=True)
            out = []
            for name, node in zip(self.arrays, raw):
                node = fn.decoders.numpy(node)
                if name == "context":
                    node = fn.pad(node, axes=(0,), shape=(text_len,), fill_value=0)
                if self.bf16[name]:  # uint16 bit patterns; torch views them as bfloat16 below
                    node = fn.reinterpret(node, dtype=types.INT16)
                out.append(node.gpu() if device_id is not None else node)
            return (*out, *raw[len(self.arrays):])

        pipe = pipeline()
        pipe.build()
        self._iter = DALIGenericIterator([pipe], outputs, last_batch_policy=LastBatchPolicy.PARTIAL,
                                         auto_reset=False, prepare_first_batch=False)

    def _source(self):
        """Generator of one batch per call: npy bytes per array, context_len, global index, (epoch, cursor)."""
        try:
            for items in self.stream.batches(self.batch_size):
                cols = {name: [] for name in self.arrays + ["context_len", "index", "place"]}
                for it in items:
                    s = it.sample
                    n = s["arrays"]["context"][0].shape[0]
                    if n > self.text_len:
                        raise ValueError(f"sample {s['key']!r}: context has {n} rows, more than text_len="
                                         f"{self.text_len}: tokenize with max_length={self.text_len}")
                    for name in self.arrays:
                        cols[name].append(np.frombuffer(s["raw"][f"{name}.npy"], dtype=np.uint8))
                    cols["context_len"].append(np.array(n, dtype=np.int64))
                    cols["index"].append(np.array(it.index, dtype=np.int64))
                    cols["place"].append(np.array([it.epoch, it.cursor], dtype=np.int64))
                    self._strings[(it.epoch, it.cursor)] = (s["prompt"], s["key"], s["meta"])
                yield tuple(cols.values())
        except Exception as err:  # surfaced unchanged by __next__ instead of DALI's wrapped pipeline error
            self._error = err

    def __iter__(self) -> "DaliLoader":
        return self

    def __next__(self) -> dict:
        try:
            out = next(self._iter)[0]
        except StopIteration:
            if self._error is not None:
                raise self._error
            raise
        for name in self.arrays:
            if self.bf16[name]:
                out[name] = out[name].view(torch.bfloat16)
        places = out.pop("place").tolist()
        strings = [self._strings.pop(tuple(p)) for p in places]
        out["prompt"], out["key"], out["meta"] = (list(col) for col in zip(*strings))
        self._position = self.stream.position_after(*places[-1])
        return out

    def position(self) -> dict:
        return self._position.to_dict()

    def close(self) -> None:
        self.stream.shards.close()
