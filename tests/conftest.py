"""Shared fixtures: real data from ../shared/data and the offline SmolLM2 model."""

from __future__ import annotations

import os

import pytest

from megatron_cpt import assets

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def shared_data():
    path = assets.shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent (real-text tests need it; see its README)")
    return path


@pytest.fixture(scope="session")
def smollm2_gguf():
    try:
        return assets.smollm2_gguf()
    except Exception as exc:  # registry unreachable: a clear skip, not a failure
        pytest.skip(f"SmolLM2 GGUF unavailable: {exc}")


@pytest.fixture(scope="session")
def llama3_tokenizer_model():
    try:
        return assets.llama3_tokenizer_model()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
