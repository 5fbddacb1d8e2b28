"""Process topology: world = DP x PP x CP x TP, its groups, the device, and the seeding rule.

Groups come from megatron-core `parallel_state` (rank order tp-cp-dp-pp, tp fastest) and are wrapped in our
own `CommGroup`s so every transfer goes through `comm` and is counted. Initialisation reads the torchrun or
SLURM environment. `Topology.virtual` describes one rank of a layout without any process group (sharding
plans, offline checkpoint conversion, tests).
"""
from __future__ import annotations

import datetime
import hashlib
import inspect
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import CommGroup


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def first_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: 'gpu-[007-009,012],cpu1' -> 'gpu-007', 'n[1-2]-ib' -> 'n1-ib'."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end].strip()
    match = re.search(r"\[([^\]]*)\]", first)
    if match:
        start = re.split(r"[-,]", match.group(1))[0]
        first = first[: match.start()] + start + first[match.end() :]
    if not first:
        raise ValueError(f"cannot read a host from SLURM nodelist {nodelist!r}")
    return first


def _env_int(environ, name: str) -> int:
    try:
        return int(environ[name])
    except KeyError:
        raise RuntimeError(f"environment variable {name} is not set; launch with torchrun or srun") from None
    except ValueError:
        raise RuntimeError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def dist_env(environ=None) -> DistEnv:
    """Rank, world size, local rank and rendezvous address from torchrun or SLURM variables.

    torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under srun, SLURM_PROCID/SLURM_NTASKS/
    SLURM_LOCALID give the ranks, the master is the first host of SLURM_JOB_NODELIST (or MASTER_ADDR if set),
    and the port is MASTER_PORT or 10000 + SLURM_JOB_ID mod 50000 (the same on every task of a job).
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in environ:
                raise RuntimeError(f"RANK/WORLD_SIZE are set but {name} is not; launch with torchrun or set {name}")
        return DistEnv(
            _env_int(environ, "RANK"),
            _env_int(environ, "WORLD_SIZE"),
            int(environ.get("LOCAL_RANK", 0)),
            environ["MASTER_ADDR"],
            _env_int(environ, "MASTER_PORT"),
            "torchrun",
        )
    if "SLURM_PROCID" in environ:
        nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        addr = environ.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else None)
        if addr is None:
            raise RuntimeError("SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_JOB_NODELIST is")
        if "MASTER_PORT" in environ:
            port = _env_int(environ, "MASTER_PORT")
        else:
            port = 10000 + _env_int(environ, "SLURM_JOB_ID") % 50000
        return DistEnv(
            _env_int(environ, "SLURM_PROCID"),
            _env_int(environ, "SLURM_NTASKS"),
            _env_int(environ, "SLURM_LOCALID"),
            addr,
            port,
            "slurm",
        )
    port = int(environ.get("MASTER_PORT", 29500))
    return DistEnv(0, 1, 0, environ.get("MASTER_ADDR", "127.0.0.1"), port, "single")


@dataclass(frozen=True)
class Topology:
    """This rank's groups. Sizes multiply: world = dp * pp * cp * tp."""

    tp: CommGroup
    cp: CommGroup
    pp: CommGroup
    dp: CommGroup
    dp_cp: CommGroup  # gradient reduction and optimizer sharding (replicas of the same parameters)
    tp_cp: CommGroup  # every rank holding tokens of the same samples: cp-major, tp-minor
    world: CommGroup
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp.rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp.rank == self.pp.size - 1

    def describe(self) -> str:
        return (
            f"rank {self.world.rank}/{self.world.size}: dp {self.dp.rank}/{self.dp.size} pp {self.pp.rank}/"
            f"{self.pp.size} cp {self.cp.rank}/{self.cp.size} tp {self.tp.rank}/{self.tp.size} on {self.device}"
        )

    @classmethod
    def single(cls, device=None) -> "Topology":
        return cls.virtual(device=device)

    @classmethod
    def virtual(cls, tp=1, cp=1, pp=1, dp=1, rank=0, device=None) -> "Topology":
        """One rank of a layout, without process groups (planning and sharding only; no transfers)."""
        world = tp * cp * pp * dp
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        groups = {name: _virtual_group(name, rank, tp, cp, dp, pp, axes) for name, axes in _GROUP_AXES.items()}
        return cls(**groups, device=torch.device(device or "cpu"))


# Rank order of megatron-core's default "tp-cp-ep-dp-pp": rank = tp + TP*(cp + CP*(dp + DP*pp)).
_GROUP_AXES = {
    "tp": ("tp",),
    "cp": ("cp",),
    "pp": ("pp",),
    "dp": ("dp",),
    "dp_cp": ("cp", "dp"),
    "tp_cp": ("tp", "cp"),
    "world": ("tp", "cp", "dp", "pp"),
}


