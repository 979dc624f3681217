"""Fixtures of the worker tests: stacks of real servers and ``celery worker`` processes.

``make_stack`` makes stacks (:class:`support.worker_stack.Stack`) that live
as long as the test module, ``stack_factory`` stacks torn down after the
test, and ``shared`` is one stack with one prefork worker of concurrency 4,
for the module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from support.worker_stack import Stack, stacks


@pytest.fixture(scope="module")
def make_stack() -> Iterator[Callable[..., Stack]]:
    """Stacks that live as long as this module's tests."""
    with stacks() as make:
        yield make


@pytest.fixture
def stack_factory() -> Iterator[Callable[..., Stack]]:
    """Stacks torn down at the end of the test."""
    with stacks() as make:
        yield make


@pytest.fixture(scope="module")
def shared(make_stack: Callable[..., Stack]) -> Stack:
    """One stack with one prefork worker (concurrency 4), shared by most tests."""
    stack = make_stack()
    stack.worker(concurrency=4)
    return stack
