"""Shared fixtures: a locally trained tokenizer and fresh tiny models (no network)."""

import os

import pytest
import torch

from prefalign.tiny import build_model, build_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def make_model(tokenizer):
    """Factory for a fresh tiny model: make_model("llama"), make_model("gpt2", seed=1)."""

    def make(arch="llama", **kwargs):
        return build_model(tokenizer, arch=arch, **kwargs)

    return make


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A saved tiny Llama + tokenizer directory, as a user would pass to --model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = build_model(tokenizer, arch="llama", seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path

