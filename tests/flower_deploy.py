"""A real Flower deployment on 127.0.0.1 for tests: a SuperLink, SuperNodes, `flwr run`.

Every process gets free ports, its own FLWR_HOME, this checkout first on PYTHONPATH, and —
for the simulation engine — its own local Ray instance (RAY_ADDRESS=local, a private
RAY_TMPDIR, listening on 127.0.0.1 only), so nothing joins another Ray cluster on the machine. `stop` ends every
process started here and all their descendants (Flower detaches its SuperExec, so the
process tree is recorded while the parents are alive), also after a failure.
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

from fedsim.executors.ray_cluster import LOOPBACK_ENV

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    """Returns a TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_value(v) -> str:
    """Formats a run-config value as `flwr run -c` expects it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v + '"'
    return repr(v)


def node_key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    """Writes a SuperNode's ECDSA P-384 key pair in OpenSSH format (what `ssh-keygen -t ecdsa
    -b 384` makes, as docs/flower.md tells users); returns (private, public) paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


class Deployment:
    """See the module docstring. `nodes`: one node-config string per SuperNode; `env`: added
    to every process's environment. `secure`: TLS with the certificates of the shipped app's
    generate_certs.sh, and SuperNode authentication (each node's public key registered with
    `flwr supernode register` before it starts), as docs/flower.md's multi-machine recipe;
    `unregistered` more SuperNodes start with keys that were never registered."""

    def __init__(self, workdir: Path, nodes: list[str] = (), simulation: bool = False, env: dict | None = None,
                 secure: bool = False, unregistered: int = 0):
        self.workdir = workdir
        self.home = workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="fsray", dir="/tmp"))  # short: Ray's socket paths
        self.port = free_port()
        self.env = dict(
            os.environ, FLWR_HOME=str(self.home), PYTHONPATH=str(ROOT), PATH=f"{BIN}:{os.environ['PATH']}",
            OMP_NUM_THREADS="1", FLWR_DISABLE_UPDATE_CHECK="1", RAY_ADDRESS="local", RAY_TMPDIR=str(self.ray_tmp),
            **LOOPBACK_ENV,  # the simulation engine's Ray listens on 127.0.0.1 only
            **(env or {}),
        )
        self.procs: list[subprocess.Popen] = []
        self.tree: dict[int, psutil.Process] = {}
        self.secure = secure
        try:
            if secure:
                subprocess.run(["sh", str(ROOT / "experiments" / "flower_app" / "generate_certs.sh")], cwd=workdir,
                               check=True, capture_output=True, timeout=60)
                certs = workdir / "certificates"
                link_tls = ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
                            "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth"]
                node_tls = ["--root-certificates", str(certs / "ca.crt")]
                access = f'root-certificates = "{certs / "ca.crt"}"'
            else:
                link_tls, node_tls, access = ["--insecure"], ["--insecure"], "insecure = true"
            (self.home / "config.toml").write_text(
                f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{self.port}"\n{access}\n'
            )
            self._start("superlink", ["flower-superlink", *link_tls, "--host", "127.0.0.1", "--port", str(self.port),
                                      "--disable-runtime-dependency-installation", *(["--simulation"] if simulation else [])])
            self._wait_for_port()
            for i, cfg in enumerate([*nodes, *["partition-id=0 num-partitions=1"] * unregistered]):
                auth = []
                if secure:
                    private, public = node_key_pair(workdir, f"node{i}")
                    if i < len(nodes):
                        self.flwr("supernode", "register", str(public), "test")
                    auth = ["--auth-supernode-private-key", str(private)]
                self._start(f"node{i}", ["flower-supernode", *node_tls, *auth, "--superlink", f"127.0.0.1:{self.port}",
                                         "--port", str(free_port()), "--node-config", cfg])
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "w")
        self.procs.append(subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], env=self.env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir))

    def _wait_for_port(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise RuntimeError(f"flower-superlink exited:\n{self.logs()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"flower-superlink did not listen within {timeout} s:\n{self.logs()}")

    def remember_tree(self) -> None:
        """Records the descendants of every started process (called often: they come and go)."""
        for p in self.procs:
            try:
                for child in psutil.Process(p.pid).children(recursive=True):
                    self.tree.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass

    def run(self, app: Path, run_config: dict, federation_config: str | None = None,
            timeout: float = 900, via_fedsim: bool = False) -> subprocess.CompletedProcess:
        """Runs `flwr run APP test --stream -c ...` (`via_fedsim`: through `fedsim flower-run`,
        whose exit status is the run's outcome) and returns when the run has finished."""
        start = [str(BIN / "python"), "-m", "fedsim", "flower-run"] if via_fedsim else [str(BIN / "flwr"), "run"]
        cmd = [*start, str(app), "test", "--stream",
               "-c", " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())]
        if federation_config:
            cmd += ["--federation-config", federation_config]
        proc = subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=self.workdir, start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            self.remember_tree()
            time.sleep(0.5)
        if proc.poll() is None:
            raise TimeoutError(f"flwr run did not finish within {timeout} s:\n{self.logs()}")
        return subprocess.CompletedProcess(cmd, proc.returncode, proc.stdout.read(), "")

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        """Runs a `flwr` command against this deployment; raises with its output when it fails."""
        res = subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.workdir, capture_output=True,
                             text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
        return res

    def runs(self) -> list[dict]:
        """Returns `flwr ls --format json`'s runs of this SuperLink (status, status-details…)."""
        import json

        res = subprocess.run([str(BIN / "flwr"), "ls", "test", "--format", "json"], env=self.env, cwd=self.workdir,
                             capture_output=True, text=True, timeout=120)
        return json.loads(res.stdout)["runs"]

    def logs(self) -> str:
        """Returns the tail of every process log (for failure messages)."""
        out = []
        for f in sorted(self.workdir.glob("*.log")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(out)

    def stop(self) -> None:
        """Ends every process started here and their descendants; removes the private Ray folder."""
        self.remember_tree()
        everyone = [psutil.Process(p.pid) for p in self.procs if p.poll() is None] + list(self.tree.values())
        for p in everyone:
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(everyone, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for p in self.procs:
            if p.stdout:
                p.stdout.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def leftovers(self) -> list[int]:
        """Returns the pids of started processes (or descendants) still running."""
        pids = [p.pid for p in self.procs] + list(self.tree)
        return [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
