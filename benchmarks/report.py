"""Turn one run's results into Markdown tables, target ratios and plots."""

import os

BEGIN = "<!-- benchmarks:begin (python -m benchmarks.run --docs rewrites this) -->"
END = "<!-- benchmarks:end -->"


# Small helpers.


def _med(summary_):
    return summary_["median"] if summary_ else None


def _spread(summary_, fmt, scale=1.0):
    """median (min-max), formatted."""
    if not summary_:
        return "n/a"
    lo, mid, hi = (summary_[k] * scale for k in ("min", "median", "max"))
    return f"{fmt(mid)} ({fmt(lo)}–{fmt(hi)})"


def _rate(v):
    return f"{v:,.0f}"


def _us(v):
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def _ns(v):
    return f"{v:,.0f}"


def _check(check):
    if not check:
        return "–"
    if check["lost"] == 0 and check["reordered"] == 0:
        return f"ok ({check['received']:,})"
    return f"**lost {check['lost']:,}, reordered {check['reordered']:,}**"


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |",
           "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _find(rows, **match):
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def _ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return a / b


def _size_label(size):
    if size >= 1024 * 1024 and size % (1024 * 1024) == 0:
        return f"{size // (1024 * 1024)} MiB"
    if size >= 1024 and size % 1024 == 0:
        return f"{size // 1024} KiB"
    if size >= 1000 and size % 1000 == 0:
        return f"{size // 1000} kB" if size < 1_000_000 else f"{size // 1_000_000} MB"
    return f"{size} B"


# Targets.


