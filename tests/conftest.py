"""Shared fixtures: the tiny model (random 2-layer Llama with SmolLM2's tokenizer) loaded once."""

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# benchmark scripts the suite runs record their lines here, not in benchmarks/results/ (benchmarks/record.py)
os.environ.setdefault("LABKIT_BENCH_RESULTS", tempfile.mkdtemp(prefix="labkit-bench-results-"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny():
    from labkit.models import load_lm

    model, tokenizer = load_lm("tiny", device="cpu", seed=0)
    return model, tokenizer


@pytest.fixture(scope="session")
def tokenizer(tiny):
    return tiny[1]
