"""Session fixtures: real checkpoints made once per test session by the real producers."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The session's own Hugging Face home: hubexport's caches (native names, merge recipes) start empty on every run, and
# no test reads or writes the user's cache or saved login.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hubexport-tests-hf-")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The torchrun tests exercise every rank, not the small-work fallback (hubexport/launch.py; test_launch.py tests that).
os.environ.setdefault("HUBEXPORT_MIN_BYTES_PER_RANK", "0")

import pytest

from hubexport.examples import FsdpCase, make_checkpoints
from tests.dcp_cases import dcp_root  # noqa: F401  (torch DCP checkpoints, built once per session)
from tests.deepspeed_cases import deepspeed_root  # noqa: F401  (DeepSpeed ZeRO checkpoints, built once per session)
from tests.fixtures_mcore import *  # noqa: F403  (megatron-core checkpoint fixtures, built once per session)
from tests.fixtures_mcore_lora import mcore_lora  # noqa: F401  (Megatron LoRA checkpoints, built once per session)
from tests.fixtures_mfsdp import mfsdp_cases  # noqa: F401  (Megatron-FSDP fsdp_dtensor checkpoints, built once per session)
from tests.fixtures_mla import mla_cases  # noqa: F401  (DeepSeek-V3 in a real MLA+MTP GPTModel, built once per session)
from tests.fixtures_vl import vl_checkpoints  # noqa: F401  (Qwen-VL torch_dist checkpoints, built once per session)
from tests.fsdp_cases import CASES, actor_dir, build_all
from tests.hub_fixtures import *  # noqa: F403  (Hub emulator and card fixtures)
from tests.lora_cases import lora_root  # noqa: F401  (session fixture for tests/test_lora.py)
from tests.oidc_fakes import github  # noqa: F401  (GitHub's OIDC endpoint, for the keyless-publishing tests)


@pytest.fixture(scope="session")
def fsdp_root(tmp_path_factory):
    """All FSDP cases, made with real torch FSDP (gloo, several processes) into one directory."""
    return build_all(tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="session")
def fsdp_cases():
    return CASES


@pytest.fixture(scope="session")
def mid_checkpoint(tmp_path_factory):
    """~420 MB of fp32 weights in two FSDP2 rank files (largest tensor 67 MB): big enough to measure memory and to
    interrupt a merge half-way."""
    root = tmp_path_factory.mktemp("mid")
    make_checkpoints([FsdpCase("mid", hidden_size=1024, layers=8, vocab_size=16384, reference=False)], root)
    return actor_dir(root, "mid")
