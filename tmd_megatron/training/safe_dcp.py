"""Loading torch.distributed.checkpoint directories without executing anything read from them.

DCP stores its `.metadata` as a pickle (torch/distributed/checkpoint/filesystem.py, FileSystemReader.read_metadata
calls pickle.load), and loads non-tensor entries with torch.load(weights_only=False) (default_planner.py,
DefaultLoadPlanner.load_bytes). A run directory on a shared filesystem may be writable by others, so a planted
`.metadata` would run code on the next resume. Here the metadata is read by an unpickler that admits only the
classes DCP's own metadata is made of, every storage path must name a file inside the checkpoint directory, and a
bytes entry (which our checkpoints never contain: every entry is a tensor) is refused. Tensor payloads are read by
DCP with torch.load(weights_only=True) already.
"""
from __future__ import annotations

import pickle
from pathlib import PurePath

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata


class UntrustedCheckpoint(RuntimeError):
    """A checkpoint file holds something our checkpoints never contain (the message names the file): refused."""


class CorruptCheckpoint(RuntimeError):
    """A checkpoint file that cannot be read (truncated, garbled): a resume may fall back to an earlier one."""


# What a DCP `.metadata` of tensors references (found with pickletools on checkpoints of every layout we save):
# the metadata dataclasses, torch.Size and dtypes, and the helpers DCP pickles layouts and paths through.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "MetadataIndex", "StorageMeta",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UntrustedCheckpoint(
            f"{self.where} refers to {module}.{name}, which a checkpoint's metadata never contains: the file was not "
            "written by tmd-train (it could run code). Nothing was loaded; find out who can write to the run "
            "directory, then delete the file or the checkpoint")


def read_metadata(path) -> Metadata:
    """A checkpoint's `.metadata`, unpickled with the allow-list and checked for what it points at."""
    where = f"{path}"
    try:
        with open(path, "rb") as f:
            md = _MetadataUnpickler(f, where).load()
    except UntrustedCheckpoint:
        raise
    except Exception as err:  # a truncated or garbled pickle raises any of several types
        raise CorruptCheckpoint(f"{where} cannot be read ({type(err).__name__}: {err}): corrupt metadata") from None
    if not isinstance(md, Metadata):
        raise UntrustedCheckpoint(f"{where} holds a {type(md).__name__}, not checkpoint metadata")
    bad = [k for k, v in md.state_dict_metadata.items() if not isinstance(v, TensorStorageMetadata)]
    if bad:
        raise UntrustedCheckpoint(f"{where} declares non-tensor entries {bad[:3]}: our checkpoints hold tensors only")
    for info in (md.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or PurePath(name).name != name or name in ("", ".", ".."):
            raise UntrustedCheckpoint(f"{where} points at {name!r}, outside its checkpoint directory")
    return md


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata comes through `read_metadata` (rank-specific metadata is not used)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        md = read_metadata(self._get_metadata_path(None))
        # What the parent does after unpickling (filesystem.py, read_metadata): tag the load.
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class TensorsOnlyLoadPlanner(DefaultLoadPlanner):
    """The default planner, except that bytes entries (unpickled with weights_only=False by DCP) are refused."""

    def load_bytes(self, read_item, value) -> None:
        raise UntrustedCheckpoint(f"the checkpoint stores {read_item.dest_index.fqn!r} as pickled bytes; ours hold "
                                  "tensors only")
