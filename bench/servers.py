"""Start the servers under test on 127.0.0.1, and read their CPU, memory and GC."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .gcprobe import GC_FILE_VARIABLE, read_pauses

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
    folder: Path, admin_token: str, cpu: int | None, max_connections: int
) -> Server:
    """Start `vapora serve` on a free port with a fresh database in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {
        "VAPORA_ADMIN_TOKEN": admin_token,
        "VAPORA_MAX_CONNECTIONS_PER_ADDRESS": str(max_connections),
        "VAPORA_RETENTION_DAYS": "0",
    }
    command = [sys.executable, "-m", "bench.gcprobe", "serve"]
    command += ["--host", "127.0.0.1", "--port", "0", "--db", str(folder / "v.db")]
    return start("vapora", command, folder, env, cpu)


def start_fanout(folder: Path, cpu: int | None) -> Server:
    """Start the minimal fan-out server on a free port."""
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "bench.fanout", "--host", "127.0.0.1"]
    return start("fanout", [*command, "--port", "0"], folder, {}, cpu)
