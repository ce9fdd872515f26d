"""A real two-node SLURM cluster on this one machine, for testing launch/slurm/*.sbatch.

munged, slurmctld and two slurmd (fake nodes n1, n2 on 127.0.0.1:17001/17002) run as root
with every file under one temp dir; clients find them through SLURM_CONF in `env`. The
packages are installed with apt-get when missing (as CI's fresh Debian needs). Whatever
cannot be had (not root, no apt-get, ports taken) raises Unavailable with the reason, so a
test can skip instead of fail. Teardown stops only the daemons started here, by pid, and
removes only the /etc/hosts line added here.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "mungekey")
NODES = {"n1": 17001, "n2": 17002}
HOSTS = Path("/etc/hosts")
HOSTS_LINE = "127.0.0.1 " + " ".join(NODES) + "  # sat_dist tests/slurm_cluster.py"


class Unavailable(Exception):
    """SLURM cannot be brought up here; the message says why (a skip reason)."""


def ensure_packages() -> None:
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise Unavailable("SLURM is not installed and installing it with apt-get needs root")
    if not shutil.which("apt-get"):
        raise Unavailable("SLURM is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:  # a fresh image has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0 or not all(shutil.which(b) for b in BINARIES):
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {tail[0]}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _resolves_to_loopback(name: str) -> bool:
    try:
        return socket.gethostbyname(name).startswith("127.")
    except OSError:
        return False


class Cluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.procs: dict[str, subprocess.Popen] = {}
        self.added_hosts_line = False
        # Not a surrounding job's SLURM_* (pytest run inside salloc): this cluster's only.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}

    # -- bring-up ---------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> "Cluster":
        if os.geteuid() != 0:
            raise Unavailable("a test SLURM cluster needs root (slurmd runs jobs as any user)")
        ensure_packages()
        busy = [p for p in NODES.values() if not _port_free(p)]
        if busy:
            raise Unavailable(f"ports {busy} are in use (another test cluster running?)")
        try:
            self._hosts_add()
            self._write_config()
            self._start_munge()
            self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            for node in NODES:
                self._start(node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _hosts_add(self) -> None:
        # The rendezvous resolves the first node's name; fake names need a hosts entry.
        if all(_resolves_to_loopback(n) for n in NODES):
            return
        try:
            with HOSTS.open("a") as f:
                f.write(HOSTS_LINE + "\n")
        except OSError as e:
            raise Unavailable(f"cannot add '{HOSTS_LINE}' to {HOSTS}: {e.strerror}")
        self.added_hosts_line = True

    def _hosts_remove(self) -> None:
        if not self.added_hosts_line:
            return
        lines = HOSTS.read_text().splitlines(keepends=True)
        for i, line in enumerate(lines):
            if line.rstrip("\n") == HOSTS_LINE:
                del lines[i]
                break
        HOSTS.write_text("".join(lines))
        self.added_hosts_line = False

    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        self.munge_socket = r / "munge" / "munge.socket"
        self.conf = r / "slurm.conf"
        nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={cpus} "
                          f"RealMemory=1000 State=UNKNOWN" for n, p in NODES.items())
        self.conf.write_text(f"""\
ClusterName=satdisttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd'}-%n.pid
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd'}-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# finished jobs stay visible to `scontrol show job` while a test inspects them
MinJobAge=600
{nodes}
PartitionName=test Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        self.env["SLURM_CONF"] = str(self.conf)

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        r = subprocess.run(["mungekey", "--create", f"--keyfile={key}"], capture_output=True, text=True)
        if r.returncode != 0:
            raise Unavailable(f"mungekey failed: {r.stderr.strip()}")
        self._start("munged", ["munged", "-F", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--seed-file={self.root / 'munge' / 'munged.seed'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}"])
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise Unavailable("munged did not create its socket in 10 s")
            time.sleep(0.05)

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                out = (self.root / "log" / f"{name}.stdout").read_text(errors="replace").strip()
                raise Unavailable(f"{name} exited with {p.returncode}: {out.splitlines()[-1:] or ''}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            self._check_alive()
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
            states = r.stdout.strip()
            idle = {line.split()[0] for line in states.splitlines() if line.split()[1:] == ["idle"]}
            if idle >= set(NODES):
                return
            time.sleep(0.2)
        raise Unavailable(f"nodes not idle after {timeout:.0f} s: {states or r.stderr.strip()}")

    # -- use --------------------------------------------------------------------------------
    def run(self, *args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=env or self.env, capture_output=True, text=True, **kw)

    def job_field(self, job_id: str, field: str) -> str:
        out = self.run("scontrol", "show", "job", job_id).stdout
        m = re.search(rf"\b{field}=(\S*)", out)
        return m.group(1) if m else ""

    def log_tail(self, name: str, lines: int = 30) -> str:
        p = self.root / "log" / name
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:]) if p.exists() else ""

    # -- teardown ---------------------------------------------------------------------------
    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            # Our own cluster's jobs only: their steps would outlive the daemons otherwise.
            try:
                self.run("scancel", "--quiet", "--partition=test", timeout=10)
                self._wait_no_jobs(15)
            except subprocess.TimeoutExpired:
                pass
        for name in [*NODES, "slurmctld", "munged"]:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()
        self._hosts_remove()

    def _wait_no_jobs(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.run("squeue", "-h", "-o", "%i", timeout=10)
            if r.returncode != 0 or not r.stdout.strip():
                return
            time.sleep(0.3)
