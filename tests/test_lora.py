"""LoRA export from real PEFT + FSDP checkpoints: the adapter PEFT loads, the fused model, LoRA-only checkpoints with a
base model, and the refusals (unknown or zero alpha, wrong rank, tied fusion). Expected values come
from PEFT and transformers themselves, or from the formula with the numbers the cases trained with."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from safetensors.torch import load_file

from hubexport import lora, lora_views
from hubexport.cli import cli
from hubexport.core import TensorSpec
from hubexport.errors import ConfigError, HubexportError
from hubexport.examples import PROMPT, FsdpCase, LoraSpec, lora_config, tiny_config
from hubexport.executor import merge as run_merge
from hubexport.options import MergeOptions, Output
from tests.lora_cases import CASES, actor_dir
from tests.tensors import folder_tensors

FULL = ["qwen2_lora_fsdp2_w2", "qwen2_lora_patterns_fsdp2_w2", "qwen2_lora_bias_fsdp1_w2_bf16"]
ONLY = "qwen2_lora_only_fsdp2_w2"
TIED = "qwen3_lora_tied_w1"


def merge(local_dir, target, *, log, **options):
    """The executor with the LoRA options spelled as keywords."""
    return run_merge(local_dir, Output(target), MergeOptions(**options), log=log)


def quiet(_: str) -> None:
    pass


def tol(name: str) -> float:
    return 2e-2 if CASES[name].dtype == "bfloat16" else 1e-5


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor(PROMPT)).logits.float()


def expected_logits(root, name) -> torch.Tensor:
    return torch.load(root / name / "expected" / "logits.pt")


def load(folder) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto")


@pytest.fixture(scope="module")
def exported(lora_root, tmp_path_factory):
    """Each case exported each way once, through the public API."""
    out = tmp_path_factory.mktemp("lora_out")
    runs = [(n, m, {}) for n in FULL for m in ("adapter", "fuse")]
    runs += [(FULL[0], "both", {}), (ONLY, "adapter", {}), (ONLY, "fuse", {"lora_base_model": lora_root / ONLY / "base_model"}),
             (TIED, "adapter", {"lora_alpha": 16})]
    done = {}
    for name, mode, kw in runs:
        target = out / f"{name}-{mode}"
        done[name, mode] = (merge(actor_dir(lora_root, name), target, lora_mode=mode, log=quiet, **kw), target)
    return done


# ------------------------------------------------------------------------------------------------- end to end (FSDP)
@pytest.mark.parametrize("name", [*FULL, ONLY, TIED])
def test_adapter_loads_with_peft_and_gives_the_trained_logits(name, exported, lora_root):
    result, target = exported[name, "adapter"]
    expected = expected_logits(lora_root, name)
    base_dir = lora_root / name / "base_model"
    if name == ONLY:  # LoRA-only without --base-model: the adapter alone, no half model next to it
        assert sorted(p.name for p in target.iterdir()) == [lora.ADAPTER_DIR]
        base = load(base_dir)
    else:
        base = load(target)
        untouched = load_file(base_dir / "model.safetensors")  # the model before LoRA training
        written = folder_tensors(target)
        assert set(written) == set(untouched)
        trained_biases = CASES[name].lora.bias != "none"
        for key, value in untouched.items():
            if not (trained_biases and key.endswith(".bias")):
                assert torch.equal(written[key], value), key
    base_logits = logits_of(base)
    assert (base_logits - expected).abs().max() > 10 * tol(name)  # the LoRA really changes the model
    peft_model = PeftModel.from_pretrained(base, target / lora.ADAPTER_DIR)
    torch.testing.assert_close(logits_of(peft_model), expected, rtol=tol(name), atol=tol(name))
    assert result.lora["mode"] == "adapter" and result.lora["lora_only"] is (name == ONLY)


@pytest.mark.parametrize("name", [*FULL, ONLY])
def test_fused_model_gives_the_trained_logits_without_peft(name, exported, lora_root):
    _, target = exported[name, "fuse"]
    assert not (target / lora.ADAPTER_DIR).exists()
    model = load(target)
    assert set(folder_tensors(target)) == set(load_file(lora_root / name / "base_model" / "model.safetensors"))
    torch.testing.assert_close(logits_of(model), expected_logits(lora_root, name), rtol=tol(name), atol=tol(name))


def test_both_writes_the_fused_model_and_the_adapter(exported, lora_root):
    name = FULL[0]
    result, target = exported[name, "both"]
    expected = expected_logits(lora_root, name)
    torch.testing.assert_close(logits_of(load(target)), expected, rtol=1e-5, atol=1e-5)
    peft_model = PeftModel.from_pretrained(load(lora_root / name / "base_model"), target / lora.ADAPTER_DIR)
    torch.testing.assert_close(logits_of(peft_model), expected, rtol=1e-5, atol=1e-5)
    assert [f.name for f in result.files] == ["model.safetensors", "lora_adapter/adapter_model.safetensors"]


def test_fused_weights_follow_the_formula(exported, lora_root):
    """W + (alpha/r)·B·A with the numbers the cases trained with: r=4, alpha=16; and in the patterns case layer 1's
    q_proj at r=2 (rank_pattern), v_proj at alpha=3 (alpha_pattern), the embedding's (B·A)ᵀ, lm_head trained whole."""
    ref = load_file(lora_root / FULL[0] / "expected" / "state_dict.safetensors")
    fused = folder_tensors(exported[FULL[0], "fuse"][1])
    p = "base_model.model.model.layers.1.self_attn.q_proj."
    want = ref[p + "base_layer.weight"] + 16 / 4 * ref[p + "lora_B.default.weight"] @ ref[p + "lora_A.default.weight"]
    torch.testing.assert_close(fused["model.layers.1.self_attn.q_proj.weight"], want, rtol=0, atol=1e-6)

    ref = load_file(lora_root / FULL[1] / "expected" / "state_dict.safetensors")
    fused = folder_tensors(exported[FULL[1], "fuse"][1])
    for module, scale in (("layers.0.self_attn.q_proj", 16 / 4), ("layers.1.self_attn.q_proj", 16 / 2),
                          ("layers.1.self_attn.v_proj", 3 / 4), ("layers.1.mlp.down_proj", 16 / 4)):
        p = f"base_model.model.model.{module}."
        a, b = ref[p + "lora_A.default.weight"], ref[p + "lora_B.default.weight"]
        torch.testing.assert_close(fused[f"model.{module}.weight"], ref[p + "base_layer.weight"] + scale * b @ a,
                                   rtol=0, atol=1e-6)
    p = "base_model.model.model.embed_tokens."
    want = ref[p + "base_layer.weight"] + 16 / 4 * (ref[p + "lora_embedding_B.default"] @ ref[p + "lora_embedding_A.default"]).T
    torch.testing.assert_close(fused["model.embed_tokens.weight"], want, rtol=0, atol=1e-6)
    assert torch.equal(fused["lm_head.weight"], ref["base_model.model.lm_head.modules_to_save.default.weight"])
    assert not torch.equal(fused["lm_head.weight"], ref["base_model.model.lm_head.original_module.weight"])


