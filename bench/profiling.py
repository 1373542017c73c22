"""Sample a server with py-spy during a phase, and summarise where its time went.

python -m bench --sizes 5000 --profile /tmp/profiles
python -m bench.profiling /tmp/profiles/vapora-5000-publish.txt
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

SAMPLES_PER_S = 250
# Innermost frames that mean a thread was waiting, not working: left out.
WAITING = (
    "EpollSelector.select (selectors.py",
    "_connection_worker_thread (aiosqlite/core.py:59)",
    "WriterThread._run",
    "Writer.write_forever (bench/gcprobe.py",
)


def py_spy() -> str | None:
    """Find py-spy next to this Python, or on the PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Profiler:
    """py-spy recording one process into a folder, one file per phase."""

    def __init__(self, folder: Path | None, pid: int, label: str) -> None:
        self.folder = folder
        self.pid = pid
        self.label = label
        self._proc: subprocess.Popen[bytes] | None = None
        self._tool = py_spy() if folder is not None else None
        if folder is not None and self._tool is None:
            raise RuntimeError("--profile needs py-spy: pip install py-spy")

    def start(self, phase: str) -> None:
        if self.folder is None or self._tool is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        output = self.folder / f"{self.label}-{phase}.txt"
        command = [self._tool, "record", "--pid", str(self.pid), "--format", "raw"]
        command += ["--rate", str(SAMPLES_PER_S), "--nonblocking"]
        self._proc = subprocess.Popen(
            [*command, "--output", str(output)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None


def summarise(path: Path, top: int = 25) -> str:
    """Top functions by own samples and by samples under them, from raw stacks.

    Samples of a thread waiting (in epoll, or for work on a queue) are left out,
    so the shares are of the time the process was busy.
    """
    own: Counter[str] = Counter()
    under: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames[-1].startswith(WAITING):
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            under[frame] += count
    lines = [f"{path.name}: {total} busy samples"]
    for title, counter in (("own", own), ("inclusive", under)):
        lines.append(f"-- top {top} by {title} samples")
        for frame, count in counter.most_common(top):
            lines.append(f"{count * 100 / max(total, 1):5.1f}%  {frame}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="Summarise py-spy raw profiles.")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for path in args.files:
        print(summarise(path, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
