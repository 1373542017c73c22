"""The benchmark, small and short: it runs end to end and nothing goes missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_bench(tmp_path: Path, *options: str) -> tuple[dict[str, Any], str]:
    """Run `python -m bench` with these options; return its figures and report."""
    report, figures = tmp_path / "RESULTS.md", tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            *options,
            "--no-pin",
            "--quiet-wait-s",
            "0",
            "--output",
            str(report),
            "--json",
            str(figures),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(figures.read_text()), report.read_text()


def test_benchmark_delivers_every_change_once_in_order_and_reports(
    tmp_path: Path,
) -> None:
    data, text = run_bench(
        tmp_path,
        "--sizes",
        "200",
        "--changes",
        "200",
        "--rate",
        "100",
        "--durable-s",
        "1",
        "--back-to-back-s",
        "1",
    )
    assert {run["server"] for run in data["runs"]} == {"vapora", "fanout"}
    for run in data["runs"]:
        assert run["connect_failures"] == 0, run["publish_errors"]
        assert run["changes"] == 200, run["publish_errors"]
        assert run["deliveries"] == run["expected"] == 200 * 10
        assert (run["lost"], run["duplicated"], run["out_of_order"]) == (0, 0, 0)
        assert run["unexpected"] == 0
        assert run["protocol_errors"] == []
    assert [d["server"] for d in data["durables"]] == ["vapora", "fanout"]
    assert all(d["back_to_back_changes"] > 0 for d in data["durables"])
    assert "| 200 | 20 |" in text
    assert "## Targets" in text


def test_benchmark_on_two_nodes_delivers_every_change_and_reports(
    tmp_path: Path,
) -> None:
    data, text = run_bench(
        tmp_path,
        "--sizes",
        "100",
        "--changes",
        "100",
        "--servers",
        "vapora",
        "--nodes",
        "2",
        "--durable-s",
        "0",
    )
    assert [(r["server"], r["nodes"]) for r in data["runs"]] == [
        ("vapora", 1),
        ("vapora-2nodes", 2),
    ]
    for run in data["runs"]:
        assert run["connect_failures"] == 0, run["publish_errors"]
        assert run["changes"] == 100, run["publish_errors"]
        assert run["deliveries"] == run["expected"] == 100 * 10
        assert (run["lost"], run["duplicated"], run["out_of_order"]) == (0, 0, 0)
        assert run["unexpected"] == 0
        assert run["protocol_errors"] == []
    assert "## Two nodes" in text
    assert text.count("| 100 | 10 |") == 2


def test_commit_cost_measures_a_change_and_its_controls() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.commitcost", "--count", "5", "--pause-ms", "1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == [
        "| store change (SQLite file)",
        "| control: 20 JSON encodings",
        "| control: in-memory SQLite insert",
    ]
    assert all(float(row.split(" | ")[1]) > 0 for row in rows[1:])
