"""Run channels_redis's own test suite against dmb.

Steps, all inside a temporary directory (nothing is written to the
repository):

1. ``pip download`` the source distribution of the installed channels_redis
   version.
2. Extract its ``tests/`` directory.
3. Put dmb_swap_conftest.py beside those tests as their conftest.py, so
   every layer they build is a dmb.SharedMemoryChannelLayer.
4. Run them with pytest and compare the failures with EXPECTED_FAILURES.

Exit status: 0 when every failing test is listed in EXPECTED_FAILURES,
1 when some other test failed, 3 when the source could not be fetched or
the suite could not be run at all.

    python tests/upstream/run_channels_redis_suite.py [--json PATH] [--keep]
        [-- extra pytest arguments]
"""

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SWAP_CONFTEST = os.path.join(HERE, "dmb_swap_conftest.py")

# Upstream test modules that exercise no channel layer at all: they test
# channels_redis's own helper modules, so running them says nothing of dmb.
NOT_LAYER_TESTS = {
    "test_serializers.py": "tests channels_redis.serializers directly",
    "test_utils.py": "tests channels_redis.utils (Redis shard hashing) directly",
}

_PUBSUB_SHARED = {
    "test_loop_instance_channel_layer_reference": (
        "reads _get_layer(), the per-event-loop inner layer of the Redis "
        "pub/sub implementation"
    ),
    "test_serialize": (
        "calls layer.serialize() and compares the bytes of channels_redis's "
        "msgpack serializer"
    ),
    "test_deserialize": "calls layer.deserialize(), channels_redis's serializer",
    "test_multi_event_loop_garbage_collection": (
        "counts _layers, the per-event-loop Redis connection holders"
    ),
    "test_auto_reconnect": (
        "closes the Redis connection of _shards[0] and checks that the "
        "pub/sub layer reconnects and resubscribes"
    ),
}

_CORE_SHARED = {
    "test_random_reset__client_prefix": (
        "compares client_prefix, the attribute in which channels_redis "
        "keeps the client part of its specific channel names"
    ),
    "test_default_group_key_format": "calls _group_key(), the Redis key of a group",
    "test_custom_group_key_format": "calls _group_key(), the Redis key of a group",
    "test_receive_buffer_respects_capacity": (
        "fills receive_buffer, channels_redis's in-process buffer of "
        "messages read from Redis"
    ),
}

# Upstream test (module::name) -> why it cannot pass on dmb. Each entry is
# also explained in docs/compatibility.md.
EXPECTED_FAILURES = {
    **{f"test_core.py::{name}": why for name, why in _CORE_SHARED.items()},
    **{f"test_sentinel.py::{name}": why for name, why in _CORE_SHARED.items()},
    "test_sentinel.py::test_serialize": (
        "calls layer.serialize() and compares the bytes of channels_redis's "
        "msgpack serializer"
    ),
    "test_sentinel.py::test_deserialize": (
        "calls layer.deserialize(), channels_redis's serializer"
    ),
    **{f"test_pubsub.py::{name}": why for name, why in _PUBSUB_SHARED.items()},
    **{f"test_pubsub_sentinel.py::{name}": why for name, why in _PUBSUB_SHARED.items()},
    "test_pubsub.py::test_receive_on_non_owned_general_channel": (
        "sends a str, not a dict; the pub/sub layer checks nothing, while "
        "dmb (like RedisChannelLayer) refuses a message that is not a dict"
    ),
}


def installed_version():
    return importlib.metadata.version("channels_redis")


def fetch_sdist(version, directory):
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--quiet",
        "--dest",
        directory,
        f"channels_redis=={version}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    archives = [
        name for name in os.listdir(directory) if name.endswith((".tar.gz", ".zip"))
    ]
    if result.returncode != 0 or not archives:
        raise RuntimeError("pip download failed:\n" + result.stdout + result.stderr)
    return os.path.join(directory, archives[0])


def extract_tests(archive, destination):
    """Extract the sdist's tests/ directory to destination/tests."""
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) >= 3 and parts[1] == "tests" and member.isfile():
                member.name = "/".join(parts[1:])
                members.append(member)
        if not members:
            raise RuntimeError(f"{archive} has no tests/ directory")
        tar.extractall(destination, members=members, filter="data")
    return os.path.join(destination, "tests")


