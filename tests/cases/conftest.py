"""Fixtures of the failure-case tests: child processes and extra prefixes."""

import asyncio

import pytest
import pytest_asyncio
from conftest import unique_prefix

from .support import Children, catch_loop_errors, remove_segment


@pytest_asyncio.fixture(autouse=True)
async def loop_errors():
    """Fail a test whose event loop logged an error it never raised."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    errors = catch_loop_errors(loop)
    yield errors
    await asyncio.sleep(0)
    loop.set_exception_handler(previous)
    assert not errors, f"the event loop reported errors: {errors}"


@pytest.fixture
def children():
    """Start spawned children; any still running at teardown are killed."""
    kids = Children()
    yield kids
    kids.cleanup()


@pytest.fixture
def new_prefix():
    """Make more unique prefixes; every one's segment is removed at teardown."""
    made = []

    def make(tag="c"):
        name = unique_prefix(tag)
        made.append(name)
        remove_segment(name)  # start from nothing, whatever ran before
        return name

    yield make
    for name in made:
        remove_segment(name)