def peft_saved(spec: LoraSpec, case: FsdpCase) -> dict[str, tuple[int, ...]]:
    """What PEFT's own save_pretrained writes for this LoRA setup (names and shapes)."""
    model = get_peft_model(transformers.AutoModelForCausalLM.from_config(tiny_config(case)), lora_config(spec))
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}


@pytest.mark.parametrize("name", [*FULL, ONLY])
def test_adapter_files_are_what_peft_writes(name, exported):
    case = CASES[name]
    _, target = exported[name, "adapter"]
    with safe_open(target / lora.ADAPTER_DIR / "adapter_model.safetensors", "pt") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert written == peft_saved(case.lora, case)
    config = LoraConfig.from_pretrained(target / lora.ADAPTER_DIR)
    assert (config.r, config.lora_alpha, config.task_type) == (case.lora.r, case.lora.alpha, "CAUSAL_LM")
    assert set(config.target_modules) == set(case.lora.targets)
    assert config.lora_bias is case.lora.lora_bias
    assert set(config.modules_to_save or []) == set(case.lora.modules_to_save)


def test_lora_only_fuse_needs_the_base_model(lora_root, tmp_path):
    with pytest.raises(ConfigError, match="--base-model"):
        merge(actor_dir(lora_root, ONLY), tmp_path / "o", lora_mode="fuse", log=quiet)
    assert not (tmp_path / "o").exists()


