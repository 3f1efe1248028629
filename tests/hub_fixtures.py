"""Fixtures for the Hub and card tests: a fresh emulator per test, an environment that points huggingface_hub at it
(and never at the machine's real token or cache), and a tiny multi-shard model made by transformers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakehub import FakeHub

TOKEN = "hf_TestWriteToken0123456789abcdef"  # long and unique, so a leak is found by a plain substring search
READ_TOKEN = "hf_TestReadToken0123456789abcdef"
USER = "tester"
ORG = "rl-org"


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Isolate huggingface_hub from this machine: its constants were frozen at import, so patch them too."""
    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HF_HUB_DISABLE_XET", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the suite's conftest turns it on for everything else
    disable_progress_bars()
    return home


@pytest.fixture
def fakehub(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running emulator with a write user (member of an org) and a read token; HF_ENDPOINT/HF_TOKEN point at it."""
    hub = FakeHub(multipart_threshold=15_000, chunk_size=4096)
    hub.add_user(USER, TOKEN, orgs={ORG: "write"})
    hub.add_token(USER, READ_TOKEN, "read")
    monkeypatch.setenv("HF_ENDPOINT", hub.start())
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield hub
    hub.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real transformers checkpoint in 7 shards of 12–18 KB: with the emulator's 15 KB threshold, both LFS paths."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    out = tmp_path_factory.mktemp("tiny") / "model"
    Qwen2ForCausalLM(config).save_pretrained(out, max_shard_size="20KB")
    return out


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy per test: push writes README.md into the folder."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def hub_env(hub: FakeHub, token: str | None = TOKEN) -> dict[str, str]:
    """The environment a subprocess CLI run needs to talk to the emulator (and nothing else)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=os.environ["HF_HOME"], HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1")
    if token:
        env["HF_TOKEN"] = token
    return env
