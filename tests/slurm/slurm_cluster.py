"""A real SLURM (Debian's 22.05) on this one machine: a private munged, a slurmctld and one slurmd per
emulated node, all on 127.0.0.1 with their own ports, state under a temp dir, and a SLURM_CONF that only our
clients read, so it never touches a system-wide SLURM. Why each setting: shared/notes/STACK_ON_CPU.md.

Every process the cluster ever runs (daemons, slurmstepd, srun, the job's ranks) carries our SLURM_CONF in
its environment (sbatch exports the caller's environment; slurmd passes its own to slurmstepd), which is how
`stop()` finds and ends all of them and `leftovers()` proves it did.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "slurmstepd", "sbatch", "scontrol", "munged")
HOSTS_MARK = "# tmd-slurm-test"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class ClusterError(RuntimeError):
    pass


def install_reason() -> str | None:
    """Install Debian's SLURM + munge when missing; the reason to skip when this machine cannot."""
    if os.geteuid() != 0:
        return "SLURM tests need root (daemons, munge key ownership, /etc/hosts; CI runs as root)"
    if all(shutil.which(b) for b in BINARIES):
        return None
    if not shutil.which("apt-get"):
        return "SLURM tests need apt-get (Debian/Ubuntu) to install slurmctld slurmd slurm-client munge"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise ClusterError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        raise ClusterError(f"installed {PACKAGES} but {missing} are still not on PATH")
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")