def targets(results):
    """Each target: what, the measured ratio or value, the goal, met or not."""
    sc = results.get("scenarios", {})
    out = []

    def add(name, value, goal, ok, note=""):
        out.append({"target": name, "value": value, "goal": goal,
                    "met": ok if value is not None else None, "note": note})

    tp = sc.get("throughput")
    if tp:
        rows = tp["rows"].get("100", [])
        dmb2 = _med((_find(rows, layer="dmb", processes=2) or {}).get("rate"))
        core = _med((_find(rows, layer="redis") or {}).get("rate"))
        mem = _med((_find(rows, layer="inmemory") or {}).get("rate"))
        r = _ratio(dmb2, core)
        add("throughput 100 B, 2 processes vs channels_redis core", r, "≥ 20×",
            r is not None and r >= 20)
        r = _ratio(dmb2, mem)
        add("throughput 100 B, 2 processes vs InMemory (1 process)", r, "≥ 0.5×",
            r is not None and r >= 0.5)
    rt = sc.get("roundtrip")
    if rt:
        rows = rt["rows"]
        dmb = _find(rows, layer="dmb") or {}
        core = _find(rows, layer="redis") or {}
        pipe = _find(rows, layer="pipe") or {}
        r = _ratio(_med(dmb.get("p50")), _med(core.get("p50")))
        add("round trip p50 vs channels_redis core", r, "≤ 1/15 (0.067×)",
            r is not None and r <= 1 / 15)
        r = _ratio(_med(dmb.get("p50")), _med(pipe.get("p50")))
        add("round trip p50 vs bare pipe", r, "≤ 2×", r is not None and r <= 2)
        r = _ratio(_med(dmb.get("p99")), _med(core.get("p99")))
        add("round trip p99 vs channels_redis core", r, "≤ 1/10 (0.1×)",
            r is not None and r <= 0.1)
    fo = sc.get("fanout")
    if fo:
        for members in sorted({row["members"] for row in fo["rows"]}):
            dmb = _med((_find(fo["rows"], layer="dmb", members=members) or {})
                       .get("deliveries_per_s"))
            core = _med((_find(fo["rows"], layer="redis", members=members) or {})
                        .get("deliveries_per_s"))
            pubsub = _med((_find(fo["rows"], layer="pubsub", members=members)
                           or {}).get("deliveries_per_s"))
            r = _ratio(dmb, core)
            add(f"fan-out {members:,} members vs channels_redis core", r, "≥ 10×",
                r is not None and r >= 10)
            r = _ratio(dmb, pubsub)
            add(f"fan-out {members:,} members vs channels_redis pubsub", r, "≥ 1×",
                r is not None and r >= 1)
    sy = sc.get("syncapi")
    if sy:
        dmb = _find(sy["rows"], layer="dmb") or {}
        core = _find(sy["rows"], layer="redis") or {}
        r = _med(dmb.get("ratio_to_empty"))
        add("async_to_sync(group_send) vs empty async_to_sync", r, "≥ 0.8×",
            r is not None and r >= 0.8)
        r = _ratio(_med(dmb.get("native_group_send_sync_per_s")),
                   _med(core.get("async_to_sync_group_send_per_s")))
        add("native group_send_sync vs channels_redis core's async_to_sync", r,
            "≥ 50×", r is not None and r >= 50)
    sl = sc.get("scaling")
    if sl:
        rows = sl["channels"]["rows"]
        costs = [_med(row["random_us"]) for row in rows]
        ones = [_med(row["one_us"]) for row in rows]
        plain = [_med(row.get("random_nocache_us")) for row in rows]
        if costs:
            r = max(costs) / min(costs)
            note = f"one busy channel among them: {max(ones) / min(ones):.2f}×"
            if all(plain):
                note += f"; name cache off: {max(plain) / min(plain):.2f}×"
            add(f"send+receive cost, {rows[0]['channels']:,} → "
                f"{rows[-1]['channels']:,} channels (random channel)",
                r, "≤ 1.25× (flat within 25 %)", r <= 1.25, note)
        grows = sl["groups"]["rows"]
        if len(grows) >= 2:
            big, small = grows[-1], grows[-3] if len(grows) >= 3 else grows[0]
            factor = big["members"] / small["members"]
            r = _med(big["per_call_us"]) / _med(small["per_call_us"]) / factor
            add(f"group_send linear in members ({small['members']:,} → "
                f"{big['members']:,}: cost ratio / member ratio)", r,
                "≈ 1× (0.8–1.25)", 0.8 <= r <= 1.25,
                f"fit: {_linear_fit_note(grows)}")
    idle = sc.get("idle")
    if idle:
        dmb = _find(idle["rows"], layer="dmb")
        if dmb:
            v = _med(dmb["cpu_seconds"])
            add(f"idle CPU, 4 processes, 1,000 receives, {idle['seconds']:.0f} s",
                v, "0.00 s", round(v, 2) == 0.0)
    mem = sc.get("memory")
    if mem:
        seg = mem["segment"]
        v = seg["bytes_per_channel_entry"]
        add("segment bytes per idle channel", v, "≤ 256 B",
            v <= 256 and mem["idle_channels_use_no_store"])
        v = seg["bytes_per_membership_entry"]
        add("segment bytes per group membership", v, "≤ 256 B", v <= 256)
        v = _med(mem["rss_added_kib"].get("attach"))
        add("RSS added by import dmb + attach (channels already imported)",
            v and v * 1024 / 1e6, "≤ 5 MB", v is not None and v * 1024 <= 5e6,
            "MB = 10^6 bytes")
    return out


def _linear_fit_note(rows):
    xs = [row["members"] for row in rows]
    ys = [_med(row["per_call_us"]) for row in rows]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1 - ss_res / ss_tot if ss_tot else 1.0
    return f"{a:.1f} us + {b * 1000:.0f} ns × members, R² {r2:.3f}"


def _format_value(t):
    v = t["value"]
    if v is None:
        return "n/a"
    if "RSS" in t["target"]:
        return f"{v:.2f} MB"
    if "bytes" in t["target"]:
        return f"{v:.0f} B"
    if "idle CPU" in t["target"]:
        return f"{v:.4f} s"
    if v < 0.2:
        return f"{v:.3f}× (1/{1 / v:.0f})" if v else "0"
    return f"{v:,.2f}×"


