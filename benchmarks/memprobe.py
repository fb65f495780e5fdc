"""Print this interpreter's RSS at each step of importing dmb and attaching.

    python -m benchmarks.memprobe attach|bare PREFIX SIZE

``attach`` imports channels.layers first (any Channels process has it);
``bare`` goes straight to ``import dmb``.  The last line of output is a
JSON list of [step, {VmRSS, RssAnon, RssFile, RssShmem}] in KiB.

Run by benchmarks/memory.py; kept free of other benchmark imports so the
numbers are dmb's alone.
"""

import sys

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def rss():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in FIELDS:
                out[key] = int(value.split()[0])
    return out


def main():
    mode, prefix, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    steps = [("start", rss())]
    if mode == "attach":
        import channels.layers  # noqa: F401 (what any Channels process has)

        steps.append(("import channels.layers", rss()))
    import dmb

    steps.append(("import dmb", rss()))
    layer = dmb.SharedMemoryChannelLayer(prefix=prefix, size=size)
    steps.append(("attached", rss()))
    import asyncio

    async def one():
        await layer.send("bench.memprobe", {"type": "probe"})
        return await layer.receive("bench.memprobe")

    asyncio.run(one())
    steps.append(("one send and receive", rss()))
    layer.close_sync()
    import json

    print(json.dumps(steps))


if __name__ == "__main__":
    main()
