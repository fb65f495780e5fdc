"""The benchmark harness runs end to end, with tiny counts, and loses nothing.

Timings are not checked here (benchmarks are never timed assertions);
only that every scenario completes and that every message each one sent
arrived, in order.  ``python -m benchmarks.run --smoke`` is the same run
by hand.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import report


def run_harness(tmp_path, *args):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--repeats", "1",
         "--no-plots", "--out", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    [path] = out.glob("*-smoke.json")
    results = json.loads(path.read_text())
    assert (out / "report.md").exists()
    return results


@pytest.mark.timeout(420)
def test_dmb_scenarios_complete_without_loss(tmp_path):
    results = run_harness(
        tmp_path, "--layers", "dmb,inmemory", "--skip", "ccore", "--no-redis"
    )
    assert results["errors"] == {}
    expected = {"throughput", "roundtrip", "fanout", "syncapi", "idle",
                "scaling", "memory", "profiling"}
    assert set(results["scenarios"]) == expected
    assert report.failed_checks(results) == []
    # Every cross-process scenario measured dmb.
    rows = results["scenarios"]["throughput"]["rows"]["100"]
    assert any(r["layer"] == "dmb" and r["processes"] == 2 for r in rows)
    assert results["scenarios"]["roundtrip"]["rows"][0]["layer"] == "dmb"
    assert report.targets(results)


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("redis-server") is None,
                    reason="needs redis-server")
def test_peers_run_beside_dmb(tmp_path):
    results = run_harness(
        tmp_path, "--only", "throughput,fanout", "--layers", "dmb,redis,pubsub"
    )
    assert results["errors"] == {}
    assert report.failed_checks(results) == []
    layers = {r["layer"] for r in results["scenarios"]["fanout"]["rows"]}
    assert layers == {"dmb", "redis", "pubsub"}
