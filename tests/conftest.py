"""Test configuration: fresh random inputs each run, with the seed printed so a failure can be
replayed (``GCA_TEST_SEED=<seed> make test``)."""

import os
import random
import zlib

# the tests never need the Hugging Face hub; without this, a tokenizer-name lookup waits on
# network timeouts where the hub is unreachable (set before transformers/huggingface_hub import)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# Without CUDA the Triton kernels run in the interpreter, and TRITON_INTERPRET must be set before anything
# imports triton: its own @jit helpers (tl.zeros, ...) are decided then. Set here, first, because test
# modules that import transformers or torch._inductor (test_hf) import triton at collection; collected before
# test_gca_triton (`pytest tests/test_hf.py tests/test_gca_triton.py`), they made every kernel test fail with
# "Cannot call @triton.jit'd outside of the scope of a kernel".
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SEED = int(os.environ.get("GCA_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"gca test seed: {SEED} (replay with GCA_TEST_SEED={SEED})"


@pytest.fixture(autouse=True)
def _seed_each_test(request):
    # a distinct, reproducible seed per test, drawn from the session seed (crc32, not hash(): str hashes are
    # salted per process, so the same GCA_TEST_SEED gave other draws in a rerun). Tests that want fresh numpy
    # draws take np.random.default_rng(torch.initial_seed()), which this seed then replays too.
    torch.manual_seed(SEED + zlib.crc32(request.node.nodeid.encode()) % 100_003)
    yield
