"""The training loop: one recipe, one layout, any method; resumable to the bit on CPU.

Per step: this DP rank's batch (split into microbatches) -> the method's program (training/programs.py) ->
tied-weight sync -> gradient reduction, clipping and the ZeRO-1 step of each role that updates this step ->
EMA -> metrics (reduced to rank 0) -> non-finite guard -> checkpoint on schedule or on SIGUSR1/SIGTERM/run.stop_file.
Exit code 75 after a preemption checkpoint asks the launcher to requeue; auto-resume picks up `latest`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from omegaconf import OmegaConf

from tmd_megatron.algorithms.timesteps import is_student_step
from tmd_megatron.parallel import Topology, ZeroAdamW, comm, gather_full_state

from . import checkpoint as ckpt
from .conditioning import image_condition_of
from .config import RecipeError, Resolved, num_microbatches
from .hang import StepWatchdog
from .inputs import make_data
from .metrics import MetricLogger
from .mfu import Throughput
from .optim import EMA, NonFiniteGuard, lr_factor
from .passes import Passes
from .programs import Micro, Step, flow_matching_step, kd_step, stage2_step, tm_mf_step
from .roles import Roles, build_roles
from .run_dir import archive_outputs, banner, check_compatible, summary
from .safe_dcp import UntrustedCheckpoint
from .sampling import SAMPLER_JSON, sampler_config_of
from .state import TIED, ZeroState, device_mesh, ema_state, module_state
from .tied import retie_weights, sum_tied_grads

REQUEUE_EXIT = 75
NO_DECAY = ("bias", "norm", "modulation", "gate_logit")


class NoLocalParameters:
    """The optimizer of a role this pipeline stage holds no parameters of (e.g. discriminator heads that all sit
    on other stages): it still joins the global gradient-norm reduction, so every rank runs the same collectives."""

    def __init__(self, topo: Topology):
        self.topo = topo
        self.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)

    def zero_grad(self) -> None:
        pass

    def reduce_grads(self) -> None:
        pass

    def grad_norm(self) -> torch.Tensor:
        return comm.all_reduce(torch.zeros((), dtype=torch.float64, device=self.topo.device), self.topo.world).sqrt()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        return self.grad_norm()

    def step(self) -> None:
        pass


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the CLI exits with REQUEUE_EXIT."""


def _autocast_dtype(res: Resolved):
    return {"fp32": None, "bf16": torch.bfloat16}[res.raw.model.compute_dtype]