def target_lines(results):
    lines = []
    for t in targets(results):
        mark = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        lines.append(f"  [{mark:>6}] {t['target']}: {_format_value(t)} "
                     f"(target {t['goal']})")
    return lines


def failed_checks(results, dmb_only=False):
    """Where messages were lost or reordered: "scenario layer" strings.

    A check outside any layer's row (scaling, the C core, memory) is dmb's.
    ``dmb_only`` leaves out the peers' rows.
    """
    failed = []

    def visit(name, value):
        if isinstance(value, dict):
            check = value.get("check")
            if isinstance(check, dict) and (check.get("lost") or
                                            check.get("reordered")):
                layer = value.get("layer", "dmb")
                if not dmb_only or layer == "dmb":
                    label = value.get("label") or layer
                    failed.append(f"{name} {label}")
            for key, item in value.items():
                if key != "check":
                    visit(name, item)
        elif isinstance(value, list):
            for item in value:
                visit(name, item)

    for name, value in results.get("scenarios", {}).items():
        visit(name, value)
    return failed


# Markdown.


def markdown(results, images, docs_dir, image_base="img"):
    sc = results.get("scenarios", {})
    m = results["machine"]
    out = []
    out.append(
        f"Run: `{results['mode']}`, {results['repeats']} repeats, started "
        f"{results['started']}, {results['seconds']:.0f} s.  "
        f"{m['cpus']} CPUs ({m['cpu']}), Python {m['python'].split()[0]}, "
        f"channels {m['channels']}, channels_redis {m['channels_redis']}, "
        f"msgpack {m['msgpack']}, redis-server {m['redis_server']}."
    )
    out.append("")
    out.append(f"Load at start: `{m['uptime_at_start']}`  ")
    out.append(f"Load at end: `{m.get('uptime_at_end')}`")
    out.append("")
    out.append("Every cell is the median of the repeats, with (min–max).")
    out.append("")
    out.append("### Targets")
    out.append("")
    rows = []
    for t in targets(results):
        mark = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        rows.append([t["target"], _format_value(t), t["goal"], mark, t["note"]])
    out.append(_table(["target", "measured", "goal", "", "note"], rows))
    out.append("")
    failed = failed_checks(results)
    out.append(
        "Loss and order checks: "
        + ("every message of every scenario arrived, in order." if not failed
           else "**failed in: " + "; ".join(failed) + "**")
    )
    out.append("")
    for name, text in results.get("errors", {}).items():
        out.append(f"**Scenario {name} failed:**\n\n```\n{text}\n```\n")
    for section in (_throughput, _roundtrip, _fanout, _syncapi, _idle, _scaling,
                    _ccore, _memory, _profiling):
        text = section(sc, images, image_base)
        if text:
            out.append(text)
            out.append("")
    return _wrap("\n".join(out)).rstrip() + "\n"


def _wrap(text, width=88):
    """Wrap prose lines; leave tables, images and code blocks alone."""
    import textwrap

    out, code = [], False
    for line in text.split("\n"):
        if line.startswith("```"):
            code = not code
        if code or len(line) <= width or line.startswith(("|", "!", "```")):
            out.append(line)
            continue
        tail = "  " if line.endswith("  ") else ""
        wrapped = textwrap.wrap(line, width, break_on_hyphens=False)
        wrapped[-1] += tail
        out.extend(wrapped)
    return "\n".join(out)


def _img(images, key, base, alt):
    if key in images:
        return f"\n![{alt}]({base}/{os.path.basename(images[key])})\n"
    return ""


