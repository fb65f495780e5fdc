"""The C core alone: build benchmarks/c/bench_core with CMake and run it.

The program reports nanoseconds per send+receive pair in one process and
across two (spinning, no wake-ups), beside a plain memcpy of the same
bytes; see its header comment.  It is built in ``build/bench`` (Release)
with the ``DMB_BENCH`` option of the top-level CMakeLists.txt.
"""

import json
import os
import shutil
import subprocess

from .stats import summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build", "bench")


def build(build_dir=BUILD):
    cmake = shutil.which("cmake")
    if not cmake:
        raise RuntimeError("cmake not found: the C benchmark needs it")
    subprocess.run(
        [cmake, "-S", ROOT, "-B", build_dir, "-DDMB_BENCH=ON",
         "-DCMAKE_BUILD_TYPE=Release"],
        check=True, stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        [cmake, "--build", build_dir, "--target", "bench_core"],
        check=True, stdout=subprocess.DEVNULL,
    )
    return os.path.join(build_dir, "bench_core")


def run_once(program, quick):
    out = subprocess.run(
        [program] + (["--quick"] if quick else []),
        check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def run(env):
    program = build()
    runs = [run_once(program, env.mode != "full") for _ in range(env.repeats)]
    table = {}
    errors = 0
    for rows in runs:
        for row in rows:
            key = (row["bench"], row["size"], row["channels"])
            table.setdefault(key, []).append(row["ns_per_op"])
            errors += row["errors"]
    rows = [
        {"bench": bench, "size": size, "channels": channels, "ns": summary(values)}
        for (bench, size, channels), values in table.items()
    ]
    for row in rows:
        if row["bench"] != "channels_loop":
            env.log(
                f"  core {row['bench']:<9} {row['size']:>7} B "
                f"{row['channels']:>7} ch: {row['ns']['median']:10.1f} ns"
            )
    env.log(f"  core checks: {errors} messages lost or out of order")
    return {
        "rows": rows,
        "check": {"sent": 0, "received": 0, "lost": errors, "reordered": 0},
    }