def _coords(rank: int, tp: int, cp: int, dp: int) -> dict[str, int]:
    return {"tp": rank % tp, "cp": rank // tp % cp, "dp": rank // (tp * cp) % dp, "pp": rank // (tp * cp * dp)}


def _virtual_group(name, rank, tp, cp, dp, pp, axes) -> CommGroup:
    sizes = {"tp": tp, "cp": cp, "dp": dp, "pp": pp}
    strides = {"tp": 1, "cp": tp, "dp": tp * cp, "pp": tp * cp * dp}
    mine = _coords(rank, tp, cp, dp)
    base = rank - sum(mine[a] * strides[a] for a in axes)
    ranks = [base]
    for a in axes:  # first axis varies fastest, as in group-rank order
        ranks = [r + i * strides[a] for i in range(sizes[a]) for r in ranks]
    ranks = sorted(ranks)
    return CommGroup(name, tuple(ranks), ranks.index(rank), None)


def local_cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of a rank: its local rank when the task sees every GPU of the node, 0 when it sees one
    (srun --gpus-per-task=1 / --gpu-bind=single:1 set CUDA_VISIBLE_DEVICES to the task's own GPU)."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise RuntimeError(f"local rank {local_rank} but this task sees {visible} GPUs: give each task one GPU "
                           "(srun --gpus-per-task=1) or all of the node's (--gpus-per-node with one task per GPU)")
    return local_rank


def default_device(kind: str = "auto") -> tuple[torch.device, str]:
    """cuda + NCCL when asked for or available ("auto"), else cpu + gloo."""
    if kind not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={kind!r}; choose 'auto', 'cpu' or 'cuda'")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but CUDA is not available here; use device=cpu")
    if kind != "cpu" and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        # gloo beside NCCL: checkpointing gathers optimizer state into host memory (CPU collectives)
        return torch.device("cuda", local_cuda_index(local, torch.cuda.device_count())), "cuda:nccl,cpu:gloo"
    return torch.device("cpu"), "gloo"


def init_topology(tp: int = 1, cp: int = 1, pp: int = 1, *, environ=None, timeout_s: float = 1800,
                  device: str = "auto") -> Topology:
    """Start torch.distributed from the environment (if not started) and build the DP x PP x CP x TP groups.

    May be called again with other sizes in the same processes: megatron's groups are rebuilt.
    """
    for name, size in (("tp", tp), ("cp", cp), ("pp", pp)):
        if size < 1:
            raise ValueError(f"{name}={size} must be >= 1")
    env = dist_env(environ)
    world = dist.get_world_size() if dist.is_initialized() else env.world_size
    if world % (tp * cp * pp):
        raise ValueError(
            f"world size {world} is not divisible by tp*cp*pp = {tp}*{cp}*{pp}; "
            f"launch a multiple of {tp * cp * pp} processes or change the layout"
        )
    device, backend = default_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs = {}
        if device.type == "cuda":
            # Eager NCCL communicators bound to this GPU (torch.distributed.init_process_group's device_id): the
            # pipeline's first P2P on a group otherwise creates a communicator lazily among only some ranks.
            kwargs["device_id"] = device
        dist.init_process_group(
            backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **kwargs,
        )
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    kwargs = dict(context_parallel_size=cp, distributed_timeout_minutes=max(1, int(timeout_s // 60)))
    if "create_gloo_process_groups" in inspect.signature(ps.initialize_model_parallel).parameters:
        kwargs["create_gloo_process_groups"] = False  # we only use the default-backend groups
    ps.initialize_model_parallel(tp, pp, **kwargs)

    def wrap(name: str, pg) -> CommGroup:
        ranks = tuple(dist.get_process_group_ranks(pg))
        return CommGroup(name, ranks, ranks.index(dist.get_rank()), pg)

    topo = Topology(
        tp=wrap("tp", ps.get_tensor_model_parallel_group()),
        cp=wrap("cp", ps.get_context_parallel_group()),
        pp=wrap("pp", ps.get_pipeline_model_parallel_group()),
        dp=wrap("dp", ps.get_data_parallel_group()),
        dp_cp=wrap("dp_cp", ps.get_data_parallel_group(with_context_parallel=True)),
        tp_cp=wrap("tp_cp", ps.get_tensor_and_context_parallel_group()),
        world=wrap("world", dist.group.WORLD),
        device=device,
    )
    expected = Topology.virtual(tp, cp, pp, world // (tp * cp * pp), dist.get_rank())
    for name in _GROUP_AXES:
        if getattr(topo, name).ranks != getattr(expected, name).ranks:
            raise RuntimeError(
                f"megatron-core built {name} group {getattr(topo, name).ranks}, expected "
                f"{getattr(expected, name).ranks} (rank order tp-cp-dp-pp); check the megatron-core version"
            )
    return topo


def destroy_topology() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def generator_for(seed: int, step: int, role: str, topo: Topology, device=None) -> torch.Generator:
    """A generator for (global seed, step, role, data-parallel rank) only.

    Every TP/CP/PP rank of one sample draws the same noise; different DP ranks draw different noise.
    """
    key = f"{int(seed)}/{int(step)}/{role}/{topo.dp.rank}".encode()
    value = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & (2**63 - 1)
    gen = torch.Generator(device=device or topo.device)
    gen.manual_seed(value)
    return gen