def _throughput(sc, images, base):
    tp = sc.get("throughput")
    if not tp:
        return ""
    out = ["### Throughput (messages/s)", ""]
    header = ["layer", "processes"] + [_size_label(s) for s in tp["sizes"]] + ["checks"]
    labels = []
    for size in tp["sizes"]:
        for row in tp["rows"][str(size)]:
            key = (row["label"], row["processes"])
            if key not in labels:
                labels.append(key)
    rows = []
    for label, procs in labels:
        cells = [label, procs]
        checks = []
        for size in tp["sizes"]:
            row = _find(tp["rows"][str(size)], label=label, processes=procs)
            cells.append(_spread(row and row["rate"], _rate))
            if row:
                checks.append(row["check"])
        total = {k: sum(c[k] for c in checks) for k in ("received", "lost",
                                                         "reordered")}
        cells.append(_check(total))
        rows.append(cells)
    out.append(_table(header, rows))
    out.append("")
    mb = []
    for label, procs in labels:
        cells = [label, procs]
        for size in tp["sizes"]:
            row = _find(tp["rows"][str(size)], label=label, processes=procs)
            v = row and row["mb_per_s"] and row["mb_per_s"]["median"]
            cells.append(f"{v:,.0f}" if v else "n/a")
        mb.append(cells)
    out.append("Payload MB/s (medians):")
    out.append("")
    out.append(_table(["layer", "processes"] +
                      [_size_label(s) for s in tp["sizes"]], mb))
    out.append(_img(images, "throughput", base, "throughput"))
    return "\n".join(out)


def _roundtrip(sc, images, base):
    rt = sc.get("roundtrip")
    if not rt:
        return ""
    out = [f"### Round trip ({rt['size']} B, µs; {rt['count']:,} timed trips "
           f"per repeat)", ""]
    rows = []
    for row in rt["rows"]:
        rows.append([
            row["label"], row["processes"],
            _spread(row["p50"], _us, 1e-3), _spread(row["p99"], _us, 1e-3),
            _spread(row["p99.9"], _us, 1e-3),
            _spread(row.get("cpu_us_per_trip"), _us), _check(row["check"]),
        ])
    out.append(_table(["layer", "processes", "p50", "p99", "p99.9",
                       "CPU per trip, both sides", "checks"], rows))
    paired = rt.get("paired")
    if paired:
        out.append("")
        out.append("Layers take turns within each repeat; the same ratios "
                   "taken repeat by repeat (median, min–max): " + ", ".join(
                       f"{key} {_spread(v, lambda x: f'{x:.3f}')}"
                       for key, v in paired.items()) + ".")
    out.append(_img(images, "roundtrip", base, "round trip"))
    return "\n".join(out)


def _fanout(sc, images, base):
    fo = sc.get("fanout")
    if not fo:
        return ""
    out = ["### Group fan-out (deliveries/s)", ""]
    rows = []
    for row in fo["rows"]:
        rows.append([
            f"{row['members']:,}", row["label"], row["processes"],
            f"{row['count']:,}", _spread(row["deliveries_per_s"], _rate),
            _spread(row.get("group_sends_per_s"), _rate), _check(row["check"]),
        ])
    out.append(_table(["members", "layer", "member processes", "group_sends",
                       "deliveries/s", "group_send calls/s (sender)", "checks"],
                      rows))
    out.append(_img(images, "fanout", base, "fan-out"))
    return "\n".join(out)


def _syncapi(sc, images, base):
    sy = sc.get("syncapi")
    if not sy:
        return ""
    out = ["### group_send from sync code (calls/s)", ""]
    rows = []
    for row in sy["rows"]:
        rows.append([
            row["label"], _spread(row["empty_async_to_sync_per_s"], _rate),
            _spread(row["async_to_sync_group_send_per_s"], _rate),
            _spread(row["ratio_to_empty"], lambda v: f"{v:.2f}×"),
            _spread(row["native_group_send_sync_per_s"], _rate),
            _check(row["check"]),
        ])
    out.append(_table(["layer", "empty async_to_sync", "async_to_sync(group_send)",
                       "ratio", "native group_send_sync", "checks"], rows))
    return "\n".join(out)


