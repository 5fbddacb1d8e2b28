"""The sample stream both loaders share: which samples a data-parallel rank reads, in which order, from where.

Order: epoch e shuffles all N samples with a permutation seeded by (seed, e); DP rank r takes every dp_size-th
entry starting at r, cut to N // dp_size so every rank has the same count. The stream runs through epochs
0, 1, 2, ... and a batch may span an epoch boundary, so ranks stay in lockstep forever. A position is
(epoch, cursor into this rank's list for that epoch); resuming from it continues the exact sequence.
Only the DP rank enters: tensor/context/pipeline ranks of one replica pass the same dp_rank and read the same
samples.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from .format import OPTIONAL_ARRAYS, ShardError, ShardInfo, open_shard, read_sample, shard_paths

log = logging.getLogger(__name__)
ON_CORRUPT = ("raise", "skip")


@dataclass(frozen=True)
class LoaderPosition:
    """Where a rank's stream stands; `to_dict()` goes into a checkpoint, `from_dict()` comes back out."""

    epoch: int = 0
    cursor: int = 0
    seed: int = 0
    dp_rank: int = 0
    dp_size: int = 1
    num_samples: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderPosition":
        return cls(**{k: int(v) for k, v in d.items()})


@dataclass
class StreamSample:
    index: int  # global sample id: position in the sorted shard list's concatenated samples
    epoch: int
    cursor: int  # this sample's place in the rank's list for `epoch`
    sample: dict  # what format.read_sample returns


def epoch_order(num_samples: int, seed: int, epoch: int, dp_rank: int, dp_size: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_samples)
    return perm[dp_rank::dp_size][: num_samples // dp_size]


class ShardSet:
    """All samples of a set of shards; shards that fail their checks are refused or skipped (named in the log)."""

    def __init__(self, shards, on_corrupt: str = "raise"):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt={on_corrupt!r}; choose one of {ON_CORRUPT}")
        self.on_corrupt = on_corrupt
        self.shards: list[ShardInfo] = []
        self.skipped: list[str] = []
        for path in shard_paths(shards):
            try:
                self.shards.append(open_shard(path))
            except ShardError as err:
                self.report(err)
        self.entries = [(s, i) for s in range(len(self.shards)) for i in range(len(self.shards[s].samples))]
        if not self.entries:
            why = f" ({'; '.join(self.skipped[:3])})" if self.skipped else ""
            raise ShardError(f"no readable samples in {shards}{why}")
        self._check_uniform()
        self._files: dict[int, object] = {}

    def report(self, err: ShardError) -> None:
        if self.on_corrupt == "raise":
            raise err
        log.warning("skipping: %s", err)
        self.skipped.append(str(err))

    def _check_uniform(self) -> None:
        # A batch stacks latents and pads contexts: every sample must agree on these.
        fields = ("latent_shape", "latent_dtype", "text_dim", "context_dtype", "clip_shape")
        first_shard, first = self.shards[0].path.name, self.shards[0].samples[0]

        def optional(entry):
            return tuple(a for a in OPTIONAL_ARRAYS if f"{a}.npy" in entry["members"])

        for shard in self.shards:
            for entry in shard.samples:
                diff = [f for f in fields if entry.get(f) != first.get(f)]
                if diff or optional(entry) != optional(first):
                    raise ShardError(
                        f"{shard.path.name}: sample {entry['key']!r} differs from {first_shard}'s first sample in "
                        f"{diff or ['optional members ' + str(optional(entry))]}; one dataset holds one latent "
                        "shape, dtype, text width and set of members (write different resolutions to separate "
                        "datasets)"
                    )
        self.describe = {f: first.get(f) for f in fields} | {"has_noise": "noise" in optional(first),
                                                              "optional": optional(first)}

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, index: int) -> dict:
        s, i = self.entries[index]
        shard = self.shards[s]
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = open(shard.path, "rb")
        return read_sample(f, shard.path.name, shard.samples[i])

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class SampleStream:
    """Checked samples of one DP rank, in order, from a position onwards; corrupt ones raise or are skipped."""

    def __init__(self, shards: ShardSet, seed: int, dp_rank: int, dp_size: int, start: LoaderPosition | dict | None,
                 num_epochs: int | None = None):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if len(shards) < dp_size:
            raise ValueError(f"{len(shards)} samples cannot feed dp_size={dp_size} ranks; write more samples")
        self.shards, self.seed, self.dp_rank, self.dp_size = shards, seed, dp_rank, dp_size
        self.num_epochs = num_epochs
        start = LoaderPosition.from_dict(start) if isinstance(start, dict) else start
        if start is None:
            start = LoaderPosition(seed=seed, dp_rank=dp_rank, dp_size=dp_size, num_samples=len(shards))
        expected = {"seed": seed, "dp_rank": dp_rank, "dp_size": dp_size, "num_samples": len(shards)}
        got = {k: getattr(start, k) for k in expected}
        if got != expected:
            raise ValueError(f"cannot resume: the position was saved with {got}, this loader has {expected}; "
                             f"resume with the same seed, data-parallel layout and shards")
        self.epoch, self.cursor = start.epoch, start.cursor
        self.per_rank = len(shards) // dp_size
        self._order_epoch, self._order = -1, None

    def position_after(self, epoch: int, cursor: int) -> LoaderPosition:
        return LoaderPosition(epoch, cursor + 1, self.seed, self.dp_rank, self.dp_size, len(self.shards))

    def __iter__(self) -> Iterator[StreamSample]:
        while self.num_epochs is None or self.epoch < self.num_epochs:
            if self.cursor >= self.per_rank:
                self.epoch, self.cursor = self.epoch + 1, 0
                continue
            if self._order_epoch != self.epoch:
                self._order = epoch_order(len(self.shards), self.seed, self.epoch, self.dp_rank, self.dp_size)
                self._order_epoch = self.epoch
            index, epoch, cursor = int(self._order[self.cursor]), self.epoch, self.cursor
            self.cursor += 1
            try:
                sample = self.shards.read(index)
            except ShardError as err:
                self.shards.report(err)
                continue
            yield StreamSample(index, epoch, cursor, sample)

    def batches(self, batch_size: int) -> Iterator[list[StreamSample]]:
        """Lists of batch_size samples; a partial batch at the end of a finite stream is dropped."""
        batch = []
        for item in self:
            batch.append(item)
            if len(batch) == batch_size:
                yield batch
                batch = []
