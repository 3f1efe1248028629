"""`hubexport diff` and the publish gate, on real models: a PEFT LoRA run trained one step and saved as verl saves it,
merged by hubexport as an adapter (the base weights untouched: the "merged" model that is the base) and fused (a real
fine-tune). Expected numbers are computed here independently, with torch on whole tensors."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from hubexport import diff
from hubexport.cli import cli
from hubexport.diff import check_publishable, diff_models, render_markdown, render_text
from hubexport.errors import UnpublishableModel
from hubexport.examples import FsdpCase, LoraSpec, make_checkpoints
from hubexport.executor import merge
from hubexport.options import MergeOptions, Output
from tests.tensors import folder_tensors


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base (the model before training), adapter (merge --lora adapter: base weights + lora_adapter/), fused."""
    root = tmp_path_factory.mktemp("diff")
    case = FsdpCase("lora_w1", fsdp=0, world_size=1, lora=LoraSpec())
    make_checkpoints([case], root)
    actor = root / case.name / "global_step_1" / "actor"
    out = {"base": root / case.name / "base_model"}
    for mode in ("adapter", "fuse"):
        out[mode] = root / mode
        merge(actor, Output(out[mode]), MergeOptions(lora_mode=mode), log=quiet)
    return out


def edited(src, dst, edit) -> None:
    """A copy of model folder `src` whose tensors went through `edit(dict) -> dict`."""
    shutil.copytree(src, dst)
    tensors = edit(folder_tensors(src))
    for f in dst.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def expected_modules(cand: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Per module type, from whole tensors: ‖ΔW‖/‖W‖ of the group as one vector, max |ΔW|, unchanged count."""
    groups: dict[str, list[str]] = {}
    for name in cand:
        groups.setdefault(re.sub(r"\.[0-9]+\.", ".*.", name), []).append(name)
    out = {}
    for module, names in groups.items():
        delta = torch.cat([(cand[n].double() - base[n].double()).flatten() for n in names])
        ref = torch.cat([base[n].double().flatten() for n in names])
        norm, ref_norm = torch.linalg.vector_norm(delta).item(), torch.linalg.vector_norm(ref).item()
        out[module] = {"tensors": len(names), "unchanged": sum(torch.equal(cand[n], base[n]) for n in names),
                       # a zero base (Qwen2's initial biases) that stayed zero did not change
                       "rel_change": norm / ref_norm if ref_norm else (0.0 if norm == 0 else None),
                       "max_abs": delta.abs().max().item()}
    return out


# ---------------------------------------------------------------------------------------------------- the gate
def test_unfused_adapter_is_refused_as_identical(models):
    """`merge --lora adapter` keeps the base weights as they were: publishing that folder as the fine-tune would
    publish the base model (verl #7285: an adapter never folded in)."""
    report = diff_models(models["adapter"], models["base"], log=quiet)
    assert report.identical and report.unchanged_share == 1.0 and report.rel_change == 0.0
    assert len(report.compared) == len(load_file(models["base"] / "model.safetensors"))
    with pytest.raises(UnpublishableModel, match="identical to its base") as e:
        check_publishable(report, allow_unchanged=False, allow_nonfinite=False)
    assert e.value.exit_code == 2 and "--allow-unchanged" in e.value.hint and "\n" not in str(e.value)
    assert check_publishable(report, allow_unchanged=True, allow_nonfinite=False) == []


def test_fused_finetune_numbers_match_an_independent_computation(models):
    cand, base = folder_tensors(models["fuse"]), folder_tensors(models["base"])
    report = diff_models(models["fuse"], models["base"], log=quiet)
    assert not report.identical and report.nonfinite == 0
    assert check_publishable(report, allow_unchanged=False, allow_nonfinite=False) == []
    want = expected_modules(cand, base)
    got = {m.module: m for m in report.modules()}
    assert set(got) == set(want)
    assert "model.layers.*.self_attn.q_proj.weight" in got  # layer numbers folded into the module type
    for module, w in want.items():
        m = got[module]
        assert (m.tensors, m.unchanged) == (w["tensors"], w["unchanged"]), module
        assert m.rel_change == pytest.approx(w["rel_change"], rel=1e-9, abs=1e-15), module
        assert m.max_abs == pytest.approx(w["max_abs"], rel=1e-12, abs=0), module
    # LoRA touched the targeted linears only: those moved, embeddings and norms did not
    assert got["model.layers.*.mlp.down_proj.weight"].rel_change > 1e-4
    assert got["model.embed_tokens.weight"].unchanged == 1 and got["model.norm.weight"].rel_change == 0
    unchanged = sum(torch.equal(cand[n], base[n]) for n in cand)
    assert report.unchanged_share == pytest.approx(unchanged / len(cand))
    for t in report.tensors:  # and per tensor
        d = cand[t.name].double() - base[t.name].double()
        assert t.max_abs == d.abs().max().item(), t.name
        assert t.unchanged == torch.equal(cand[t.name], base[t.name]), t.name


def test_nan_and_inf_are_refused_unless_allowed(models, tmp_path):
    target = "model.layers.1.self_attn.v_proj.weight"

    def poison(t):
        t[target][0, 0], t[target][1, 2], t[target][3, 1] = float("nan"), float("inf"), float("-inf")
        return t

    edited(models["fuse"], tmp_path / "nan", poison)
    report = diff_models(tmp_path / "nan", models["base"], log=quiet)
    row = next(t for t in report.tensors if t.name == target)
    assert (row.nan, row.inf, report.nonfinite) == (1, 2, 3)
    assert row.max_abs is not None and row.max_abs < float("inf")  # the finite rest is still measured
    with pytest.raises(UnpublishableModel, match=rf"3 NaN/Inf values in 1 tensor.*{re.escape(target)}"):
        check_publishable(report, allow_unchanged=False, allow_nonfinite=False)
    assert check_publishable(report, allow_unchanged=False, allow_nonfinite=True) == []
    json.dumps(report.to_dict(), allow_nan=False)  # still strict JSON


def test_drift_and_one_sided_tensors_are_reported(models, tmp_path):
    def drift(t):
        del t["model.norm.weight"]
        t["score.weight"] = torch.ones(1, 32)
        t["model.embed_tokens.weight"] = torch.cat([t["model.embed_tokens.weight"]] * 2)  # replicated, concatenated
        t["lm_head.weight"] = t["lm_head.weight"].to(torch.bfloat16)
        return t

    edited(models["fuse"], tmp_path / "drift", drift)
    report = diff_models(tmp_path / "drift", models["base"], log=quiet)
    assert report.only_base == ["model.norm.weight"] and report.only_candidate == ["score.weight"]
    assert [(t.name, t.shape, t.base_shape) for t in report.shape_drift] == [
        ("model.embed_tokens.weight", [256, 32], [128, 32])]
    assert [(t.name, t.dtype, t.base_dtype) for t in report.dtype_drift] == [("lm_head.weight", "bfloat16", "float32")]
    lm_head = next(t for t in report.tensors if t.name == "lm_head.weight")  # compared across dtypes, in float64
    base_head = folder_tensors(models["base"])["lm_head.weight"].double()
    assert lm_head.max_abs == (base_head.bfloat16().double() - base_head).abs().max().item() > 0
    notes = check_publishable(report, allow_unchanged=False, allow_nonfinite=False)
    assert any("missing from the candidate: model.norm.weight" in n for n in notes)
    assert any("changed shape" in n and "[256, 32] vs [128, 32]" in n for n in notes)
    text = render_text(report)
    assert "only in the base (1): model.norm.weight" in text and "only in the candidate (1): score.weight" in text
    assert "dtype drift: lm_head.weight bfloat16 vs base float32" in text


def test_far_smaller_model_and_missing_tensors_warn_without_refusing(models, tmp_path):
    edited(models["fuse"], tmp_path / "small", lambda t: {k: v for k, v in t.items() if ".layers.0." in k})
    report = diff_models(tmp_path / "small", models["base"], log=quiet)
    notes = check_publishable(report, allow_unchanged=False, allow_nonfinite=False)
    assert report.candidate_params < report.base_params / 2
    assert any(n.startswith("the candidate has") and f"of its base's {report.base_params:,}" in n for n in notes)
    assert any("missing from the candidate" in n for n in notes)


def test_identical_with_extra_tensors_is_not_identical(models, tmp_path):
    edited(models["base"], tmp_path / "extra", lambda t: {**t, "score.weight": torch.zeros(1, 32)})
    report = diff_models(tmp_path / "extra", models["base"], log=quiet)
    assert report.unchanged_share == 1.0 and not report.identical


# ---------------------------------------------------------------------------------------------------- pure maths
def test_module_key():
    assert diff.module_key("model.layers.11.mlp.experts.7.up_proj.weight") == "model.layers.*.mlp.experts.*.up_proj.weight"
    assert diff.module_key("model.layers.0.self_attn.q_proj.weight") == "model.layers.*.self_attn.q_proj.weight"
    assert diff.module_key("lm_head.weight") == "lm_head.weight"
    assert diff.module_key("h.3") == "h.*" and diff.module_key("fc1.weight") == "fc1.weight"


def test_chunked_maths_equals_whole_tensor_maths(monkeypatch):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(37, 11, generator=g)
    cand = base + 1e-3 * torch.randn(37, 11, generator=g)
    cand[5, 5] = float("nan")
    whole = diff.pair_stats(cand, base)
    monkeypatch.setattr(diff, "CHUNK", 7)
    chunked = diff.pair_stats(cand, base)
    assert chunked.nan == whole.nan == 1 and chunked.unchanged is whole.unchanged is False
    assert chunked.delta_sq == pytest.approx(whole.delta_sq, rel=1e-12)
    assert chunked.max_abs == whole.max_abs
    mask = torch.ones_like(base, dtype=torch.bool)
    mask[5, 5] = False
    d = (cand.double() - base.double())[mask]
    assert whole.delta_sq == pytest.approx(d.square().sum().item(), rel=1e-12)
    assert whole.base_sq == pytest.approx(base.double()[mask].square().sum().item(), rel=1e-12)


def test_unchanged_across_dtypes_and_bitwise():
    w = torch.randn(4, 4).bfloat16()
    assert diff.pair_stats(w.float(), w).unchanged  # an upcast base is still the base
    assert not diff.pair_stats(w.float() + 1e-3, w).unchanged
    nan = torch.tensor([float("nan"), 1.0])
    assert diff.pair_stats(nan, nan.clone()).unchanged  # equal bits
    assert diff.relative_change(0.0, 0.0) == 0.0 and diff.relative_change(1.0, 0.0) is None
    assert diff.relative_change(4.0, 16.0) == 0.5


# ---------------------------------------------------------------------------------------------------- rendering, CLI
def test_markdown_section_names_the_base_and_no_local_path(models):
    report = diff_models(models["fuse"], models["base"], log=quiet)
    md = render_markdown(report, "Qwen/Qwen2-0.5B")
    assert md.startswith("## Weight delta vs the base model\n") and "`Qwen/Qwen2-0.5B`" in md
    assert str(models["base"]) not in md and str(models["fuse"]) not in md
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(rows) == len(report.modules())
    assert "| `model.norm.weight` | 1 | 1 | 0 | 0 | 0 |" in rows


def test_cli_text_json_and_check(models, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["diff", str(models["fuse"]), "--base", str(models["base"])])
    assert r.exit_code == 0, r.output
    assert "model.layers.*.mlp.gate_proj.weight" in r.stdout and "0 NaN/Inf" in r.stdout
    r = runner.invoke(cli, ["diff", str(models["fuse"]), "--base", str(models["base"]), "--json"])
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert data == json.loads(json.dumps(diff_models(models["fuse"], models["base"], log=quiet).to_dict()))
    assert data["summary"]["identical"] is False and data["summary"]["compared"] == len(data["tensors"])

    r = runner.invoke(cli, ["diff", str(models["adapter"]), "--base", str(models["base"])])
    assert r.exit_code == 0 and "IDENTICAL to the base" in r.stdout  # a report, not a gate, unless --check
    r = runner.invoke(cli, ["diff", str(models["adapter"]), "--base", str(models["base"]), "--check"])
    assert r.exit_code == 2 and "error: " in r.stderr and "identical to its base" in r.stderr
    assert "Traceback" not in r.output
    r = runner.invoke(cli, ["diff", str(models["adapter"]), "--base", str(models["base"]), "--check",
                            "--allow-unchanged"])
    assert r.exit_code == 0

    edited(models["fuse"], tmp_path / "nan", lambda t: {**t, "lm_head.weight": t["lm_head.weight"] * float("nan")})
    r = runner.invoke(cli, ["diff", str(tmp_path / "nan"), "--base", str(models["base"]), "--check"])
    assert r.exit_code == 2 and "NaN/Inf" in r.stderr
    r = runner.invoke(cli, ["diff", str(tmp_path / "nan"), "--base", str(models["base"]), "--check",
                            "--allow-nonfinite"])
    assert r.exit_code == 0


def test_cli_missing_base_is_one_line(models, tmp_path):
    r = CliRunner().invoke(cli, ["diff", str(models["fuse"]), "--base", str(tmp_path / "nope")])
    assert r.exit_code == 2 and r.stderr.startswith("error: base ") and "Traceback" not in r.output
