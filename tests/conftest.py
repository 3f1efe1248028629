"""Session fixtures: real checkpoints made once per test session by the real producers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest

from tests.fsdp_cases import CASES, build_all
from tests.lora_cases import lora_root  # noqa: F401  (session fixture for tests/test_lora.py)


@pytest.fixture(scope="session")
def fsdp_root(tmp_path_factory):
    """All FSDP cases, made with real torch FSDP (gloo, several processes) into one directory."""
    return build_all(tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="session")
def fsdp_cases():
    return CASES

from tests.fixtures_mcore import *  # noqa: E402, F403  (megatron-core checkpoint fixtures, built once per session)
from tests.hub_fixtures import *  # noqa: E402, F403  (Hub emulator and card fixtures)
