"""Test configuration: fresh random inputs each run, with the seed printed so a failure can be
replayed (``GCA_TEST_SEED=<seed> make test``)."""

import os
import random

# the tests never need the Hugging Face hub; without this, a tokenizer-name lookup waits on
# network timeouts where the hub is unreachable (set before transformers/huggingface_hub import)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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