def prepare_suite(tests_dir):
    shutil.copyfile(SWAP_CONFTEST, os.path.join(tests_dir, "conftest.py"))
    # The upstream setup.cfg runs with asyncio_mode=auto and a 10 s timeout.
    with open(os.path.join(tests_dir, "pytest.ini"), "w") as ini:
        ini.write(
            "[pytest]\n"
            "asyncio_mode = auto\n"
            "asyncio_default_fixture_loop_scope = function\n"
            "timeout = 10\n"
        )


def run_suite(tests_dir, results_path, extra_args):
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-c",
        os.path.join(tests_dir, "pytest.ini"),
        "--rootdir",
        tests_dir,
        "-p",
        "no:cacheprovider",
        "-p",
        "no:django",
        "-q",
        "-rN",
        *[f"--ignore={os.path.join(tests_dir, name)}" for name in NOT_LAYER_TESTS],
        *extra_args,
        tests_dir,
    ]
    environment = dict(os.environ, DMB_UPSTREAM_RESULTS=results_path)
    result = subprocess.run(
        command,
        cwd=tests_dir,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if not os.path.exists(results_path):
        raise RuntimeError(
            f"the suite did not run (pytest exit {result.returncode}):\n"
            + result.stdout[-5000:]
            + result.stderr[-5000:]
        )
    with open(results_path) as stream:
        return json.load(stream), result


def base_test_id(nodeid):
    """test_core.py::test_x[param] -> test_core.py::test_x"""
    return nodeid.split("[", 1)[0]


def summarize(outcomes):
    counts = {}
    for entry in outcomes.values():
        counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
    failing = sorted(
        nodeid
        for nodeid, entry in outcomes.items()
        if entry["outcome"] in ("failed", "error")
    )
    unexpected = [n for n in failing if base_test_id(n) not in EXPECTED_FAILURES]
    ran = {base_test_id(nodeid) for nodeid in outcomes}
    now_passing = sorted(
        name
        for name in EXPECTED_FAILURES
        if name in ran and not any(base_test_id(n) == name for n in failing)
    )
    return {
        "channels_redis": installed_version(),
        "counts": counts,
        "failing": failing,
        "unexpected_failures": unexpected,
        "expected_failures_now_passing": now_passing,
        "not_run": NOT_LAYER_TESTS,
        "outcomes": outcomes,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the summary as JSON here")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory"
    )
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest")
    options = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="dmb-channels-redis-suite-")
    try:
        try:
            version = installed_version()
            archive = fetch_sdist(version, os.path.join(workdir, "download"))
            tests_dir = extract_tests(archive, os.path.join(workdir, "suite"))
            prepare_suite(tests_dir)
            outcomes, result = run_suite(
                tests_dir,
                os.path.join(workdir, "results.json"),
                options.pytest_args,
            )
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            print(f"could not run the channels_redis suite: {error}", file=sys.stderr)
            if options.json:
                with open(options.json, "w") as stream:
                    json.dump({"error": str(error)}, stream, indent=1)
            return 3
        summary = summarize(outcomes)
        if options.json:
            with open(options.json, "w") as stream:
                json.dump(summary, stream, indent=1, sort_keys=True)
        print(f"channels_redis {version} test suite on dmb")
        print(
            ", ".join(
                f"{count} {outcome}"
                for outcome, count in sorted(summary["counts"].items())
            )
        )
        for nodeid in summary["failing"]:
            reason = EXPECTED_FAILURES.get(base_test_id(nodeid), "NOT EXPECTED")
            print(f"  failed: {nodeid}: {reason}")
        for name in summary["expected_failures_now_passing"]:
            print(f"  listed as failing but passed: {name}")
        for nodeid in summary["unexpected_failures"]:
            print(f"\n--- {nodeid}\n{outcomes[nodeid].get('detail', '')}")
        if summary["unexpected_failures"]:
            print(result.stdout[-3000:])
            return 1
        return 0
    finally:
        if options.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