def test_wrong_base_model_is_refused(lora_root, tmp_path):
    with pytest.raises(HubexportError, match="--base-model"):
        merge(actor_dir(lora_root, ONLY), tmp_path / "o", lora_mode="fuse", log=quiet,
              lora_base_model=lora_root / TIED / "base_model")  # a Qwen3 for a Qwen2 run


# ----------------------------------------------------------------------------------------------------------- refusals
def test_unknown_alpha_stops_with_how_to_pass_it(lora_root, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["merge", "--local-dir", str(actor_dir(lora_root, TIED)), "--target-dir", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "lora_alpha" in r.stderr and "--lora-alpha" in r.stderr and "--lora-rank" in r.stderr
    assert not (tmp_path / "o").exists()


def copy_actor(lora_root, name, tmp_path):
    dst = tmp_path / "actor"
    shutil.copytree(actor_dir(lora_root, name), dst)
    return dst


def test_alpha_zero_is_refused(lora_root, tmp_path):
    actor = copy_actor(lora_root, FULL[0], tmp_path)
    (actor / "lora_train_meta.json").write_text(json.dumps({"r": 4, "lora_alpha": 0, "task_type": "CAUSAL_LM"}))
    with pytest.raises(ConfigError, match="no effect"):
        merge(actor, tmp_path / "o", log=quiet)
    merge(actor, tmp_path / "o", lora_alpha=16, log=quiet)  # the flag overrides the file
    assert json.loads((tmp_path / "o" / lora.ADAPTER_DIR / "adapter_config.json").read_text())["lora_alpha"] == 16


def test_rank_that_contradicts_the_tensors_is_refused(lora_root, tmp_path):
    with pytest.raises(ConfigError, match="rows"):
        merge(actor_dir(lora_root, FULL[0]), tmp_path / "o", lora_rank=8, log=quiet)


def test_fusing_a_tied_embedding_is_refused(lora_root, tmp_path):
    with pytest.raises(ConfigError, match="tied"):
        merge(actor_dir(lora_root, TIED), tmp_path / "o", lora_mode="fuse", lora_alpha=16, log=quiet)


def test_lora_options_on_a_full_checkpoint_are_refused(lora_root, tmp_path):
    r = CliRunner().invoke(cli, ["merge", "--local-dir", str(actor_dir(lora_root, "qwen2_full_w1")), "--target-dir",
                                 str(tmp_path / "o"), "--lora", "fuse"])
    assert r.exit_code == 2 and "no LoRA tensors" in r.stderr


def test_cli_fuse_json_and_dry_run(lora_root, tmp_path):
    args = ["merge", "--local-dir", str(actor_dir(lora_root, FULL[0])), "--json", "--lora", "both"]
    r = CliRunner().invoke(cli, [*args, "--target-dir", str(tmp_path / "dry"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert [f["name"] for f in json.loads(r.stdout)["files"]] == ["model.safetensors", "lora_adapter/adapter_model.safetensors"]
    assert not (tmp_path / "dry").exists()
    r = CliRunner().invoke(cli, [*args, "--target-dir", str(tmp_path / "o"), "--lora-alpha", "16", "--lora-rank", "4"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)["lora"]
    assert summary["mode"] == "both" and summary["r"] == 4 and summary["lora_alpha"] == 16 and summary["modules"] == 14
    assert "LoRA: 14 module(s), r=4, lora_alpha=16" in r.stderr


def test_detect_does_not_import_lora() -> None:
    code = "import sys, hubexport.detect; assert 'hubexport.lora' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------ units, checked against PEFT
@pytest.mark.parametrize("module", ["model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj",
                                    "model.layers.0.mlp.down_proj", "model.embed_tokens", "lm_head"])
@pytest.mark.parametrize("patterns", [["layers.1.self_attn.q_proj"], ["q_proj", "down_proj"], [r"layers\.\d+\.mlp.*"],
                                      ["proj"], ["embed_tokens", "lm_head"], [r"model\.layers\.1\.self_attn\.q_proj"]])
def test_pattern_matching_is_peft_s(module, patterns):
    theirs = get_pattern_key(patterns, module)
    assert lora.pattern_key(patterns, module) == (theirs if theirs in patterns else None)


PEFT_SETUPS = {
    "verl": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "patterns_rslora": dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"down_proj": 2},
                            alpha_pattern={r"layers\.1\..*": 5}, use_rslora=True),
    "embedding_saved_bias_all": dict(target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"], bias="all"),
    "lora_bias_lora_only": dict(target_modules=["q_proj", "k_proj"], lora_bias=True, bias="lora_only"),
    "dora": dict(target_modules=["q_proj", "o_proj"], use_dora=True),
}


def peft_model(setup: str):
    torch.manual_seed(1)
    base = transformers.AutoModelForCausalLM.from_config(tiny_config(FsdpCase("unit")))
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **PEFT_SETUPS[setup])  # random B: a real delta
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # trained biases and modules_to_save copies differ from the base
        for name, p in model.named_parameters():
            if p.requires_grad and ("bias" in name or "modules_to_save" in name):
                p.add_(torch.randn_like(p))
    return model, cfg


@pytest.mark.parametrize("setup", list(PEFT_SETUPS))
def test_adapter_names_are_peft_s(setup):
    """The in-memory state dict is what verl saves; PEFT's saved names are what the adapter file must hold."""
    model, cfg = peft_model(setup)
    sd = model.state_dict()
    keys = lora.split_keys(sd)
    ours = {dst: sd[src] for src, dst in lora_views.adapter_names(keys, sd, cfg.bias).items()}
    theirs = get_peft_model_state_dict(model, save_embedding_layers=False)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("setup", [s for s in PEFT_SETUPS if s != "dora"])
def test_fusion_equals_peft_merge_and_unload(setup):
    model, cfg = peft_model(setup)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keys = lora.split_keys(sd)
    specs = {k: TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()}
    settings = lora.LoraSettings(r=cfg.r, lora_alpha=cfg.lora_alpha, rank_pattern=cfg.rank_pattern,
                                 alpha_pattern=cfg.alpha_pattern, use_rslora=cfg.use_rslora)
    recipes = lora_views.base_recipes(keys, keys.base, specs, settings, fuse=True)
    merged = model.merge_and_unload().state_dict()
    assert set(recipes) == set(merged)
    for name, recipe in recipes.items():
        torch.testing.assert_close(recipe.make(sd), merged[name], rtol=1e-6, atol=1e-6, msg=name)
    changed = [n for n in recipes if not torch.equal(recipes[n].make(sd), sd[keys.base[n]])]
    assert len(changed) >= len(keys.modules)  # every adapted weight moved (guards a silently skipped delta)


def test_dora_fusion_is_refused_with_a_way_out():
    model, _ = peft_model("dora")
    sd = model.state_dict()
    keys = lora.split_keys(sd)
    specs = {k: TensorSpec(k, tuple(v.shape), v.dtype) for k, v in sd.items()}
    with pytest.raises(ConfigError, match="--lora adapter"):
        lora_views.base_recipes(keys, keys.base, specs, lora.LoraSettings(r=4, lora_alpha=8), fuse=True)


def test_target_modules_never_select_an_unadapted_module():
    modules = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj")]
    assert lora_views.target_modules(modules, modules) == ["k_proj", "q_proj"]
    only_layer0 = [m for m in modules if ".0." in m]
    assert lora_views.target_modules(only_layer0, modules) == sorted(only_layer0)
