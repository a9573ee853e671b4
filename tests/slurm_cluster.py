"""A throwaway one-node SLURM cluster (munged, slurmctld, slurmd) on this machine, for end-to-end tests of
hydra/launcher=slurm. Config, key, state, logs and sockets live in one folder and the daemons listen on free ports,
so a system cluster, /etc/slurm and /etc/munge stay untouched; clients find the cluster through SLURM_CONF."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scancel", "scontrol")  # what submitit and this helper call
MARKER = "normsweep-slurm"  # in the folder's name: how a later run recognizes daemons an earlier one left behind
# slurmd -C prints the node's hardware; these are the keys a NodeName line takes from it
HARDWARE_KEYS = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")


def why_not_available() -> str | None:
    """None when a cluster can be started here, else the reason (for pytest.skip)."""
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name, path=_path()) is None]
    if missing:
        return (f"SLURM/munge not installed (missing {', '.join(missing)}): "
                "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "starting slurmd needs root (it runs jobs as their user)"
    return None


def _path() -> str:
    return os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"  # the daemons live in sbin, often not on PATH


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_hardware() -> str:
    """'CPUs=2 Boards=1 ... RealMemory=24105' for this machine, as slurmd itself sees it: a node declared with
    more CPUs or memory than slurmd finds is drained, so these must be slurmd's own numbers."""
    out = subprocess.run([shutil.which("slurmd", path=_path()), "-C"], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return " ".join(f"{key}={fields[key]}" for key in HARDWARE_KEYS if key in fields)


def write_config(root: Path) -> Path:
    """slurm.conf (and the munge key) for a one-node cluster whose every file is under root; -> slurm.conf."""
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o700)  # munged refuses a key or socket folder that others may write to
    key = root / "munge" / "munge.key"
    if not key.exists():  # a private key: /etc/munge/munge.key (and any munged using it) stays as it was
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=normsweep
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again cred_expire seconds later (default 120); the main scheduler tests pending jobs
# every sched_interval seconds (default 60): both short, so that a requeued job restarts within seconds
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
SchedulerParameters=sched_interval=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
# no cgroups, no accounting: works in containers; submitit then logs harmless sacct warnings
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
# SIGKILL 5 s after a time limit's SIGTERM, not 30; no mail (quiets "Configured MailProg is invalid")
KillWait=5
MailProg=/bin/true
NodeName={host} NodeAddr=127.0.0.1 {_node_hardware()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _owner_alive(folder: Path) -> bool:
    try:
        os.kill(int((folder / "owner.pid").read_text()), 0)
        return True
    except (OSError, ValueError):
        return False  # no such process, or the folder (or its owner.pid) is gone


def kill_leftovers() -> None:
    """Stops daemons that an earlier run of this helper left behind (killed before its cleanup). They are
    recognized by their command line, which names a file in a *normsweep-slurm* folder, and by that folder's
    owner.pid naming a process that has ended: a cluster another test session is still using is left alone."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # ended meanwhile, or not ours to read
        if not args or Path(args[0]).name not in DAEMONS:
            continue
        paths = [Path(arg.split("=", 1)[-1]) for arg in args[1:] if MARKER in arg]  # -f X or --socket=X
        folders = {folder for path in paths for folder in (path, *path.parents) if folder.name == MARKER}
        if folders and not any(_owner_alive(folder) for folder in folders):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _check(procs: dict[str, subprocess.Popen], root: Path) -> None:
    """Raises, with the end of its output and log, when a daemon has exited (a bad config, a port in use)."""
    for name, proc in procs.items():
        if proc.poll() is not None:
            logs = [root / f"{name}.out", root / f"{name}.log"]  # .out: what it printed before its log opened
            tails = "\n".join(log.read_text(errors="replace")[-2000:] for log in logs if log.exists())
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tails}")


def _wait(what: str, ready: Callable[[], bool], procs: dict[str, subprocess.Popen], root: Path,
          timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        _check(procs, root)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s; logs in {root}")
        time.sleep(0.5)


def stop(procs: dict[str, subprocess.Popen], env: dict[str, str]) -> None:
    """Cancels every job, then stops the daemons in reverse order (SIGTERM, then SIGKILL after 10 s)."""
    if procs.get("slurmctld") and procs["slurmctld"].poll() is None:
        subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True, timeout=30)
        deadline = time.monotonic() + 20  # let slurmd end the jobs' processes while it still runs
        while time.monotonic() < deadline:
            queue = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=30)
            if queue.returncode != 0 or not queue.stdout.strip():
                break
            time.sleep(1)
    for name in reversed(list(procs)):
        procs[name].terminate()
    for name in reversed(list(procs)):
        try:
            procs[name].wait(timeout=10)
        except subprocess.TimeoutExpired:
            procs[name].kill()
            procs[name].wait()


@contextmanager
def slurm_cluster(root: Path, timeout: float = 60) -> Iterator[dict[str, str]]:
    """Starts the cluster under root (a folder whose name contains MARKER is made inside it) and yields the
    environment for clients (SLURM_CONF set, sbin on PATH); stops every daemon it started on the way out, also
    when the body raises."""
    kill_leftovers()
    root = Path(root) / MARKER
    conf = write_config(root)
    (root / "owner.pid").write_text(str(os.getpid()))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": _path()}
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, *args: str) -> None:
        # -F/-D: in the foreground, so that they stay children of this process and stop() can end them
        with open(root / f"{name}.out", "ab") as out:
            procs[name] = subprocess.Popen([shutil.which(name, path=env["PATH"]), *args], env=env, stdout=out,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    try:
        munge = root / "munge"
        # --force: munged wants every folder above its socket open to all, and pytest's temp folders are 0700
        start("munged", "--foreground", "--force", f"--socket={munge}/munge.socket", f"--key-file={munge}/munge.key",
              f"--pid-file={munge}/munged.pid", f"--log-file={root}/munged.log", f"--seed-file={munge}/munged.seed")
        _wait("munged", (munge / "munge.socket").exists, procs, root, timeout)
        start("slurmctld", "-D", "-f", str(conf))
        start("slurmd", "-D", "-f", str(conf), "-N", socket.gethostname().split(".")[0])

        def idle() -> bool:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True,
                                 timeout=30).stdout.split()
            return out == ["idle"]
        _wait("the SLURM node", idle, procs, root, timeout)
        yield env
    finally:
        stop(procs, env)
