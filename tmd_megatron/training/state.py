"""What a training checkpoint holds, as a torch.distributed.checkpoint state dict with global shapes.

Parameters, EMA and the ZeRO-1 optimizer state are stored per parameter as DTensors whose placement says how
the tensor is split over tensor-parallel ranks (replicated over data/context parallel ranks); pipeline stages
contribute their own parameter names. DCP therefore reshards on load: a run saved under one layout resumes
under another. ZeRO-1 slices are gathered per bucket into per-parameter moments at save time and sliced again
at load time. The flow head's tied patch-embedding copy is not stored (it is re-tied after loading).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from tmd_megatron.parallel import Topology, ZeroAdamW, comm, tp_split_dims

TIED = "head_patch_embedding."


def device_mesh(topo: Topology, device_type: str | None = None):
    """The (dp, cp, tp) mesh of this rank's pipeline stage on `device_type` (default: the training device), or
    None without torch.distributed. The optimizer state is checkpointed from host memory: its mesh is "cpu"
    and only its tp dimension is used."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    from torch.distributed.device_mesh import init_device_mesh

    pp, dp, cp, tp = topo.pp.size, topo.dp.size, topo.cp.size, topo.tp.size
    mesh = init_device_mesh(device_type or topo.device.type, (pp, dp, cp, tp), mesh_dim_names=("pp", "dp", "cp", "tp"))
    return mesh["dp", "cp", "tp"]


def _wrap(t: torch.Tensor, dim: int | None, mesh) -> torch.Tensor:
    """A DTensor split over TP along `dim` (replicated over the mesh's other dimensions), or t without a mesh."""
    if mesh is None:
        return t
    tp_place = Shard(dim) if dim is not None else Replicate()
    return DTensor.from_local(t, mesh, [Replicate()] * (mesh.ndim - 1) + [tp_place], run_check=False)


def _named(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if not n.startswith(TIED)}


def module_state(module: nn.Module, mesh) -> dict:
    dims = tp_split_dims(module)
    return {n: _wrap(p.data, dims.get(n), mesh) for n, p in _named(module).items()}


def ema_state(ema, module: nn.Module, mesh) -> dict:
    dims = tp_split_dims(module)
    return {n: _wrap(t, dims.get(n), mesh) for n, t in ema.shadow.items() if not n.startswith(TIED)}


class ZeroState:
    """Per-parameter view of a ZeroAdamW, for checkpoints that reshard.

    Saving gathers one parameter at a time (a zero-padded slice from each DP x CP rank, summed: exact, and
    at most one parameter's worth of device memory) into CPU tensors held only by the first rank of the
    DP x CP group (the others' copies would be duplicates). Loading reads each rank's TP-local tensors into CPU
    memory and keeps this rank's slices. Host memory: the TP-local optimizer state, during save (group root)
    and load (every rank).
    """

    KEYS = ("master", "exp_avg", "exp_avg_sq")

    def __init__(self, opt: ZeroAdamW, module: nn.Module, mesh):
        self.opt, self.mesh, self.dims = opt, mesh, tp_split_dims(module)
        self.root = opt.group.rank == 0

    def _moments(self, b):
        st = self.opt.optimizer.state.get(b.master, {})
        return {"master": b.master.detach(), "exp_avg": st.get("exp_avg", torch.zeros_like(b.master)),
                "exp_avg_sq": st.get("exp_avg_sq", torch.zeros_like(b.master))}

    def _step(self) -> torch.Tensor:
        steps = [st["step"] for st in self.opt.optimizer.state.values() if "step" in st]
        return torch.as_tensor(float(steps[0]) if steps else 0.0, dtype=torch.float64)

    def gather(self) -> dict:
        """Collective over DP x CP. Returns this rank's part of the checkpoint state."""
        out = {}
        for b in self.opt.buckets:
            moments, offset = self._moments(b), 0
            for name, p in b.named:
                lo, n = offset, p.numel()
                a, z = max(lo, b.start), min(lo + n, b.start + b.shard_len)
                for key, flat in moments.items():
                    buf = torch.zeros(n, dtype=flat.dtype, device=flat.device)
                    if a < z:
                        buf[a - lo : z - lo] = flat[a - b.start : z - b.start]
                    comm.all_reduce(buf, self.opt.group)  # each element owned by exactly one rank: exact
                    if self.root:
                        out.setdefault(name, {})[key] = _wrap(buf.view(p.shape).cpu(), self.dims.get(name), self.mesh)
                offset += n
        return {"params": out, "step": self._step()} if self.root else {"step": self._step()}

    def empty(self) -> dict:
        """A load target (CPU) for every parameter of this rank's buckets."""
        out = {}
        for b in self.opt.buckets:
            for name, p in b.named:
                out[name] = {k: _wrap(torch.zeros(p.shape, dtype=b.dtype), self.dims.get(name), self.mesh)
                             for k in self.KEYS}
        return {"params": out, "step": torch.zeros((), dtype=torch.float64)}

    def scatter(self, loaded: dict) -> None:
        """After a load: this rank's slices of the loaded per-parameter tensors back into the buckets."""
        step = float(loaded["step"])
        for b in self.opt.buckets:
            parts = {}
            for key in self.KEYS:
                flat = b.flat([_local(loaded["params"][n][key]) for n, _ in b.named])
                parts[key] = flat[b.start : b.start + b.shard_len].clone().to(b.master.device)
            full_master = b.flat([_local(loaded["params"][n]["master"]) for n, _ in b.named])
            with torch.no_grad():
                b.master.copy_(parts["master"])
                for name, value in b.unflatten(full_master).items():
                    self.opt._params[name].copy_(value)
            if step > 0:
                self.opt.optimizer.state[b.master] = {
                    "step": torch.tensor(step), "exp_avg": parts["exp_avg"], "exp_avg_sq": parts["exp_avg_sq"]}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
