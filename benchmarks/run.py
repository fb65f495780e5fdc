"""Run dmb's benchmarks, beside its peers, in one run; report the ratios.

    .venv/bin/python -m benchmarks.run            # the full run (~15 min)
    .venv/bin/python -m benchmarks.run --quick    # every scenario, shorter
    .venv/bin/python -m benchmarks.run --only throughput,roundtrip

Starts a private redis-server on 127.0.0.1 (a free port, no persistence)
for the channels_redis layers and stops it at the end.  Writes
``benchmarks/results/<time>.json``, ``benchmarks/results/report.md`` and
the plots in ``docs/img/``; ``--docs`` also refreshes the generated part of
``docs/performance.md``.
"""

import argparse
import datetime
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback

from . import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
IMAGES = os.path.join(ROOT, "docs", "img")

#: Every scenario, in the order a run takes them.
SCENARIOS = (
    "throughput",
    "roundtrip",
    "fanout",
    "syncapi",
    "idle",
    "scaling",
    "ccore",
    "memory",
    "profiling",
)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--quick", action="store_true",
                        help="shorter counts and a 5 s idle window")
    length.add_argument("--smoke", action="store_true",
                        help="tiny counts: checks the harness, measures nothing")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats per measurement (default 3)")
    parser.add_argument("--only", default="",
                        help=f"comma-separated scenarios of: {', '.join(SCENARIOS)}")
    parser.add_argument("--skip", default="", help="comma-separated scenarios to skip")
    parser.add_argument("--layers", default="dmb,redis,pubsub,inmemory",
                        help="comma-separated layers (default: all four)")
    parser.add_argument("--idle-seconds", type=float, default=None,
                        help="length of the idle window (default 30, quick 5)")
    parser.add_argument("--no-redis", action="store_true",
                        help="leave out the channels_redis layers")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    parser.add_argument("--docs", action="store_true",
                        help="rewrite the generated section of docs/performance.md")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="measure nothing: write the report, plots (and "
                             "with --docs the page) from a saved results file")
    parser.add_argument("--out", default=RESULTS, help="where results go")
    parser.add_argument("--images", default=IMAGES, help="where plots go")
    args = parser.parse_args(argv)
    chosen = [s for s in args.only.split(",") if s] or list(SCENARIOS)
    skipped = {s for s in args.skip.split(",") if s}
    for name in list(chosen) + list(skipped):
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; choose from {SCENARIOS}")
    args.scenarios = [s for s in SCENARIOS if s in chosen and s not in skipped]
    args.kinds = [k for k in args.layers.split(",") if k]
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def machine_info(redis):
    def uptime():
        try:
            return subprocess.run(["uptime"], capture_output=True, text=True,
                                  timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    def cpu_model():
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor()

    import channels
    import channels_redis
    import msgpack

    return {
        "python": harness.python_info(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "load_at_start": os.getloadavg(),
        "uptime_at_start": uptime(),
        "redis_server": redis.version if redis else None,
        "channels": channels.__version__,
        "channels_redis": channels_redis.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "_uptime": uptime,
    }


def render(args):
    from . import report

    with open(args.render) as f:
        results = json.load(f)
    images = [] if args.no_plots else report.plots(results, args.images)
    text = report.markdown(results, images, os.path.join(ROOT, "docs"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    if args.docs:
        report.update_docs(text, os.path.join(ROOT, "docs", "performance.md"))
    for line in report.target_lines(results):
        print(line)
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.render:
        return render(args)
    # A SIGTERM unwinds like ^C: redis-server stops, segments are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    started = time.time()
    log_lines = []

    def log(text):
        log_lines.append(text)
        print(text, flush=True)

    redis = None
    wants_redis = not args.no_redis and {"redis", "pubsub"} & set(args.kinds)
    if wants_redis:
        redis = harness.RedisServer()
        log(f"redis-server {redis.version} on 127.0.0.1:{redis.port}")
    backends = harness.Backends(redis.port if redis else None)
    idle = args.idle_seconds
    if idle is None:
        idle = {"full": 30.0, "quick": 5.0, "smoke": 0.5}[mode]
    env = harness.Env(mode, args.repeats, args.kinds, backends, redis, idle, log)
    info = machine_info(redis)
    uptime = info.pop("_uptime")
    results = {
        "mode": mode,
        "repeats": args.repeats,
        "layers": args.kinds,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": info,
        "scenarios": {},
        "errors": {},
    }
    log(f"benchmarks ({mode}, {args.repeats} repeats): {', '.join(args.scenarios)}")
    log(f"load at start: {info['uptime_at_start']}")
    try:
        for name in args.scenarios:
            module = importlib.import_module(f"benchmarks.{name}")
            log(f"== {name}")
            t0 = time.monotonic()
            try:
                results["scenarios"][name] = module.run(env)
            except Exception:
                results["errors"][name] = traceback.format_exc()
                log(results["errors"][name])
            finally:
                backends.cleanup()
            log(f"   ({time.monotonic() - t0:.0f} s)")
    finally:
        if redis is not None:
            redis.stop()
        backends.cleanup()
    results["machine"]["load_at_end"] = os.getloadavg()
    results["machine"]["uptime_at_end"] = uptime()
    results["seconds"] = round(time.time() - started, 1)

    from . import report

    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"{stamp}-{mode}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    images = [] if args.no_plots else report.plots(results, args.images)
    text = report.markdown(results, images, os.path.join(ROOT, "docs"))
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    if args.docs:
        report.update_docs(text, os.path.join(ROOT, "docs", "performance.md"))
    log(f"results: {path}")
    log(f"report: {os.path.join(args.out, 'report.md')}")
    summary = report.target_lines(results)
    for line in summary:
        log(line)
    failed = report.failed_checks(results)
    if failed:
        log("lost or reordered messages in: " + "; ".join(failed))
    if results["errors"]:
        log("scenarios that failed: " + ", ".join(results["errors"]))
    # A peer's loss is a finding to report; dmb's, or a broken run, fails.
    ours = report.failed_checks(results, dmb_only=True)
    return 1 if ours or results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