def _idle(sc, images, base):
    idle = sc.get("idle")
    if not idle:
        return ""
    out = [f"### Idle cost: CPU seconds over {idle['seconds']:.0f} s", ""]
    out.append("Read from outside the processes (`/proc/<pid>/schedstat`, "
               "every thread), over one window in which every layer idles.")
    out.append("")
    rows = []
    for row in idle["rows"]:
        cpu = row["cpu_seconds"]
        rows.append([
            row["label"], row["processes"], f"{row['receives']:,}",
            _spread(cpu, lambda v: f"{v:.4f}"),
            f"{cpu['median'] / row['processes']:.4f}",
            _check(row["check"]) + (" " + "; ".join(row["errors"])
                                    if row.get("errors") else ""),
        ])
    out.append(_table(["layer", "processes", "waiting receives",
                       "CPU s (all processes)", "per process", "checks"], rows))
    return "\n".join(out)


def _scaling(sc, images, base):
    sl = sc.get("scaling")
    if not sl:
        return ""
    out = ["### dmb scaling", ""]
    out.append("Send+receive pair (µs) with N channels in the segment:")
    out.append("")
    core = {}
    cc = sc.get("ccore")
    if cc:
        loop = {r["channels"]: _med(r["ns"]) for r in cc["rows"]
                if r["bench"] == "channels_loop"}
        for r in cc["rows"]:
            if r["bench"] == "channels":
                core[r["channels"]] = _med(r["ns"]) - loop.get(r["channels"], 0)
    rows = []
    for row in sl["channels"]["rows"]:
        n = row["channels"]
        rows.append([f"{n:,}", _spread(row["random_us"], _us),
                     _spread(row.get("random_nocache_us"), _us),
                     _spread(row["one_us"], _us),
                     f"{core[n]:,.0f}" if n in core else ""])
    out.append(_table(["channels", "random channel", "random, name cache off",
                       "one channel", "C core alone, random (ns)"], rows))
    out.append(_img(images, "scaling_channels", base, "channels"))
    out.append("group_send by group size:")
    out.append("")
    rows = [[f"{r['members']:,}", _spread(r["per_call_us"], _us),
             _spread(r["per_delivery_ns"], _ns)] for r in sl["groups"]["rows"]]
    out.append(_table(["members", "µs per group_send", "ns per member"], rows))
    out.append("")
    out.append(f"Linear fit: {_linear_fit_note(sl['groups']['rows'])}.")
    out.append(_img(images, "scaling_groups", base, "group size"))
    out.append("Processes, each doing send+receive pairs on its own channel at "
               "once:")
    out.append("")
    rows = [[r["processes"], _spread(r["pairs_per_s"], _rate),
             _spread(r["cpu_us_per_pair"], lambda v: f"{v:.2f}"),
             _spread(r["wall_us_per_pair_per_process"], _us)]
            for r in sl["processes"]["rows"]]
    out.append(_table(["processes", "pairs/s, all", "CPU µs per pair",
                       "wall µs per pair, each process"], rows))
    out.append(_img(images, "scaling_processes", base, "processes"))
    out.append("Message size (one process, send+receive pair):")
    out.append("")
    rows = [[_size_label(r["size"]), _spread(r["per_pair_us"], _us),
             _spread(r["mb_per_s"], lambda v: f"{v:,.0f}")]
            for r in sl["sizes"]["rows"]]
    out.append(_table(["size", "µs per pair", "MB/s"], rows))
    out.append(_img(images, "scaling_sizes", base, "message size"))
    checks = [sl[k]["check"] for k in ("channels", "groups", "sizes", "processes")]
    out.append("Checks: " + ", ".join(_check(c) for c in checks) + ".")
    return "\n".join(out)


def _ccore(sc, images, base):
    cc = sc.get("ccore")
    if not cc:
        return ""
    out = ["### The C core alone (ns)", ""]
    by = {}
    for r in cc["rows"]:
        if r["channels"] == 1:
            by.setdefault(r["size"], {})[r["bench"]] = r["ns"]
    rows = []
    for size in sorted(by):
        b = by[size]
        rows.append([_size_label(size), _spread(b.get("memcpy"), _ns),
                     _spread(b.get("pair"), _ns), _spread(b.get("stream"), _ns),
                     _spread(b.get("pingpong"), _ns)])
    out.append(_table(["size", "memcpy in and out", "send+receive, 1 process",
                       "per message, 2 processes (stream)",
                       "round trip, 2 processes (spinning)"], rows))
    out.append("")
    out.append("Checks: " + _check(cc["check"]).replace("ok (0)", "ok") + ".")
    out.append(_img(images, "core", base, "C core"))
    return "\n".join(out)


