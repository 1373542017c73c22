"""Start the servers under test on 127.0.0.1, and read their CPU, memory and GC."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .gcprobe import GC_FILE_VARIABLE, read_pauses

REDIS_SERVER = "/usr/bin/redis-server"

REPO_ROOT = Path(__file__).resolve().parent.parent
URL_LINE = re.compile(r"serving (http://127\.0\.0\.1:\d+)")
START_TIMEOUT_S = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    """A server process started for one run, with its own folder."""

    name: str
    proc: subprocess.Popen[str]
    url: str
    folder: Path
    log: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def gc_file(self) -> Path:
        return self.folder / "gc.json"

    def rss_kib(self) -> int:
        """Resident memory (VmRSS) in KiB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert match is not None, "no VmRSS in /proc/<pid>/status"
        return int(match.group(1))

    def cpu_s(self) -> float:
        """User plus system CPU seconds of every thread of the process so far."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        # After the command name: state is field 3, utime 14 and stime 15.
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def gc_pauses(self, written_after_ns: int) -> dict[str, Any] | None:
        """Return the probe's record once it covers time up to written_after_ns."""
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            data = read_pauses(self.gc_file)
            if data is not None and data["written_ns"] >= written_after_ns:
                return data
            time.sleep(0.1)
        return None

    def stop(self, timeout_s: float = 15) -> None:
        """SIGTERM, then SIGKILL if it lingers; remove its folder."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def machine_busy_s() -> float:
    """CPU seconds all processes on the machine have run (user, nice, system)."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0]
    user, nice, system = (int(t) for t in first.split()[1:4])
    return (user + nice + system) / CLOCK_TICKS


def child_environment(extra: dict[str, str]) -> dict[str, str]:
    """This environment, with the repository first on the path, plus extra."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    return env


def pinned(command: list[str], cpu: int | None) -> list[str]:
    return command if cpu is None else ["taskset", "-c", str(cpu), *command]


def start(
    name: str, command: list[str], folder: Path, env: dict[str, str], cpu: int | None
) -> Server:
    """Run command and wait for the line that gives its URL."""
    env = child_environment({GC_FILE_VARIABLE: str(folder / "gc.json"), **env})
    proc = subprocess.Popen(
        pinned(command, cpu),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=folder,
    )
    assert proc.stderr is not None
    log: list[str] = []
    timer = threading.Timer(START_TIMEOUT_S, proc.kill)
    timer.start()
    try:
        for line in proc.stderr:
            log.append(line)
            match = URL_LINE.search(line)
            if match:
                # Keep draining, so a chatty server never blocks on a full pipe.
                threading.Thread(
                    target=log.extend, args=(proc.stderr,), daemon=True
                ).start()
                return Server(name, proc, match.group(1), folder, log)
    finally:
        timer.cancel()
    proc.wait()
    raise RuntimeError(f"{name} exited before it was ready:\n" + "".join(log))


def start_vapora(
    folder: Path,
    admin_token: str,
    cpu: int | None,
    max_connections: int,
    db: Path | None = None,
    broker: str = "",
) -> Server:
    """Start `vapora serve` on a free port, on db (a fresh one in folder if None)."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        "VAPORA_ADMIN_TOKEN": admin_token,
        "VAPORA_MAX_CONNECTIONS_PER_ADDRESS": str(max_connections),
        "VAPORA_RETENTION_DAYS": "0",
    }
    command = [sys.executable, "-m", "bench.gcprobe", "serve"]
    command += ["--host", "127.0.0.1", "--port", "0"]
    command += ["--db", str(db or folder / "v.db")]
    if broker:
        command += ["--broker", broker]
    return start("vapora", command, folder, env, cpu)


def start_fanout(folder: Path, cpu: int | None) -> Server:
    """Start the minimal fan-out server on a free port."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "bench.fanout", "--host", "127.0.0.1"]
    return start("fanout", [*command, "--port", "0"], folder, {}, cpu)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds of every thread of a process so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Broker:
    """A throwaway redis-server on 127.0.0.1 that keeps nothing on disk."""

    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cpu_s(self) -> float:
        return process_cpu_s(self.proc.pid)

    def stop(self, timeout_s: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_redis(folder: Path) -> Broker:
    """Start redis-server on a free port and wait until it answers PING."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1"]
    command += ["--save", "", "--appendonly", "no", "--dir", str(folder)]
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return Broker(proc, port)
        except OSError:
            pass
        time.sleep(0.1)
    broker = Broker(proc, port)
    broker.stop()
    raise RuntimeError(f"redis-server on port {port} did not start")


def wait_ready(url: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until GET /readyz answers 200 (the node is connected to its broker)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return
                last = str(answer.status)
        except urllib.error.HTTPError as error:
            last = f"{error.code}: {error.read()[:200]!r}"
        except OSError as error:
            last = str(error)
        time.sleep(0.1)
    raise RuntimeError(f"{url}/readyz never answered 200 ({last})")


@dataclass
class Nodes:
    """Several `vapora serve` processes on one SQLite file, joined by a broker.

    It answers like one Server: memory and CPU are summed over the nodes, and
    the GC record merges theirs. `port` is the first node's; `ports` all of them.
    """

    name: str
    nodes: list[Server]
    broker: Broker

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def port(self) -> int:
        return self.nodes[0].port

    @property
    def proc(self) -> subprocess.Popen[str]:
        return self.nodes[0].proc

    def rss_kib(self) -> int:
        return sum(node.rss_kib() for node in self.nodes)

    def cpu_s(self) -> float:
        return sum(node.cpu_s() for node in self.nodes)

    def gc_pauses(self, written_after_ns: int) -> dict[str, Any] | None:
        records = [node.gc_pauses(written_after_ns) for node in self.nodes]
        if any(record is None for record in records):
            return None
        merged = dict(records[0] or {})
        for key in ("long_pauses", "slow_callbacks"):
            merged[key] = sorted(item for r in records for item in (r or {})[key])
        return merged

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.broker.stop()


def start_vapora_nodes(
    folder: Path,
    admin_token: str,
    cpus: list[int | None],
    max_connections: int,
) -> Nodes:
    """Start a redis-server, then one Vapora node per entry of cpus on one file."""
    folder.mkdir(parents=True, exist_ok=True)
    broker = start_redis(folder / "redis")
    nodes: list[Server] = []
    try:
        for number, cpu in enumerate(cpus):
            nodes.append(
                start_vapora(
                    folder / f"node{number}",
                    admin_token,
                    cpu,
                    max_connections,
                    db=folder / "v.db",
                    broker=broker.url,
                )
            )
        for node in nodes:
            wait_ready(node.url)
    except BaseException:
        for node in nodes:
            node.stop()
        broker.stop()
        raise
    return Nodes(f"vapora-{len(cpus)}nodes", nodes, broker)
