"""pytest options shared by the notebook tests and the integration tests.

`--slow` also runs what is marked slow: notebook cells flagged `#| slow` (nbdev's `tst_flags`) and
tests marked `@pytest.mark.slow`. Without it they are skipped, so that CI stays fast.
"""
import pytest


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="also run slow tests and `#| slow` notebook cells")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; run with --slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