class Trainer:
    def __init__(self, res: Resolved, topo: Topology, roles: Roles | None = None, stream=None):
        self.res, self.topo = res, topo
        run = res.raw.run
        self.out = Path(run.out_dir)
        self.roles = roles or build_roles(res, topo)
        self.microbatches = num_microbatches(res, topo.dp.size)
        self.passes = Passes(topo, self.microbatches, res.raw.parallel.schedule, _autocast_dtype(res))
        o = res.raw.optim
        lrs = {"student": res.lr, "fake": res.lr_fake, "disc": res.lr_disc}
        self.optims = {}
        for role, module in self.roles.trainable().items():
            replicated = [n for n, _ in module.named_parameters()] if role == "disc" else ()
            skip = [n for n, _ in module.named_parameters() if n.startswith(TIED)]
            self.optims[role] = ZeroAdamW(module, topo, lr=lrs[role], betas=tuple(o.betas), eps=o.eps,
                                          weight_decay=o.weight_decay, no_decay=NO_DECAY, replicated=replicated,
                                          skip=skip)
        if res.dmd2v is not None and res.dmd2v.gan_weight > 0 and "disc" not in self.optims:
            self.optims["disc"] = NoLocalParameters(topo)
        self.base_lr = lrs
        self.ema = EMA(self.roles.student, o.ema_decay) if o.ema_decay > 0 else None
        self.guard = NonFiniteGuard(run.max_skipped_steps)
        self.throughput = Throughput(res, topo.world.size, topo.device)
        self.step = 0
        self.mesh = device_mesh(topo)
        cpu = device_mesh(topo, "cpu") if self.mesh is not None else None
        self.tp_cpu_mesh = cpu["tp"] if cpu is not None else None
        self.stop_signal = False
        self._logger_args = dict(enabled=topo.world.rank == 0, tensorboard=run.tensorboard,
                                 wandb_project=run.wandb_project, stream=stream,
                                 config=OmegaConf.to_container(OmegaConf.structured(res.raw)))
        self.logger = None  # opened by start(), after an earlier run's logs are moved aside
        self.data = None

    # ---- state ---------------------------------------------------------------------------------------------
    def _zero(self):
        held = self.roles.trainable()
        return {role: ZeroState(opt, held[role], self.tp_cpu_mesh) for role, opt in self.optims.items() if role in held}

    def state(self, for_load: bool = False) -> dict:
        roles = self.roles.trainable()
        zs = self._zero()
        st = {"models": {r: module_state(m, self.mesh) for r, m in roles.items()},
              "optim": {r: (z.empty() if for_load else z.gather()) for r, z in zs.items()},
              "trainer": {"step": torch.tensor(self.step), "skipped": torch.tensor(self.guard.skipped)}}
        if self.ema is not None:
            st["ema"] = ema_state(self.ema, self.roles.student, self.mesh)
        return st, zs

    def save(self) -> Path:
        state, _ = self.state()
        positions = comm.all_gather_object(self.data.loader.position(), self.topo.world) if self.data else []
        meta = {"layout": {"dp": self.topo.dp.size, "tp": self.topo.tp.size, "cp": self.topo.cp.size,
                           "pp": self.topo.pp.size},
                "loader": {str(self.topo_dp_of(r)): p for r, p in enumerate(positions)},
                "recipe": OmegaConf.to_container(OmegaConf.structured(self.res.raw)),
                "method": self.res.method}
        return ckpt.save_checkpoint(self.out / "checkpoints", self.step, state, meta, self.res.raw.run.keep_last)

    def topo_dp_of(self, world_rank: int) -> int:
        t, c, d = self.topo.tp.size, self.topo.cp.size, self.topo.dp.size
        return world_rank // (t * c) % d

    def load(self, path) -> dict:
        meta = ckpt.read_meta(path)
        if meta.get("method") != self.res.method:
            raise ckpt.ResumeError(f"{path} was written by method {meta.get('method')!r}, this run is "
                                   f"{self.res.method!r}: use another run.out_dir or run.resume=never")
        state, zs = self.state(for_load=True)
        check_compatible(path, state, meta, self.res, self.topo)
        meta = ckpt.load_checkpoint(path, state)
        for role, z in zs.items():
            z.scatter(state["optim"][role])
        self.step = int(state["trainer"]["step"])
        self.guard.skipped = int(state["trainer"]["skipped"])
        if self.ema is not None:
            for n, t in state["ema"].items():
                self.ema.shadow[n].copy_(t.to_local() if hasattr(t, "to_local") else t)
        retie_weights(self.roles, self.res)
        return meta

    # ---- one step ------------------------------------------------------------------------------------------------
    def micro_batches(self, batch: dict) -> list[Micro]:
        m = self.microbatches
        dev = self.topo.device
        x, ctx, idx = batch["latent"].float(), batch["context"].float(), batch["index"]
        noise = batch.get("noise")
        cond = image_condition_of(self.res, batch)
        out = []
        for i in range(m):
            sl = slice(i * x.shape[0] // m, (i + 1) * x.shape[0] // m)
            out.append(Micro(x[sl].to(dev), ctx[sl].to(dev), idx[sl],
                             None if noise is None else noise[sl].float().to(dev),
                             None if cond is None else cond.rows(sl).to(dev)))
        return out

    def updates_this_step(self) -> list[str]:
        if self.res.dmd2v is None:
            return ["student"]
        roles = ["fake"] + (["disc"] if "disc" in self.optims else [])
        if is_student_step(self.step, self.res.dmd2v.student_every):
            roles.insert(0, "student")
        return roles

    def train_step(self, batch: dict) -> dict:
        for opt in self.optims.values():
            opt.zero_grad()
        s = Step(self.res, self.roles, self.passes, self.micro_batches(batch), self.data_negative, self.step)
        updates = self.updates_this_step()
        method = self.res.method
        if method == "flow_matching":
            flow_matching_step(s)
        elif method == "tm_mf":
            tm_mf_step(s)
        elif method == "kd":
            kd_step(s)
        else:
            stage2_step(s, generator="student" in updates)
        sum_tied_grads(self.roles, self.res)
        metrics = self._reduce_metrics(s.metrics)
        norms = {}
        for role in updates:
            opt = self.optims[role]
            opt.reduce_grads()
            clip = self.res.raw.optim.grad_clip
            norms[role] = opt.clip_grad_norm(clip) if clip > 0 else opt.grad_norm()
        finite = all(math.isfinite(v) for v in metrics.values()) and all(math.isfinite(float(n)) for n in norms.values())
        if not finite:
            self.guard.record_skip(self.step)
            metrics["skipped"] = 1.0
        else:
            o = self.res.raw.optim
            factor = lr_factor(self.step, o.warmup_steps, self.res.max_steps, o.schedule)
            for role in updates:
                opt = self.optims[role]
                for g in opt.optimizer.param_groups:
                    g["lr"] = self.base_lr[role] * factor
                opt.step()
            if "student" in updates:
                retie_weights(self.roles, self.res)
                if self.ema is not None:
                    self.ema.update(self.roles.student)
        for role, n in norms.items():
            metrics[f"grad_norm/{role}"] = float(n)
        return metrics

    def advance(self) -> dict:
        """One training step on the next batch."""
        self.last_batch = next(self.batches)
        generator = "student" in self.updates_this_step()
        metrics = self.train_step(self.last_batch)
        self.throughput.count(generator, tuple(self.last_batch["latent"].shape[2:]))
        self.step += 1
        return metrics

    def _reduce_metrics(self, local: dict) -> dict:
        """Each metric is a sum of stage-local parts; average over DP, count TP/CP replicas once."""
        names = sorted(local)
        if dist.is_initialized():
            names = sorted(set().union(*comm.all_gather_object(names, self.topo.world)))
        vec = torch.tensor([float(local.get(n, 0.0)) for n in names], dtype=torch.float64, device=self.topo.device)
        vec = comm.all_reduce(vec, self.topo.world)
        replicas = self.topo.dp.size * self.topo.tp.size * self.topo.cp.size
        return {n: float(v) / replicas for n, v in zip(names, vec.tolist())}

    # ---- the loop -----------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self.stop_signal = True

    def _stop_reason(self) -> str | None:
        """Why every rank stops after this step, or None. Any rank's signal or rank 0 seeing run.stop_file
        (one metadata lookup per step on the shared filesystem) stops them all at the same step."""
        stop_file = self.res.raw.run.stop_file
        seen = self.topo.world.rank == 0 and stop_file is not None and os.path.exists(stop_file)
        flags = torch.tensor([float(self.stop_signal), float(seen)], device=self.topo.device)
        signalled, seen = (bool(v > 0) for v in comm.all_reduce(flags, self.topo.world).tolist())
        if seen:
            return f"run.stop_file {stop_file} appeared"
        return "SIGUSR1/SIGTERM" if signalled else None

    def start(self) -> None:
        """Resume from the run's latest checkpoint (per run.resume; a checkpoint that fails to load falls back to
        the one before, said in the banner), move an earlier run's outputs aside on a fresh start, and open this
        DP rank's data stream."""
        run = self.res.raw.run
        ckpt_dir = self.out / "checkpoints"
        candidates, notes = ([], []) if run.resume == "never" else ckpt.resume_candidates(
            ckpt_dir, "latest" if run.resume == "auto" else run.resume)
        meta = path = None
        for candidate in candidates:
            try:
                meta, path = self.load(candidate), candidate
                break
            except (ckpt.ResumeError, UntrustedCheckpoint, RecipeError):
                raise
            except (Exception, CheckpointException) as err:  # a truncated shard, corrupt meta.json, ...
                notes.append(f"{candidate.name} cannot be loaded ({ckpt.describe_failure(err)}); trying the one before")
        if candidates and path is None:
            raise ckpt.ResumeError(
                f"none of the checkpoints in {ckpt_dir} can be loaded ({'; '.join(notes)}): restore them, or start "
                "over with run.resume=never (the broken ones are moved to archive/, nothing is deleted)")
        archived = None
        if self.topo.world.rank == 0:
            archived = archive_outputs(self.out, None if path is None else self.step)
        if dist.is_initialized():
            dist.barrier()
        start = None
        if path is not None:
            lay = meta["layout"]
            if lay["dp"] != self.topo.dp.size:
                raise ckpt.ResumeError(
                    f"{path} was saved with {lay['dp']} data-parallel ranks, this run has {self.topo.dp.size}: the data "
                    "order depends on the DP size; resume with the same number of DP replicas (TP/CP/PP may change)")
            start = meta["loader"].get(str(self.topo.dp.rank))
        self._say(banner(self.res, self.topo, self.out, path, self.step, notes, archived))
        self.logger = MetricLogger(self.out, self.res.max_steps, **self._logger_args)
        self.data = make_data(self.res, self.topo, start)
        self.data_negative = self.data.negative.to(self.topo.device)
        self.batches = iter(self.data.loader)

    def fit(self) -> int:
        run = self.res.raw.run
        for sig in (signal.SIGUSR1, signal.SIGTERM):  # first: a signal while loading stops at the first step
            signal.signal(sig, self._on_signal)
        self.start()
        watchdog = StepWatchdog(run.hang_dump_s, self.topo.world.rank)
        t0 = time.monotonic()
        metrics = {}
        while self.step < self.res.max_steps:
            watchdog.arm(self.step + 1)  # only a step that runs past run.hang_dump_s writes the stacks
            try:
                metrics = self.advance()
            finally:
                watchdog.disarm()
            if self.step % run.log_every == 0 or self.step == self.res.max_steps:
                elapsed = time.monotonic() - t0
                metrics["step_time_s"] = elapsed / max(1, run.log_every)
                metrics.update(self.throughput.metrics(elapsed))
                self.logger.log(self.step, metrics)
                t0 = time.monotonic()
            reason = self._stop_reason()
            if reason:
                self.save()
                raise Preempted(f"stopped at step {self.step} ({reason}); checkpoint written")
            if run.ckpt_every and self.step % run.ckpt_every == 0 and self.step < self.res.max_steps:
                self.save()
            if run.sample_every and self.step % run.sample_every == 0:
                self.preview()
        self.save()
        export = self.export()
        self.logger.close()
        self._say(summary(self.res, self.out, export, metrics, self.step))
        return 0

    def _say(self, text: str) -> None:
        """Operator-facing lines (banner, summary), from rank 0, on the metrics console stream."""
        if self.topo.world.rank == 0:
            stream = self._logger_args["stream"] or sys.stdout
            stream.write(text + "\n")
            stream.flush()

    @torch.no_grad()
    def preview(self) -> None:
        """A few samples from the current student for the first prompts of the current batch, written to
        <out_dir>/samples/step_X (latents, and mp4 previews for the synthetic task). Not under pipeline
        parallelism (the samplers call whole models)."""
        if self.topo.pp.size > 1:
            if not getattr(self, "_preview_skipped", False) and self.topo.world.rank == 0:
                print("run.sample_every: previews are skipped under pipeline parallelism", flush=True)
            self._preview_skipped = True
            return
        from .sampling import sample

        kind = {"tm_mf": "tmd", "tmd": "tmd", "flow_matching": "teacher"}.get(self.res.method, "dmd2v")
        n = self.res.raw.run.num_samples
        ctx = self.last_batch["context"][:n].float().to(self.topo.device)
        latent = tuple(self.last_batch["latent"].shape[1:])
        cond = image_condition_of(self.res, self.last_batch)
        cond = None if cond is None else cond.rows(slice(0, len(ctx))).to(self.topo.device)
        module = self.roles.student
        module.eval()
        x, nfe = sample(kind, module, ctx, self.data_negative, latent, sampler_config_of(self.res), seed=self.step,
                        cond=cond)
        module.train()
        if self.topo.dp.rank == 0 and self.topo.tp.rank == 0 and self.topo.cp.rank == 0:
            folder = self.out / "samples" / f"step_{self.step:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"latents": x.cpu(), "prompts": self.last_batch.get("prompt", [])[: len(x)], "nfe": nfe},
                       folder / "latents.pt")
            if self.res.raw.data.source == "synthetic":
                from tmd_megatron.cli.sample import _write_mp4
                from tmd_megatron.data.synthetic import SyntheticTask

                videos = SyntheticTask(text_dim=self.res.wan.text_dim).decode_latent(x.cpu())
                for i, v in enumerate(videos):
                    _write_mp4(folder / f"{i}.mp4", v)

    def export(self) -> Path:
        """The trained student (EMA weights if enabled) as a single-device checkpoint in <out_dir>/export."""
        from .export import write_export

        module = self.roles.student
        if self.ema is not None:
            backup = {n: p.detach().clone() for n, p in module.named_parameters() if n in self.ema.shadow}
            self.ema.copy_to(module)
        full = gather_full_state(module, self.topo, dst=0)  # on rank 0 only (56 GB for 14B in fp32)
        if self.ema is not None:
            with torch.no_grad():
                for n, p in module.named_parameters():
                    if n in backup:
                        p.copy_(backup[n])
        out = self.out / "export"
        if self.topo.world.rank == 0:
            full = {k: v for k, v in full.items() if not k.startswith(TIED)}
            write_export(out, self.res.wan, full, self.res.student)
            (out / SAMPLER_JSON).write_text(json.dumps(dataclasses.asdict(sampler_config_of(self.res)), indent=2))
            (self.out / "export_info.json").write_text(json.dumps({"step": self.step, "method": self.res.method}))
        if dist.is_initialized():
            dist.barrier()
        return out
