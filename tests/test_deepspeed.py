"""DeepSpeed ZeRO 1/2/3 checkpoints made by real DeepSpeed (CPU accelerator, 2 ranks): merged bit-exact against the
live engine's fp32 masters, with save_pretrained's key set and the run's logits; `--dtype bf16` gives the run's own
bf16 weights; the same tensors as DeepSpeed's zero_to_fp32; shown by inspect, taken by verify --reference (bad input:
test_deepspeed_errors.py)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors.torch import load_file

from hubexport.cli import cli
from hubexport.detect import detect
from hubexport.errors import CheckpointError
from hubexport.examples import PROMPT
from hubexport.executor import merge
from hubexport.inspection import inspect, render_text
from hubexport.options import MergeOptions, Output
from hubexport.sources.deepspeed import load_ds_file
from hubexport.to_hf import open_source
from hubexport.verify import verify
from tests.deepspeed_cases import CASES, local_dir
from tests.test_dcp import header_specs
from tests.tree import tree_hash

BF16 = [n for n, c in CASES.items() if c.model.dtype == "bfloat16"]


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def merged(deepspeed_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("deepspeed_merged")
    results = {}
    for name in CASES:
        before = tree_hash(deepspeed_root / name)
        results[name] = (merge(local_dir(deepspeed_root, name), Output(out / name), log=_quiet), out / name)
        assert tree_hash(deepspeed_root / name) == before, "the merge wrote under its input"
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_bit_exact_key_set_and_logits(name, merged, deepspeed_root, tmp_path):
    case = CASES[name]
    result, folder = merged[name]
    assert result.source_format == "deepspeed"
    assert result.source_version == f"{case.producer}-zero{case.stage}"
    assert result.parallel == {"world_size": 2} and result.global_step == 1
    reference = load_file(deepspeed_root / name / "expected" / "state_dict.safetensors")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    loaded = model.state_dict()
    assert set(loaded) == set(reference)
    for key, value in reference.items():  # fp32 masters (frozen parameters and buffers upcast, losslessly)
        assert loaded[key].dtype == value.dtype == torch.float32 and torch.equal(loaded[key], value), key
    fresh = transformers.AutoModelForCausalLM.from_config(model.config, dtype=model.config.dtype)
    fresh.save_pretrained(tmp_path / "fresh")
    assert header_specs(folder) == header_specs(tmp_path / "fresh")
    run_dtype = getattr(torch, case.model.dtype)  # the logits are the run's, computed in its own dtype
    in_run_dtype = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=run_dtype).eval()
    with torch.no_grad():
        logits = in_run_dtype(input_ids=torch.tensor(PROMPT)).logits.float()
    tol = 2e-2 if run_dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(logits, torch.load(deepspeed_root / name / "expected" / "logits.pt"), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", BF16)
def test_dtype_bf16_gives_the_runs_own_weights(name, deepspeed_root, tmp_path):
    """The module's bf16 weights are the fp32 masters rounded: --dtype bf16 writes exactly them."""
    merge(local_dir(deepspeed_root, name), Output(tmp_path / "o"), MergeOptions(dtype="bf16"), log=_quiet)
    written = load_file(tmp_path / "o" / "model.safetensors")
    module = load_file(deepspeed_root / name / "expected" / "module.safetensors")
    assert set(written) == set(module)
    for key, value in module.items():
        assert written[key].dtype == value.dtype == torch.bfloat16 and torch.equal(written[key], value), key