def _memory(sc, images, base):
    mem = sc.get("memory")
    if not mem:
        return ""
    seg = mem["segment"]
    out = ["### Memory", ""]
    out.append(
        f"Segment of {seg['size'] / 2**20:.0f} MiB: "
        f"{seg['geometry']['channels']:,} channels, "
        f"{seg['geometry']['groups']:,} groups, "
        f"{seg['geometry']['members']:,} memberships, "
        f"{seg['geometry']['nodes']:,} queue entries, "
        f"{seg['geometry']['blocks']:,} blocks."
    )
    out.append("")
    rows = [
        ["idle channel (entry + bucket + mark)",
         f"{seg['bytes_per_channel_entry']:.0f}"],
        ["group membership (entry + bucket + mark)",
         f"{seg['bytes_per_membership_entry']:.0f}"],
        ["group (entry + bucket + mark)", f"{seg['bytes_per_group_entry']:.0f}"],
        ["whole segment / channels it holds",
         f"{seg['segment_per_channel_of_size']:.0f}"],
    ]
    out.append(_table(["segment bytes per", "B"], rows))
    out.append("")
    b, i, mm = (seg["usage_before"], seg["usage_idle_channels"],
                seg["usage_memberships"])
    out.append(
        f"1,000 idle channels (waiting receives) took {i['channels'] - b['channels']:,}"
        f" channel entries, {i['nodes'] - b['nodes']} queue entries and "
        f"{i['blocks'] - b['blocks']} blocks; 1,000 memberships took "
        f"{mm['members'] - i['members']:,} membership entries and "
        f"{mm['groups'] - i['groups']} group."
    )
    out.append("")
    out.append("Resident memory (KiB) of a fresh interpreter, step by step:")
    out.append("")
    for mode, title in (("attach", "channels.layers first, then dmb, attaching "
                                   "to an existing segment"),
                        ("bare", "dmb into a bare interpreter"),
                        ("create", "the process that creates the segment")):
        steps = mem["rss"].get(mode)
        if not steps:
            continue
        rows = [[s["step"], _ns(_med(s["VmRSS"])), _ns(_med(s["RssAnon"])),
                 _ns(_med(s["RssFile"])), _ns(_med(s["RssShmem"]))] for s in steps]
        out.append(f"*{title}*; added by `import dmb` + attach: "
                   f"{_med(mem['rss_added_kib'][mode]):,.0f} KiB")
        out.append("")
        out.append(_table(["step", "VmRSS", "RssAnon", "RssFile", "RssShmem"],
                          rows))
        out.append("")
    return "\n".join(out)


def _profiling(sc, images, base):
    pr = sc.get("profiling")
    if not pr:
        return ""
    out = ["### Where the time goes (one process, µs per call)", ""]
    rows = []
    for section, parts in pr["parts_us"].items():
        for label, us in parts:
            rows.append([section, label, f"{us:.2f}"])
    out.append(_table(["call", "part", "µs"], rows))
    out.append("")
    for name, prof in pr["profiles"].items():
        out.append(f"cProfile, `{name}` (top by own time, "
                   f"{prof['total_s']:.2f} s in all):")
        out.append("")
        out.append("```\n" + _trim_profile(prof["text"]) + "\n```")
        out.append("")
    rt = sc.get("roundtrip")
    if rt and rt.get("dmb_echo_profile"):
        out.append("cProfile of the echo process in the dmb round trip (a "
                   "receive that waits, woken by another process):")
        out.append("")
        out.append("```\n" + _trim_profile(rt["dmb_echo_profile"]) + "\n```")
    return "\n".join(out)


