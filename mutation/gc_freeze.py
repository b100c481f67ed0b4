"""A pytest plugin of ``make mutation``'s runs (``-p gc_freeze``): when a pytest session
ends, every object still alive is moved out of the garbage collector's reach (``gc.freeze``).

mutmut's fork server collects the tests once, then forks a child per mutant. Without this,
each child's collections (pytest itself runs five as it ends) walk every object of that
warm-up, and so write to, and copy, the pages they sit on: 0.18-0.19 s of a child's
0.48 s for one dispatcher test here. A child then walks only what it made itself. What a
test sees does not change: a frozen object is one that was alive anyway.
"""

import gc

import pytest


@pytest.hookimpl(trylast=True)  # after pytest's own collections: only what is alive stays
def pytest_unconfigure(config: pytest.Config) -> None:
    gc.freeze()
