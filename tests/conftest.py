"""Test configuration: fresh random inputs each run, with the seed printed so a failure can be
replayed (``GCA_TEST_SEED=<seed> make test``)."""

import os
import random

import pytest
import torch

SEED = int(os.environ.get("GCA_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"gca test seed: {SEED} (replay with GCA_TEST_SEED={SEED})"


@pytest.fixture(autouse=True)
def _seed_each_test(request):
    # a distinct, reproducible seed per test, drawn from the session seed
    torch.manual_seed(SEED + hash(request.node.nodeid) % 100_003)
    yield