def _trim_profile(text):
    from .profiling import _trim

    return _trim(text)


def update_docs(text, path):
    """Replace the generated section of docs/performance.md with ``text``."""
    with open(path) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        raise RuntimeError(f"{path} has no {BEGIN!r} ... {END!r} section")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(head + BEGIN + "\n\n" + text.strip() + "\n\n" + END + tail)


# Plots.


def plots(results, directory):
    """Write the PNGs; returns {key: path}."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return {}
    os.makedirs(directory, exist_ok=True)
    sc = results.get("scenarios", {})
    made = {}

    def save(fig, key):
        path = os.path.join(directory, f"{key}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made[key] = path

    def errbar(summaries):
        mids = [_med(s) or 0 for s in summaries]
        lo = [m - (s["min"] if s else 0) for m, s in zip(mids, summaries)]
        hi = [(s["max"] if s else 0) - m for m, s in zip(mids, summaries)]
        return mids, [lo, hi]

    tp = sc.get("throughput")
    if tp:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        labels = []
        for size in tp["sizes"]:
            for row in tp["rows"][str(size)]:
                key = (row["label"], row["processes"])
                if key not in labels:
                    labels.append(key)
        width = 0.8 / max(1, len(labels))
        for i, (label, procs) in enumerate(labels):
            rows = [_find(tp["rows"][str(s)], label=label, processes=procs)
                    for s in tp["sizes"]]
            mids, err = errbar([r and r["rate"] for r in rows])
            xs = [k + i * width for k in range(len(tp["sizes"]))]
            ax.bar(xs, mids, width, yerr=err, label=f"{label} ({procs} proc)")
        ax.set_xticks([k + width * (len(labels) - 1) / 2
                       for k in range(len(tp["sizes"]))])
        ax.set_xticklabels([_size_label(s) for s in tp["sizes"]])
        ax.set_yscale("log")
        ax.set_ylabel("messages/s")
        ax.set_title("Throughput, sender to receiver")
        ax.legend(fontsize=7, ncol=3, loc="upper center",
                  bbox_to_anchor=(0.5, -0.08))
        save(fig, "throughput")
    rt = sc.get("roundtrip")
    if rt:
        fig, ax = plt.subplots(figsize=(8, 4))
        keys = ("p50", "p99", "p99.9")
        width = 0.8 / len(rt["rows"])
        for i, row in enumerate(rt["rows"]):
            mids, err = errbar([row[k] for k in keys])
            xs = [k + i * width for k in range(len(keys))]
            ax.bar(xs, [m / 1000 for m in mids], width,
                   yerr=[[e / 1000 for e in side] for side in err],
                   label=f"{row['label']} ({row['processes']} proc)")
        ax.set_xticks([k + width * (len(rt["rows"]) - 1) / 2
                       for k in range(len(keys))])
        ax.set_xticklabels(keys)
        ax.set_yscale("log")
        ax.set_ylabel("µs")
        ax.set_title(f"Round trip, {rt['size']} B")
        ax.legend(fontsize=7, ncol=3, loc="upper center",
                  bbox_to_anchor=(0.5, -0.08))
        save(fig, "roundtrip")
    fo = sc.get("fanout")
    if fo:
        fig, ax = plt.subplots(figsize=(7, 4))
        configs = sorted({r["members"] for r in fo["rows"]})
        labels = []
        for r in fo["rows"]:
            if r["label"] not in labels:
                labels.append(r["label"])
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            rows = [_find(fo["rows"], label=label, members=m) for m in configs]
            mids, err = errbar([r and r["deliveries_per_s"] for r in rows])
            xs = [k + i * width for k in range(len(configs))]
            ax.bar(xs, mids, width, yerr=err, label=label)
        ax.set_xticks([k + width * (len(labels) - 1) / 2
                       for k in range(len(configs))])
        ax.set_xticklabels([f"{m:,} members" for m in configs])
        ax.set_yscale("log")
        ax.set_ylabel("deliveries/s")
        ax.set_title("Group fan-out")
        ax.legend(fontsize=7, ncol=2, loc="upper center",
                  bbox_to_anchor=(0.5, -0.08))
        save(fig, "fanout")
    sl = sc.get("scaling")
    if sl:
        rows = sl["channels"]["rows"]
        fig, ax = plt.subplots(figsize=(6.5, 4))
        xs = [r["channels"] for r in rows]
        for key, label in (("random_us", "random channel of N"),
                           ("random_nocache_us", "random, name cache off"),
                           ("one_us", "one channel, N-1 others queued")):
            if not all(r.get(key) for r in rows):
                continue
            mids, err = errbar([r[key] for r in rows])
            ax.errorbar(xs, mids, yerr=err, marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("channels in the segment")
        ax.set_ylabel("µs per send+receive")
        ax.set_title("dmb: cost per operation as channels grow")
        ax.legend(fontsize=8)
        save(fig, "scaling_channels")
        rows = sl["groups"]["rows"]
        fig, ax = plt.subplots(figsize=(6.5, 4))
        xs = [r["members"] for r in rows]
        mids, err = errbar([r["per_call_us"] for r in rows])
        ax.errorbar(xs, mids, yerr=err, marker="o", capsize=3, label="group_send")
        per = mids[-1] / xs[-1]
        ax.plot(xs, [max(mids[0], per * x) for x in xs], "--", color="grey",
                label="linear through the largest")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("members")
        ax.set_ylabel("µs per group_send")
        ax.set_title("dmb: group_send by group size")
        ax.legend(fontsize=8)
        save(fig, "scaling_groups")
        rows = sl["processes"]["rows"]
        fig, ax = plt.subplots(figsize=(6.5, 4))
        xs = [r["processes"] for r in rows]
        mids, err = errbar([r["pairs_per_s"] for r in rows])
        ax.errorbar(xs, mids, yerr=err, marker="o", capsize=3,
                    label="pairs/s, all processes")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("processes")
        ax.set_ylabel("send+receive pairs/s")
        ax.set_ylim(bottom=0)
        ax2 = ax.twinx()
        mids, err = errbar([r["cpu_us_per_pair"] for r in rows])
        ax2.errorbar(xs, mids, yerr=err, marker="s", capsize=3, color="C1",
                     label="CPU µs per pair")
        ax2.set_ylabel("CPU µs per pair")
        ax2.set_ylim(bottom=0)
        ax.set_title(f"dmb: processes ({os.cpu_count()} CPUs)")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8,
                  loc="lower right")
        save(fig, "scaling_processes")
        rows = sl["sizes"]["rows"]
        fig, ax = plt.subplots(figsize=(6.5, 4))
        xs = [r["size"] for r in rows]
        mids, err = errbar([r["per_pair_us"] for r in rows])
        ax.errorbar(xs, mids, yerr=err, marker="o", capsize=3,
                    label="µs per pair")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("µs per send+receive")
        ax2 = ax.twinx()
        ax2.plot(xs, [_med(r["mb_per_s"]) for r in rows], "s--", color="C1",
                 label="MB/s")
        ax2.set_xscale("log")
        ax2.set_ylabel("MB/s")
        ax.set_title("dmb: message size")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8)
        save(fig, "scaling_sizes")
    cc = sc.get("ccore")
    if cc:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for bench, label in (("memcpy", "memcpy in and out"),
                             ("pair", "send+receive, 1 process"),
                             ("stream", "per message, 2 processes")):
            rows = sorted((r for r in cc["rows"]
                           if r["bench"] == bench and r["channels"] == 1),
                          key=lambda r: r["size"])
            if rows:
                mids, err = errbar([r["ns"] for r in rows])
                ax.errorbar([r["size"] for r in rows], mids, yerr=err,
                            marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("ns")
        ax.set_title("The C core alone")
        ax.legend(fontsize=8)
        save(fig, "core")
    return made
