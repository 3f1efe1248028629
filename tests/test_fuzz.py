"""Fuzzing the parsers that read untrusted bytes and the layout detection: nothing escapes but the project's own
error type, and every case ends quickly."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hubexport.detect import detect
from hubexport.errors import HubexportError
from hubexport.sources.dcp import read_metadata
from hubexport.sources.fsdp import load_rank_file
from hubexport.sources.hf import SafetensorsSource
from tests.fsdp_cases import actor_dir

# no deadline: an example that pays a first import on a busy machine is slow, not wrong (speed is benchmarked)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def only_our_errors(fn, *args) -> None:
    try:
        fn(*args)
    except HubexportError as e:
        assert e.message and "\n" not in e.message


@FUZZ
@given(st.binary(max_size=2048))
def test_dcp_metadata_parser(data):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / ".metadata").write_bytes(data)
        only_our_errors(read_metadata, Path(d))


json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 1 << 40) | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=10)
entries = st.dictionaries(st.text(max_size=12), json_values | st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "BF16", "I64", "X9"]), "shape": st.lists(st.integers(-2, 4), max_size=3),
     "data_offsets": st.lists(st.integers(-1, 64), min_size=2, max_size=2)}), max_size=4)


@FUZZ
@given(entries, st.binary(max_size=64), st.booleans())
def test_safetensors_headers(header, tail, bad_length):
    raw = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "model.safetensors"
        f.write_bytes(struct.pack("<Q", len(raw) + (7 if bad_length else 0)) + raw + tail)
        (Path(d) / "config.json").write_text("{}")

        def open_and_read() -> None:
            src = SafetensorsSource(Path(d))
            for name in src.metas():
                src.read(name)

        only_our_errors(open_and_read)


@FUZZ
@given(data=st.data())
def test_rank_file_mutations(fsdp_root, data):
    original = (actor_dir(fsdp_root, "qwen2_plain_w1") / "model_world_size_1_rank_0.pt").read_bytes()
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8))):
        mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(mutated)))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model_world_size_1_rank_0.pt"
        path.write_bytes(bytes(mutated[:cut] if data.draw(st.booleans()) else mutated))
        only_our_errors(load_rank_file, path)


NAMES = ["model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt", "model_world_size_3_rank_0.pt",
         "fsdp_config.json", "latest_checkpointed_iteration.txt", "huggingface/config.json", "dist_ckpt/metadata.json",
         "dist_ckpt/.metadata", "model/dist_ckpt/metadata.json", "ckpt_contents.json", "transformer_config.json",
         "model/mp_rank_00/model.pt", "model/mp_rank_01_002/model.pt", "actor/fsdp_config.json",
         "global_step_3/actor/model_world_size_1_rank_0.pt", "model/huggingface/model.safetensors",
         "latest", "config.json", "global_step1/zero_pp_rank_0_mp_rank_00_optim_states.pt",
         "global_step1/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "global_step1/mp_rank_00_model_states.pt",
         "global_step1/zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt"]


@FUZZ
@given(st.dictionaries(st.sampled_from(NAMES), st.binary(max_size=40) | st.sampled_from(
    [b"3", b'{"world_size": 2, "FSDP_version": 2}', b"{}", b"[]", b'{"tensor_model_parallel_size": 2}',
     b"global_step1", b"../x"]), max_size=6), st.sampled_from(["auto", "fsdp", "megatron", "deepspeed"]))
def test_layout_detection(files, backend):
    with tempfile.TemporaryDirectory() as d:
        for name, content in files.items():
            (Path(d) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(d) / name).write_bytes(content)
        only_our_errors(detect, Path(d), backend)
