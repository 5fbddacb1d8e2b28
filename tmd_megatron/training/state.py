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


def device_mesh(topo: Topology):
    """The (dp, cp, tp) mesh of this rank's pipeline stage, or None without torch.distributed."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return None
    from torch.distributed.device_mesh import init_device_mesh

    pp, dp, cp, tp = topo.pp.size, topo.dp.size, topo.cp.size, topo.tp.size
    mesh = init_device_mesh(topo.device.type, (pp, dp, cp, tp), mesh_dim_names=("pp", "dp", "cp", "tp"))
    return mesh["dp", "cp", "tp"]


def _wrap(t: torch.Tensor, dim: int | None, mesh) -> torch.Tensor:
    if mesh is None:
        return t
    tp_place = Shard(dim) if dim is not None else Replicate()
    return DTensor.from_local(t, mesh, [Replicate(), Replicate(), tp_place], run_check=False)


def _named(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in module.named_parameters() if not n.startswith(TIED)}


def module_state(module: nn.Module, mesh) -> dict:
    dims = tp_split_dims(module)
    return {n: _wrap(p.data, dims.get(n), mesh) for n, p in _named(module).items()}


def ema_state(ema, module: nn.Module, mesh) -> dict:
    dims = tp_split_dims(module)
    return {n: _wrap(t, dims.get(n), mesh) for n, t in ema.shadow.items() if not n.startswith(TIED)}


class ZeroState:
    """Per-parameter view of a ZeroAdamW: gathered for saving, scattered back after loading."""

    def __init__(self, opt: ZeroAdamW, module: nn.Module, mesh):
        self.opt, self.mesh, self.dims = opt, mesh, tp_split_dims(module)
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self.step = torch.zeros((), dtype=torch.float64)

    def _moments(self, b):
        st = self.opt.optimizer.state.get(b.master, {})
        return {"master": b.master.detach(), "exp_avg": st.get("exp_avg", torch.zeros_like(b.master)),
                "exp_avg_sq": st.get("exp_avg_sq", torch.zeros_like(b.master))}

    def gather(self) -> dict:
        """Collective over DP x CP: every parameter's master weight and moments, TP-local."""
        out = {}
        for b in self.opt.buckets:
            for key, flat in self._moments(b).items():
                full = comm.all_gather(flat.contiguous(), self.opt.group)
                for name, value in b.unflatten(full).items():
                    out.setdefault(name, {})[key] = _wrap(value.clone(), self.dims.get(name), self.mesh)
            st = self.opt.optimizer.state.get(b.master, {})
            if "step" in st:
                self.step = torch.as_tensor(st["step"], dtype=torch.float64).clone()
        self.tensors = out
        return {"params": out, "step": self.step}

    def empty(self) -> dict:
        """A target with the right shapes for loading (values overwritten by the load)."""
        out = {}
        for b in self.opt.buckets:
            for name, p in b.named:
                out[name] = {k: _wrap(torch.zeros(p.shape, dtype=b.dtype, device=p.device), self.dims.get(name), self.mesh)
                             for k in ("master", "exp_avg", "exp_avg_sq")}
        self.tensors = out
        self.step = torch.zeros((), dtype=torch.float64)
        return {"params": out, "step": self.step}

    def scatter(self, loaded: dict) -> None:
        """After a load: this rank's slices of the loaded per-parameter tensors back into the buckets."""
        step = loaded["step"]
        for b in self.opt.buckets:
            parts = {}
            for key in ("master", "exp_avg", "exp_avg_sq"):
                local = [_local(loaded["params"][n][key]) for n, _ in b.named]
                parts[key] = b.flat(local)[b.start : b.start + b.shard_len].clone()
            with torch.no_grad():
                b.master.copy_(parts["master"])
            if float(step) > 0:
                self.opt.optimizer.state[b.master] = {
                    "step": torch.tensor(float(step)), "exp_avg": parts["exp_avg"], "exp_avg_sq": parts["exp_avg_sq"]}
            with torch.no_grad():
                for name, value in b.unflatten(b.flat([_local(loaded["params"][n]["master"]) for n, _ in b.named])).items():
                    self.opt._params[name].copy_(value)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
