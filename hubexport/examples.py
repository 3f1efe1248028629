"""Real verl-style FSDP checkpoints made on CPU: a tiny random model trained one step under torch FSDP (gloo), saved
exactly as verl's FSDPCheckpointManager saves it. Used by `hubexport demo`, the tests and the benchmarks."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("qwen2", "llama", "qwen3", "qwen3_moe", "deepseek_v3")
PROMPT = [[3, 17, 42, 5, 99, 12, 7, 64]]  # fixed input for logits comparisons


@dataclass(frozen=True)
class LoraSpec:
    """A PEFT LoRA run as verl makes one (get_peft_model before FSDP), with the knobs PEFT offers beyond verl's."""

    r: int = 4
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, int], ...] = ()
    modules_to_save: tuple[str, ...] = ()
    bias: str = "none"  # PEFT's: none | all | lora_only
    lora_bias: bool = False
    only: bool = False  # verl's checkpoint.save_lora_only: keep only keys containing "lora_"
    meta: str = "train_meta"  # train_meta: lora_train_meta.json; adapter_config: legacy lora_adapter/; none


def lora_config(spec: LoraSpec):  # -> peft.LoraConfig
    from peft import LoraConfig

    return LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.targets), rank_pattern=dict(spec.rank_pattern),
        alpha_pattern=dict(spec.alpha_pattern), modules_to_save=list(spec.modules_to_save) or None, bias=spec.bias,
        lora_bias=spec.lora_bias, lora_dropout=0.0, task_type="CAUSAL_LM",
    )


@dataclass(frozen=True)
class FsdpCase:
    """One checkpoint to make. fsdp=0 saves an unwrapped model (plain tensors, as verl does at world size 1)."""

    name: str
    family: str = "qwen2"
    fsdp: int = 2
    world_size: int = 2
    hsdp: bool = False  # mesh ("ddp", "fsdp") of shape (2, W // 2)
    tied: bool = False
    dtype: str = "float32"
    critic: bool = False
    legacy: bool = False  # no fsdp_config.json, config and tokenizer at the actor root (verl <= 0.4.0)
    vocab_size: int = 128  # odd sizes force FSDP2's placement fn onto dim 1 for the embeddings
    hidden_size: int = 32
    layers: int = 2
    seed: int = 0
    intermediate_size: int | None = None  # default 2 × hidden
    reference: bool = True  # train one step and save the full state dict and logits (off for big benchmarks)
    lora: LoraSpec | None = None
    save_base: bool = False  # keep the initial model as <name>/base_model, named by huggingface/config.json


def tiny_config(case: FsdpCase):  # -> transformers.PretrainedConfig
    import transformers

    common = dict(
        vocab_size=case.vocab_size, hidden_size=case.hidden_size,
        intermediate_size=case.intermediate_size or 2 * case.hidden_size,
        num_hidden_layers=case.layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=case.tied, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if case.family == "qwen2":
        cfg = transformers.Qwen2Config(**common)
    elif case.family == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif case.family == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=case.hidden_size // 4, **common)
    elif case.family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            head_dim=case.hidden_size // 4, moe_intermediate_size=case.hidden_size // 2, num_experts=4,
            num_experts_per_tok=2, decoder_sparse_step=1, **common,
        )
    elif case.family == "deepseek_v3":  # MLA, a dense first layer, and a persistent fp32 buffer FSDP never shards
        common["num_key_value_heads"] = 4
        cfg = transformers.DeepseekV3Config(
            moe_intermediate_size=case.hidden_size // 2, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8, n_group=1, topk_group=1, **common,
        )
    else:
        raise ValueError(f"unknown family {case.family!r}; choose from {FAMILIES}")
    # verl keeps the actor's `*ForCausalLM` in a critic's saved config: reproduce that.
    cfg.architectures = [type(cfg).__name__.removesuffix("Config") + "ForCausalLM"]
    cfg.dtype = getattr(torch, case.dtype)
    return cfg