class SlurmCluster:
    def __init__(self, nodes: tuple[str, ...] = ("tmdn1", "tmdn2"), cpus: int = 128, gpus: int = 8):
        self.nodes = nodes
        self.cpus = cpus
        self.gpus = gpus
        self.root = Path(tempfile.mkdtemp(prefix="tmd-slurm-"))
        self.root.chmod(0o755)  # munged runs as the munge user and must reach its directory
        self.conf = self.root / "etc" / "slurm.conf"
        self.log_dir = self.root / "log"
        self.log_dir.mkdir()
        self._daemons: list[subprocess.Popen] = []
        self._hosts_added = False

    @property
    def env(self) -> dict[str, str]:
        """Environment for our clients (sbatch, scontrol, ...) and, through sbatch, for the jobs."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    # ---------------------------------------------------------------- bring-up
    def start(self, timeout: float = 60) -> None:
        try:
            self._start_munge()
            self._write_config()
            self._add_hosts()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            _wait_for(lambda: self.scontrol("ping", check=False).returncode == 0, timeout, "slurmctld to answer")
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            _wait_for(self._all_idle, timeout, f"nodes {self.nodes} to be idle")
        except BaseException:
            self.stop()
            raise

    def _start_munge(self) -> None:
        munge = self.root / "munge"
        munge.mkdir()
        munge.chmod(0o755)  # munged wants its socket's directory searchable by every client
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))  # a key of our own: nothing read from the system's munge
        key.chmod(0o600)
        for path in (munge, key):
            shutil.chown(path, "munge", "munge")
        self.munge_socket = munge / "munge.socket"
        self._spawn("munged", ["munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
                               f"--log-file={munge / 'munged.log'}"], user="munge")
        _wait_for(lambda: self._alive() and self.munge_socket.exists(), 30, "munged's socket")

    def _write_config(self) -> None:
        etc, state, spool, dev = (self.root / d for d in ("etc", "state", "spool", "dev"))
        for d in (etc, state, spool, dev, *(spool / n for n in self.nodes)):
            d.mkdir()
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        # --gpus-per-node=8 in the launchers needs GPUs slurmd can "see": character devices like /dev/null.
        for i in range(self.gpus):
            os.mknod(dev / f"gpu{i}", 0o666 | 0o020000, os.makedev(1, 3))
        names = ",".join(self.nodes)
        lines = [
            "ClusterName=tmdtest",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire is also how long a requeued job waits before it may start again (default 120 s)
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}/%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid",
            f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.log_dir}/slurmctld.log",
            f"SlurmdLogFile={self.log_dir}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SlurmdParameters=config_overrides",  # nodes declare more CPUs than this machine has
            "GresTypes=gpu",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "MailProg=/bin/true",
            "KillWait=10",
            "InactiveLimit=0",
            "SchedulerParameters=sched_interval=1",
            *(f"NodeName={n} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} RealMemory=64000 Gres=gpu:{self.gpus}"
              " State=UNKNOWN" for n, p in zip(self.nodes, node_ports)),
            f"PartitionName=batch Nodes={names} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        (etc / "gres.conf").write_text(f"NodeName={names} Name=gpu File={dev}/gpu[0-{self.gpus - 1}]\n")

    def _add_hosts(self) -> None:
        """Node names must resolve (MASTER_ADDR is the first node's name), as DNS does on a real cluster.
        One marked line; a marked line left by a killed run is replaced (one test cluster at a time)."""
        self._remove_hosts()
        with open("/etc/hosts", "a") as fh:
            fh.write(f"127.0.0.1 {' '.join(self.nodes)} {HOSTS_MARK}\n")
        self._hosts_added = True

    def _spawn(self, name: str, cmd: list[str], user: str | None = None) -> None:
        log = open(self.log_dir / f"{name}.console", "ab")
        self._daemons.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, user=user, start_new_session=True))
        log.close()

    def _alive(self) -> bool:
        dead = [d.args[0] for d in self._daemons if d.poll() is not None]
        if dead:
            raise ClusterError(f"{dead} exited during start-up; logs:\n{self.logs()}")
        return True

    def _all_idle(self) -> bool:
        self._alive()
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
        return dict(zip(out[::2], out[1::2])) == {n: "idle" for n in self.nodes}

    # ---------------------------------------------------------------- clients
    def run(self, cmd: list[str], check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode:
            raise ClusterError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(["scontrol", *args], check=check)

    def sbatch(self, script, *options: str, env: dict[str, str] | None = None, cwd=None) -> int:
        proc = self.run(["sbatch", "--parsable", *options, str(script)], env=dict(self.env, **(env or {})), cwd=cwd)
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict; {} once the job has left the controller (MinJobAge after the end)."""
        proc = self.scontrol("show", "job", "-o", str(job_id), check=False)
        if proc.returncode:
            return {}
        return dict(f.split("=", 1) for f in proc.stdout.split() if "=" in f)

    def follow(self, job_id: int, timeout: float) -> list[tuple[str, str]]:
        """Distinct (JobState, Restarts) the job goes through until it ends; the last one is final."""
        seen: list[tuple[str, str]] = []
        deadline = time.monotonic() + timeout
        while not seen or seen[-1][0] not in TERMINAL:
            if time.monotonic() > deadline:
                raise ClusterError(f"job {job_id} did not end within {timeout:.0f} s; states seen: {seen}")
            j = self.job(job_id)
            now = (j.get("JobState", "?"), j.get("Restarts", "?"))
            if not seen or seen[-1] != now:
                seen.append(now)
            time.sleep(0.2)
        return seen

    def cancel_all(self, timeout: float = 60) -> None:
        """End every job and wait until the nodes are idle again, so one test's hung job cannot hold the
        nodes through the next tests."""
        self.run(["scancel", "--user=root"], check=False, timeout=10)
        _wait_for(self._all_idle, timeout, "nodes to be idle after scancel")

    def diagnosis(self, job_id: int) -> str:
        """What a hung job is doing: its controller record, and every process of the cluster with the Python
        stacks of the ranks (py-spy, when installed)."""
        lines = [f"== scontrol show job {job_id}", " ".join(f"{k}={v}" for k, v in self.job(job_id).items())]
        spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        for proc in self.processes():
            try:
                cmd = " ".join(proc.cmdline())[:200]
                lines.append(f"== pid {proc.pid} ppid {proc.ppid()} {proc.status()}: {cmd}")
            except psutil.Error:
                continue
            if spy and (proc.name().startswith("python") or proc.name() in ("tmd-train", "torchrun")):
                dump = subprocess.run([spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True,
                                      timeout=30)
                lines.append((dump.stdout or dump.stderr)[-2500:])
        return "\n".join(lines)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.log_dir.glob("*")) if p.is_file())

    # ---------------------------------------------------------------- teardown
    def processes(self) -> list[psutil.Process]:
        """Every live process of this cluster: daemons, slurmstepd, srun and job ranks (zombies excluded).
        Read /proc/<pid>/environ raw: slurmstepd writes its title over argv, which leaves the block
        unparseable for psutil.environ() but the bytes of SLURM_CONF=... still there."""
        mine = []
        marker, root = f"SLURM_CONF={self.conf}\0".encode(), str(self.root)
        for proc in psutil.process_iter():
            try:
                if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
                if marker in environ or any(root in a for a in proc.cmdline()):
                    mine.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, FileNotFoundError,
                    ProcessLookupError, PermissionError):
                continue
        return mine

    def stop(self, grace: float = 10) -> None:
        if self.conf.exists() and all(d.poll() is None for d in self._daemons):
            # Let slurmd end the jobs' slurmstepds (they outlive slurmd by design), then stop the daemons.
            try:
                self.cancel_all(grace + 20)
            except ClusterError:
                pass  # whatever is left is killed below
        for daemon in reversed(self._daemons):  # slurmds, then slurmctld, then munged
            if daemon.poll() is None:
                daemon.terminate()
        for daemon in self._daemons:
            try:
                daemon.wait(grace)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(5)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # slurmstepd and job processes left behind
            procs = self.processes()
            for proc in procs:
                try:
                    proc.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(procs, timeout=grace)
        if self._hosts_added:
            self._remove_hosts()

    def _remove_hosts(self) -> None:
        hosts = Path("/etc/hosts")
        lines = hosts.read_text().splitlines(keepends=True)
        kept = [line for line in lines if not line.rstrip().endswith(HOSTS_MARK)]
        if kept != lines:
            hosts.write_text("".join(kept))  # in place: /etc/hosts may be a bind mount
        self._hosts_added = False

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
