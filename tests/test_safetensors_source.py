"""The safetensors format module against safetensors itself, and SafetensorsSource on real save_pretrained folders:
the index decides which files are read, a stray consolidated copy is ignored with a note, one handle per file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubexport.errors import CheckpointError
from hubexport.safetensors_format import DTYPE_CODES, INDEX_NAME, read_header, read_specs
from hubexport.sources.hf import SafetensorsSource
from tests.fixtures_mcore import tiny_hf


@pytest.mark.parametrize("dtype", [getattr(torch, n) for n in sorted(DTYPE_CODES)])
def test_dtype_codes_both_ways_match_safetensors(dtype, tmp_path) -> None:
    """Every code we write is the one safetensors writes, and reads back as the same torch dtype."""
    path = tmp_path / "x.safetensors"
    save_file({"t": torch.zeros(2, 3, dtype=dtype)}, path)
    assert read_header(path)["t"]["dtype"] == DTYPE_CODES[str(dtype).removeprefix("torch.")]
    spec = read_specs(path)["t"]
    assert (spec.dtype, spec.shape, spec.nbytes) == (dtype, (2, 3), 6 * dtype.itemsize)


@pytest.mark.parametrize(("entry", "why"), [
    ({"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}, "'F99'"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}, "negative dimension"),
    ({"dtype": "F32", "data_offsets": [0, 0]}, "'shape'"),
])
def test_malformed_header_entry_is_one_line(entry, why, tmp_path) -> None:
    raw = json.dumps({"w": entry}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(CheckpointError, match="malformed header entry for 'w'") as e:
        read_specs(path)
    assert why in str(e.value) and "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A real sharded save_pretrained folder (several shards + index), as a Hub repo ships it."""
    import transformers as tf

    folder = tiny_hf("qwen2", tmp_path_factory.mktemp("hf") / "one")
    model = tf.AutoModelForCausalLM.from_pretrained(folder)
    out = folder.parent / "sharded"
    model.save_pretrained(out, max_shard_size="100KB")
    assert len(list(out.glob("model-*.safetensors"))) > 2 and (out / INDEX_NAME).is_file()
    return out


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _expected(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        out.update(load_file(f))
    return out


def _mappings(path: Path) -> int:
    return sum(str(path) in line for line in Path("/proc/self/maps").read_text().splitlines())


def _descriptors(path: Path) -> int:
    fds = Path("/proc/self/fd")
    return sum(os.path.realpath(fds / fd) == os.path.realpath(path) for fd in os.listdir(fds))


def test_stray_consolidated_file_is_ignored_with_a_note(sharded, tmp_path) -> None:
    folder = _copy(sharded, tmp_path / "repo")
    expected = _expected(folder)
    # Mistral repos ship the same weights again under other names in consolidated.safetensors
    save_file({f"stray.{k}": v + 1 for k, v in expected.items()}, folder / "consolidated.safetensors")
    src = SafetensorsSource(folder)
    try:
        assert set(src.metas()) == set(expected)
        for name, t in expected.items():
            assert torch.equal(src.read(name), t), name
        assert any("consolidated.safetensors" in n and INDEX_NAME in n for n in src.notes), src.notes
    finally:
        src.close()


def test_without_the_stray_file_there_is_no_note(sharded) -> None:
    src = SafetensorsSource(sharded)
    assert src.notes == [] and set(src.metas()) == set(_expected(sharded))


def test_one_handle_per_file_for_the_source_lifetime(sharded) -> None:
    """Many reads open each shard once (not once per tensor) and map none of it: mapped pages would stay resident
    for every byte ever read; close() closes them all."""
    shards = sorted(sharded.glob("model-*.safetensors"))
    src = SafetensorsSource(sharded)
    tensors = [src.read(name) for name in src.metas()]
    assert [_descriptors(f) for f in shards] == [1] * len(shards)
    assert [_mappings(f) for f in shards] == [0] * len(shards)
    src.close()
    assert [_descriptors(f) for f in shards] == [0] * len(shards)
    assert torch.equal(tensors[0], _expected(sharded)[next(iter(src.metas()))])  # still valid once closed


def test_index_naming_a_tensor_its_file_lacks_is_one_line(sharded, tmp_path) -> None:
    folder = _copy(sharded, tmp_path / "repo")
    index = json.loads((folder / INDEX_NAME).read_text())
    some_file = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"]["model.layers.99.mlp.up_proj.weight"] = some_file
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        SafetensorsSource(folder)
    msg = str(e.value)
    assert "\n" not in msg and "model.layers.99.mlp.up_proj.weight" in msg and some_file in msg and INDEX_NAME in msg


def test_index_putting_a_tensor_in_another_file_is_refused(sharded, tmp_path) -> None:
    folder = _copy(sharded, tmp_path / "repo")
    index = json.loads((folder / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    moved = next(k for k, f in sorted(index["weight_map"].items()) if f == files[0])
    index["weight_map"][moved] = files[1]
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"holds {moved}, which {INDEX_NAME} puts in {files[1]}"):
        SafetensorsSource(folder)


def test_hubexport_inspect_of_a_folder_shows_the_note(sharded, tmp_path) -> None:
    from click.testing import CliRunner

    from hubexport.cli import cli

    folder = _copy(sharded, tmp_path / "repo")
    save_file({"x": torch.zeros(1)}, folder / "consolidated.safetensors")
    r = CliRunner().invoke(cli, ["inspect", str(folder), "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["num_tensors"] == len(_expected(sharded))
    assert any("consolidated.safetensors" in n for n in info["notes"])