def tiny_tokenizer(vocab_size: int):  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {f"w{i}": i for i in range(4, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def build_model(case: FsdpCase, **config: Any):
    """The case's tiny random model; `config` sets extra config attributes (e.g. Llama's mlp_bias)."""
    import transformers

    torch.manual_seed(case.seed)
    cfg = tiny_config(case)
    cfg.update(config)
    auto = transformers.AutoModelForCausalLM
    if case.critic:
        cfg.num_labels = 1
        auto = transformers.AutoModelForTokenClassification
    model = auto.from_config(cfg, dtype=getattr(torch, case.dtype))
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # zeros at init: give the de-duplication real values to check
            buf.copy_(torch.randn_like(buf))
    return cfg, model


def _train_step(model, critic: bool, lr: float = 1e-2) -> None:
    """One AdamW step so the saved weights differ from any fresh initialisation."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.tensor(PROMPT)
    out = model(input_ids=ids) if critic else model(input_ids=ids, labels=ids)
    loss = out.logits.float().pow(2).mean() if critic else out.loss
    loss.backward()
    opt.step()
    opt.zero_grad()


def _shard_placement_fn(fsdp_size: int):
    """verl's `get_shard_placement_fn`: the first dim divisible by the FSDP size, else dim 0."""
    from torch.distributed.tensor import Shard

    def fn(param):
        for i, size in enumerate(param.shape):
            if size % fsdp_size == 0:
                return Shard(i)
        return Shard(0)

    return fn


def _wrap(model, case: FsdpCase):
    from torch.distributed.device_mesh import init_device_mesh

    if case.hsdp:
        mesh = init_device_mesh("cpu", (2, case.world_size // 2), mesh_dim_names=("ddp", "fsdp"))
    else:
        mesh = init_device_mesh("cpu", (case.world_size,), mesh_dim_names=("fsdp",))
    layers = _decoder_layers(model)
    layer_cls = type(layers[0])
    if case.fsdp == 2:
        from torch.distributed.fsdp import fully_shard

        fsdp_size = case.world_size // 2 if case.hsdp else case.world_size
        for layer in layers:
            fully_shard(layer, mesh=mesh, shard_placement_fn=_shard_placement_fn(fsdp_size))
        fully_shard(model, mesh=mesh, shard_placement_fn=_shard_placement_fn(fsdp_size))
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return FSDP(
        model, auto_wrap_policy=ModuleWrapPolicy({layer_cls}), device_id=torch.device("cpu"), device_mesh=mesh,
        sharding_strategy=ShardingStrategy.HYBRID_SHARD if case.hsdp else ShardingStrategy.FULL_SHARD,
        use_orig_params=True,
    )


def _decoder_layers(model):
    inner = model.get_base_model() if hasattr(model, "peft_config") else model  # a PeftModel wraps the HF model
    return inner.model.layers


def _sharded_state_dict(model, case: FsdpCase) -> dict:
    if case.fsdp != 1:
        return model.state_dict()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardedStateDictConfig, StateDictType

    with FSDP.state_dict_type(model, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig(offload_to_cpu=False)):
        return model.state_dict()


def _save_reference(expected: Path, full: dict[str, torch.Tensor], logits: torch.Tensor, case: FsdpCase) -> None:
    from safetensors.torch import save_file

    expected.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in full.items()}, expected / "state_dict.safetensors")
    torch.save(logits, expected / "logits.pt")
    (expected / "case.json").write_text(json.dumps(asdict(case), indent=2))


def _save_hf_dir(hf_dir: Path, cfg, case: FsdpCase) -> None:
    from transformers import GenerationConfig

    hf_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(hf_dir)
    tiny_tokenizer(case.vocab_size).save_pretrained(hf_dir)
    if not case.critic:
        GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, do_sample=True, temperature=0.7).save_pretrained(
            hf_dir)


def _name_model(hf_dir: Path, base: Path) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "_name_or_path": str(base.resolve())}, indent=2) + "\n")


def _full_state_and_logits(model, case: FsdpCase) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    if case.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    else:
        full = model.state_dict()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROMPT)).logits.float()
    return full, logits