def _zero_to_fp32(layout) -> dict[str, torch.Tensor]:
    """DeepSpeed's own zero_to_fp32 reconstruction on the saved files, which are read weights-only here (its loader
    unpickles with weights_only=False, which this project never does; what it extracts is the same)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils import zero_to_fp32 as z

    ws = layout.parallel["world_size"]
    models = [load_ds_file(p) for p in layout.files[:-ws]]
    optim = [load_ds_file(p)["optimizer_state_dict"] for p in layout.files[-ws:]]
    states = [z.zero_model_state(
        buffers={k: v.float() if v.is_floating_point() else v for k, v in m["module"].items() if k in m["buffer_names"]},
        param_shapes=m["param_shapes"], shared_params=[list(kv) for kv in m["shared_params"].items()],
        ds_version=m["ds_version"], frozen_param_shapes=m["frozen_param_shapes"],
        frozen_param_fragments=m["frozen_param_fragments"]) for m in models]
    with contextlib.redirect_stdout(io.StringIO()):
        if optim[0]["zero_stage"] <= 2:
            sd = z._get_fp32_state_dict_from_zero2_checkpoint(
                ws, [o["single_partition_of_fp32_groups"] for o in optim], states, False,
                optim[0]["param_alignment_paddings"])
        else:
            sd = z._get_fp32_state_dict_from_zero3_checkpoint(ws, [o["fp32_flat_groups"] for o in optim], states, False)
    return z.to_torch_tensor(sd)


@pytest.mark.parametrize("name", list(CASES))
def test_source_gives_deepspeeds_zero_to_fp32(name, deepspeed_root):
    """The source (before any HF renaming) against DeepSpeed's own reconstruction. ZeRO-1 records no frozen
    parameters, so zero_to_fp32 drops them; hubexport takes them from the module copy."""
    layout = detect(local_dir(deepspeed_root, name))
    theirs = _zero_to_fp32(layout)
    source = open_source(layout)
    try:
        ours = {n: source.read(n) for n in source.metas()}
    finally:
        source.close()
    case = CASES[name]
    dropped = set(case.frozen) if case.stage == 1 else set()
    assert set(theirs) == set(ours) - dropped
    for key in theirs:
        assert ours[key].dtype == torch.float32 and torch.equal(ours[key], theirs[key].float()), key


@pytest.mark.parametrize("name", list(CASES))
def test_inspect_and_verify_take_it(name, deepspeed_root, merged):
    case = CASES[name]
    info = inspect(local_dir(deepspeed_root, name))
    assert (info["format"], info["version"]) == ("deepspeed", f"{case.producer}-zero{case.stage}")
    assert info["parallel"] == {"world_size": 2} and info["global_step"] == 1 and info["dtype"] == "float32"
    assert info["num_tensors"] == len(header_specs(merged[name][1]))
    assert f"deepspeed {info['version']}" in render_text(info)
    assert any("also holds safetensors" in n for n in info["notes"]) == (case.stage < 3)
    assert any("--dtype bf16 gives the run's own bf16 weights" in n for n in info["notes"]) == (name in BF16)
    report = verify(merged[name][1], local_dir(deepspeed_root, name), log=_quiet)
    assert report.ok and report.compared == info["num_tensors"]
    r = CliRunner().invoke(cli, ["verify", str(merged[name][1]), "--reference", str(local_dir(deepspeed_root, name)),
                                 "--backend", "deepspeed"])
    assert r.exit_code == 0, r.output


def test_tag_dir_and_openrlhf_root_are_taken(deepspeed_root, merged, tmp_path):
    """global_stepN/ itself, and OpenRLHF's ckpt/ root (→ _actor/, → latest), give the same model."""
    name = "openrlhf_zero2_llama_tied"
    ckpt = deepspeed_root / name / "ckpt"
    want = load_file(merged[name][1] / "model.safetensors")
    for src in (ckpt, ckpt / "_actor" / "global_step1"):
        out = tmp_path / src.name
        merge(src, Output(out), MergeOptions(backend="deepspeed"), log=_quiet)
        got = load_file(out / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_other_backends_do_not_take_it(deepspeed_root, tmp_path):
    with pytest.raises(CheckpointError, match="is not a verl FSDP checkpoint"):
        merge(local_dir(deepspeed_root, "trainer_zero3_qwen2_tied"), Output(tmp_path / "o"),
              MergeOptions(backend="fsdp"), log=_quiet)


def test_merge_needs_no_deepspeed(deepspeed_root, merged, tmp_path):
    """The pickles' DeepSpeed classes are stood in for: a merge runs where DeepSpeed cannot be imported."""
    script = ("import sys; sys.modules['deepspeed'] = None\n"
              "from hubexport.cli import main; sys.argv = ['hubexport', 'merge', '--local-dir', sys.argv[1], "
              "'--target-dir', sys.argv[2]]; main()")
    name = "trainer_zero3_llama_bf16"
    proc = subprocess.run([sys.executable, "-c", script, str(local_dir(deepspeed_root, name)), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, want = load_file(tmp_path / "o" / "model.safetensors"), load_file(merged[name][1] / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
