"""pytest options shared by the notebook tests and the integration tests.

`--slow` also runs what is marked slow: notebook cells flagged `#| slow` (nbdev's `tst_flags`) and
tests marked `@pytest.mark.slow`. Without it they are skipped, so that CI stays fast.
Tests marked `gpu` need CUDA: they run wherever torch sees a GPU and are skipped elsewhere (CI, laptops).
"""
import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="also run slow tests and `#| slow` notebook cells")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; run with --slow")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped when torch.cuda.is_available() is False")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        no_gpu = pytest.mark.skip(reason="gpu: needs CUDA (torch.cuda.is_available() is False)")
        for item in items:
            if "gpu" in item.keywords: item.add_marker(no_gpu)
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
