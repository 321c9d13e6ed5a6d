"""pytest options shared by the notebook tests and the integration tests.

`--slow` also runs what is marked slow: notebook cells flagged `#| slow` (nbdev's `tst_flags`) and
tests marked `@pytest.mark.slow`. Without it they are skipped, so that CI stays fast.
Tests marked `gpu` need CUDA: they run wherever torch sees a GPU and are skipped elsewhere (CI, laptops).
"""
import shutil

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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    item.stash.setdefault(_OUTCOMES, {})[rep.when] = rep.passed
    return rep


_OUTCOMES = pytest.StashKey[dict]()


@pytest.fixture
def tmp_path(tmp_path, request):
    """pytest's `tmp_path`, deleted as soon as its test passes; a failing test's folder stays for reading.

    The notebooks write run folders, checkpoints and saved models (the text and GLUE notebooks ~400 MB each); pytest
    keeps the last three sessions' folders whole, ~5 GB each, and a disk shared with other jobs filled up under CI.
    This is pytest's own `tmp_path_retention_policy = "failed"`, set here because kdnb has no pytest.ini."""
    yield tmp_path
    if all(request.node.stash.get(_OUTCOMES, {}).values()) and "call" in request.node.stash.get(_OUTCOMES, {}):
        shutil.rmtree(tmp_path, ignore_errors=True)