def make_case(case: FsdpCase, out: Path, rank: int = 0) -> None:
    """Train and save one case; call on every rank (inside a gloo process group when case.fsdp > 0)."""
    cfg, model = build_model(case)
    step_dir = out / case.name / "global_step_1"
    actor = step_dir / "actor"
    if case.lora:
        model = _peft_wrap(model, case, out / case.name / "base_model", rank)
    elif case.save_base and rank == 0:
        model.save_pretrained(out / case.name / "base_model")
    if case.fsdp:
        model = _wrap(model, case)
    if case.reference:
        _train_step(model, case.critic, lr=5e-2 if case.lora else 1e-2)
        full, logits = _full_state_and_logits(model, case)
    sharded = _sharded_state_dict(model, case) if case.fsdp else model.state_dict()
    if case.lora and case.lora.only:  # verl's save_lora_only filter
        sharded = {k: v for k, v in sharded.items() if "lora_" in k or ".adapter_" in k}
    if rank == 0:
        actor.mkdir(parents=True, exist_ok=True)
    _barrier(case)
    torch.save(sharded, actor / f"model_world_size_{case.world_size}_rank_{rank}.pt")
    torch.save({"state": {}, "param_groups": []}, actor / f"optim_world_size_{case.world_size}_rank_{rank}.pt")
    torch.save({"lr_scheduler": None, "rng": {"cpu": torch.get_rng_state()}},
               actor / f"extra_state_world_size_{case.world_size}_rank_{rank}.pt")
    if rank == 0:
        _save_hf_dir(actor if case.legacy else actor / "huggingface", cfg, case)
        if case.save_base:  # what verl's saved config says under transformers 4.x: the model the run loaded
            _name_model(actor if case.legacy else actor / "huggingface", out / case.name / "base_model")
        if not case.legacy:
            (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": case.fsdp or 2,
                                                                 "world_size": case.world_size}))
        (out / case.name / "latest_checkpointed_iteration.txt").write_text("1")
        if case.reference:
            _save_reference(out / case.name / "expected", full, logits, case)
        if case.lora:
            _save_lora_meta(actor, model, case.lora)
    _barrier(case)


def _peft_wrap(model, case: FsdpCase, base_dir: Path, rank: int):
    """verl applies get_peft_model to the HF model before FSDP. The untouched base goes to `base_dir` first (the
    `--base-model` of a LoRA-only export)."""
    from peft import get_peft_model

    if rank == 0:
        model.save_pretrained(base_dir)
    assert case.lora is not None
    # PEFT upcasts adapters to fp32 by default; FSDP1 flattens one dtype per unit, so keep the model's (as verl's bf16
    # runs do by casting after wrapping).
    return get_peft_model(model, lora_config(case.lora), autocast_adapter_dtype=False)


def _save_lora_meta(actor: Path, model, spec: LoraSpec) -> None:
    """What verl records of the LoRA settings: lora_train_meta.json (>= 2026-05), or the legacy workers' adapter
    folder with PEFT's own adapter_config.json."""
    if spec.meta == "train_meta":
        (actor / "lora_train_meta.json").write_text(json.dumps({"r": spec.r, "lora_alpha": spec.alpha,
                                                                "task_type": "CAUSAL_LM"}))
    elif spec.meta == "adapter_config":
        inner = getattr(model, "module", model)  # FSDP1 wraps the PeftModel
        inner.peft_config["default"].save_pretrained(actor / "lora_adapter")


def _barrier(case: FsdpCase) -> None:
    if case.fsdp:
        torch.distributed.barrier()


def _worker(rank: int, world_size: int, init_file: str, make: Callable[[Any, Path, int], None], cases: list,
            out: str) -> None:
    import transformers

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()  # save_pretrained of a base model, in a worker
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        for case in cases:
            make(case, Path(out), rank)
    finally:
        torch.distributed.destroy_process_group()


def spawn_ranks(make: Callable[[Any, Path, int], None], cases: list, world_size: int, out: Path) -> None:
    """`make(case, out, rank)` for every case in `world_size` real processes (gloo, a file rendezvous)."""
    with tempfile.TemporaryDirectory() as d:
        torch.multiprocessing.start_processes(
            _worker, args=(world_size, os.path.join(d, "rendezvous"), make, cases, str(out)), nprocs=world_size,
            start_method="spawn",
        )


def make_checkpoints(cases: list[FsdpCase], out: Path) -> None:
    """Make every case, running the FSDP ones in real processes (one spawn per world size)."""
    out.mkdir(parents=True, exist_ok=True)
    for case in [c for c in cases if not c.fsdp]:
        make_case(case, out)
    by_world: dict[int, list[FsdpCase]] = {}
    for case in cases:
        if case.fsdp:
            by_world.setdefault(case.world_size, []).append(case)
    for world_size, group in sorted(by_world.items()):
        spawn_ranks(make_case, group, world_size, out)
