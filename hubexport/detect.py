"""'What is this directory?' → a Layout: format, version, the files it needs, world size or parallel sizes.
Reads directory listings and small JSON files only, never tensors."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hubexport.errors import CheckpointError, ConfigError
from hubexport.jsonfile import read_json_object

FSDP_MODEL_RE = re.compile(r"^model_world_size_(\d+)_rank_(\d+)\.pt$")
# verl, DeepSpeed, NeMo RL, NeMo Automodel, torchtitan, HF Trainer
STEP_RE = re.compile(r"(?:global_step_?|(?:epoch_\d+_)?step_|step-|checkpoint-)(\d+)")


@dataclass
class Layout:
    format: str  # "fsdp" | "megatron" | "dcp" | "deepspeed" | "hf"
    version: str  # fsdp: "fsdp1" | "fsdp2" | "legacy"; megatron: "v0" | "v1" | "v2" | "mbridge"; dcp: see DCP_LAYOUTS
    root: Path  # the actor (or critic) directory
    hf_dir: Path | None  # where config.json and the tokenizer live
    files: list[Path] = field(default_factory=list)  # the weight files the source reads
    parallel: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    adapter: Path | None = None  # Megatron PEFT: adapter_checkpoint/, or the ckpt_contents.json that says peft

    @property
    def global_step(self) -> int | None:
        for part in reversed(self.root.resolve().parts):
            m = STEP_RE.fullmatch(part)
            if m:
                return int(m.group(1))
        return None


def is_hf_folder(path: Path) -> bool:
    """A save_pretrained-style folder (what merge writes), as opposed to a training checkpoint."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors")) and not _is_checkpoint_dir(path)


def _is_checkpoint_dir(d: Path) -> bool:
    return (
        any(FSDP_MODEL_RE.match(p.name) for p in d.iterdir() if p.is_file())
        or (d / "dist_ckpt").is_dir()
        or (d / "model" / "dist_ckpt").is_dir()
        or (d / "ckpt_contents.json").is_file()
        or (d / "adapter_checkpoint").is_dir()
        or any(p.name.startswith("mp_rank_") for p in (d / "model").glob("mp_rank_*"))
        or find_dcp(d) is not None
        or _is_deepspeed(d)
    )


def _is_deepspeed(d: Path) -> bool:
    from hubexport.detect_deepspeed import is_deepspeed_dir

    return is_deepspeed_dir(d)


def resolve_checkpoint_dir(path: Path) -> tuple[Path, list[str]]:
    """Accept the actor dir itself, a `global_step_N` dir, or the run root with `latest_checkpointed_iteration.txt`."""
    path = Path(path)
    notes: list[str] = []
    if not path.exists():
        raise CheckpointError(f"{path} does not exist", hint="pass --local-dir the path of global_step_N/actor")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a checkpoint directory", hint="pass the directory that holds it")
    latest = path / "latest_checkpointed_iteration.txt"
    if not _is_checkpoint_dir(path) and latest.is_file():
        text = latest.read_bytes()[:64].decode("ascii", errors="replace").strip()
        if not text.isdigit():
            raise CheckpointError(f"{latest} does not hold a step number: {text[:40]!r}", hint="pass global_step_N/actor")
        step_dir = path / f"global_step_{int(text)}"
        if not step_dir.is_dir():
            raise CheckpointError(f"{latest} points at {step_dir.name}, which is missing", hint="pass an existing step")
        notes.append(f"{latest.name} says step {int(text)}: using {step_dir}")
        path = step_dir
    if not _is_checkpoint_dir(path):
        roles = [r for r in ("actor", "critic", "_actor", "_critic") if (path / r).is_dir() and _is_checkpoint_dir(path / r)]
        if roles:
            other = f" (pass {path / roles[1]} for the critic)" if len(roles) > 1 else ""
            notes.append(f"using {path / roles[0]}{other}")
            return path / roles[0], notes
    return path, notes


def _hf_dir(root: Path) -> Path | None:
    for cand in (root / "huggingface", root / "model" / "huggingface", root):
        if (cand / "config.json").is_file():
            return cand
    return None


def detect_fsdp(root: Path) -> Layout | None:
    ranks: dict[int, dict[int, Path]] = {}
    for p in root.iterdir():
        m = FSDP_MODEL_RE.match(p.name)
        if m:
            ranks.setdefault(int(m.group(1)), {})[int(m.group(2))] = p
    if not ranks:
        return None
    if len(ranks) > 1:
        sizes = ", ".join(str(w) for w in sorted(ranks))
        raise CheckpointError(
            f"{root} holds rank files of several world sizes ({sizes})",
            hint="two runs were copied into one directory; keep the files of one world size only",
        )
    (world_size, files), = ranks.items()
    cfg_path = root / "fsdp_config.json"
    version = "legacy"
    if cfg_path.is_file():
        cfg = read_json_object(cfg_path)
        declared = cfg.get("world_size")
        if declared is not None and declared != world_size:
            raise CheckpointError(
                f"{cfg_path} says world_size={declared} but the rank files are model_world_size_{world_size}_rank_*.pt",
                hint="the directory mixes two checkpoints, or fsdp_config.json was edited by hand; fix whichever is wrong",
            )
        version = {1: "fsdp1", 2: "fsdp2"}.get(cfg.get("FSDP_version"), "legacy")
    for r in range(world_size):
        if r not in files:
            raise CheckpointError(
                f"rank file {root / f'model_world_size_{world_size}_rank_{r}.pt'} is missing",
                hint="the checkpoint is incomplete; re-copy it, or point --local-dir at a complete global_step_N/actor",
            )
    extra = sorted(r for r in files if r >= world_size)
    if extra:
        raise CheckpointError(
            f"{files[extra[0]]} has rank {extra[0]} but the world size is {world_size}",
            hint="remove the stray rank file",
        )
    return Layout(
        format="fsdp",
        version=version,
        root=root,
        hf_dir=_hf_dir(root),
        files=[files[r] for r in range(world_size)],
        parallel={"world_size": world_size},
    )


MP_RANK_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")


def _megatron_hf_dir(root: Path) -> Path | None:
    for cand in (root / "model" / "huggingface", root / "huggingface", root / "hf_config_and_tokenizer", root):
        if (cand / "config.json").is_file():
            return cand
    return None


def _parallel_from_config(root: Path) -> dict[str, int]:
    """verl writes asdict(TransformerConfig) next to the checkpoint: the training layout, for reporting and v0."""
    path = root / "transformer_config.json"
    if not path.is_file():
        return {}
    cfg = read_json_object(path)
    out = {}
    for short, key in (("tp", "tensor_model_parallel_size"), ("pp", "pipeline_model_parallel_size"),
                       ("ep", "expert_model_parallel_size"), ("vpp", "virtual_pipeline_model_parallel_size"),
                       ("etp", "expert_tensor_parallel_size"), ("cp", "context_parallel_size")):
        if isinstance(cfg.get(key), int):
            out[short] = cfg[key]
    return out


def _has_hf_weights(hf_dir: Path | None) -> bool:
    return hf_dir is not None and any(hf_dir.glob("*.safetensors"))


def _dist_has_model(dist: Path) -> bool:
    from hubexport.sources.mcore import model_tensor_keys  # reads the .metadata pickle only, never tensor bytes

    return bool(model_tensor_keys(dist))


def _detect_v0(root: Path) -> Layout | None:
    mp = sorted(p for p in (root / "model").glob("mp_rank_*") if p.is_dir()) if (root / "model").is_dir() else []
    if not mp:
        return None
    parallel = _parallel_from_config(root)
    notes = []
    ranks: dict[tuple[int, int, int], Path] = {}
    for d in mp:
        m = MP_RANK_RE.match(d.name)
        if not m:
            raise CheckpointError(f"{d} is not an mp_rank_TT[_PPP][_EEE] directory", hint="remove the stray folder")
        if not (d / "model.pt").is_file():
            raise CheckpointError(f"{d / 'model.pt'} is missing", hint="the v0 checkpoint is incomplete; re-copy it")
        tp, a, b = int(m.group(1)), m.group(2), m.group(3)
        if b is not None:
            pp, ep = int(a), int(b)
        elif a is not None and parallel.get("pp", 0) <= 1 and parallel.get("ep", 1) > 1:
            pp, ep = 0, int(a)  # mp_rank_TT_EEE: PP == 1 with EP > 1 (ambiguous by name; transformer_config says so)
        else:
            pp, ep = (int(a) if a is not None else 0), 0
            note = "no transformer_config.json: reading mp_rank_TT_NNN as TT=tensor, NNN=pipeline rank"
            if a is not None and not parallel and note not in notes:
                notes.append(note)
        ranks[(tp, pp, ep)] = d / "model.pt"
    sizes = {k: max(r[i] for r in ranks) + 1 for i, k in enumerate(("tp", "pp", "ep"))}
    for t in range(sizes["tp"]):
        for p in range(sizes["pp"]):
            for e in range(sizes["ep"]):
                if (t, p, e) not in ranks:
                    raise CheckpointError(
                        f"rank tp={t} pp={p} ep={e} has no mp_rank_* directory under {root / 'model'}",
                        hint="the v0 checkpoint is incomplete; re-copy it")
    files = [ranks[k] for k in sorted(ranks)]
    return Layout(format="megatron", version="v0", root=root, hf_dir=_megatron_hf_dir(root), files=files,
                  parallel={**parallel, **sizes}, notes=notes)


def megatron_adapter(root: Path) -> Path | None:
    """Megatron PEFT runs save LoRA in `adapter_checkpoint/` (v1) or mark it in ckpt_contents.json (v2)."""
    adapter_dir = root / "adapter_checkpoint"
    if adapter_dir.is_dir() and any(adapter_dir.glob("*_adapter.pt")):
        return adapter_dir
    contents = root / "ckpt_contents.json"
    if contents.is_file():
        backend = read_json_object(contents).get("backend") or {}
        if isinstance(backend, dict) and backend.get("peft"):
            return contents
    return None


def _adapter_layout(root: Path, adapter: Path, hf_dir: Path | None, parallel: dict[str, int]) -> Layout:
    """verl <= 0.8 without use_dist_checkpointing: the adapters exist only in adapter_checkpoint/'s rank files and
    the base weights only in the model the run started from (--base-model)."""
    from hubexport.sources.mcore_adapter import adapter_files

    files = adapter_files(adapter, parallel)
    notes = [f"Megatron LoRA adapters from {len(files)} rank file(s) in {adapter}; the torch_dist holds no base weights"]
    if _has_hf_weights(hf_dir):
        notes.append(f"the safetensors in {hf_dir} are not used as the base (mbridge may have merged the LoRA into "
                     "them): pass --base-model")
    return Layout(format="megatron", version="v1-adapter", root=root, hf_dir=hf_dir, files=files,
                  parallel=parallel, notes=notes, adapter=adapter)


def detect_megatron(root: Path) -> Layout | None:
    """Megatron layouts: v0 `model/mp_rank_*`, v1 `dist_ckpt/`, v2 `model/dist_ckpt/` (+ ckpt_contents.json), and
    mbridge (model weights as HF safetensors in huggingface/, dist_ckpt without model tensors). A PEFT checkpoint is
    reported as such before its base weights are looked at: whoever opens it must not export the base alone."""
    v2 = (root / "model" / "dist_ckpt").is_dir() or (root / "ckpt_contents.json").is_file()
    dist = root / "model" / "dist_ckpt" if v2 else root / "dist_ckpt"
    adapter = megatron_adapter(root)
    if not dist.is_dir() and not v2 and adapter is None:
        return _detect_v0(root)
    hf_dir = _megatron_hf_dir(root)
    parallel = _parallel_from_config(root)
    if v2 and (root / "ckpt_contents.json").is_file():
        contents = read_json_object(root / "ckpt_contents.json")
        if isinstance(contents.get("world_size"), int):
            parallel.setdefault("world_size", contents["world_size"])
    version = "v2" if v2 else "v1"
    notes: list[str] = []
    complete = dist.is_dir() and (dist / "metadata.json").is_file() and (dist / ".metadata").is_file()
    if complete and _dist_has_model(dist):
        if _has_hf_weights(hf_dir):
            notes.append(f"{hf_dir} also holds safetensors; converting from {dist} (the training state)")
        return Layout(format="megatron", version=version, root=root, hf_dir=hf_dir, files=[dist],
                      parallel=parallel, notes=notes, adapter=adapter)
    if adapter is not None and adapter.is_dir():
        return _adapter_layout(root, adapter, hf_dir, parallel)
    if adapter is not None:
        raise CheckpointError(
            f"{root} is a Megatron LoRA checkpoint ({adapter.name}) whose {dist.relative_to(root)}/ holds no "
            "adapter tensors",
            hint="exporting only its base weights would drop the training; re-copy the whole step folder "
                 "(verl >= 0.9 saves the adapters in model/dist_ckpt/)",
        )
    if _has_hf_weights(hf_dir):
        why = "holds no model tensors" if complete else "is absent or incomplete"
        notes.append(f"mbridge checkpoint: model weights are already HF safetensors in {hf_dir} ({dist.name} {why}); "
                     "validating and re-sharding them")
        return Layout(format="megatron", version="mbridge", root=root, hf_dir=hf_dir, files=[hf_dir],
                      parallel=parallel, notes=notes)
    if not dist.is_dir():
        raise CheckpointError(f"{root} has neither {dist.relative_to(root)}/ nor HF weights in huggingface/",
                              hint="the checkpoint holds no model weights; check checkpoint.save_contents")
    if not complete:
        missing = "metadata.json" if not (dist / "metadata.json").is_file() else ".metadata"
        raise CheckpointError(f"{dist / missing} is missing: the torch_dist save did not finish",
                              hint="use an earlier global_step_N, or re-copy the directory if the copy was cut short")
    raise CheckpointError(
        f"{dist} holds no model tensors and {hf_dir or root / 'huggingface'} has no safetensors",
        hint="this checkpoint saved optimizer/RNG state only (verl mbridge default without HF weights); "
             "add 'model' to checkpoint.save_contents, or use a step that saved the model",
    )


def detect_megatron_fsdp(root: Path) -> Layout | None:
    """Megatron-FSDP's `fsdp_dtensor` save in verl's `model/dist_ckpt/` (or v1's `dist_ckpt/`): plain torch DCP, with
    none of torch_dist's `common.pt` (written first) and `metadata.json` (written last); `.metadata` comes last."""
    dist = next((d for d in (root / "model" / "dist_ckpt", root / "dist_ckpt") if d.is_dir()), None)
    if dist is None or (dist / "common.pt").exists() or (dist / "metadata.json").exists():
        return None
    writers = {int(m.group(1)) for p in dist.iterdir() if (m := DISTCP_RE.match(p.name))}
    if not writers and not (dist / ".metadata").is_file():
        return None
    if not (dist / ".metadata").is_file():
        raise CheckpointError(f"{dist / '.metadata'} is missing: the Megatron-FSDP save did not finish",
                              hint="use an earlier global_step_N, or re-copy the directory if the copy was cut short")
    parallel = {**_parallel_from_config(root), "world_size": len(writers)}
    if parallel.get("pp", 1) > 1:
        raise CheckpointError(f"{root / 'transformer_config.json'} says pipeline_model_parallel_size="
                              f"{parallel['pp']}: Megatron-FSDP's state dict numbers layers per stage",
                              hint="export a checkpoint trained with pipeline_model_parallel_size=1")
    hf_dir, cfg = _megatron_hf_dir(root), root / "transformer_config.json"
    notes = [f"{hf_dir} also holds safetensors; converting from {dist} (the training state)"] * _has_hf_weights(hf_dir)
    notes += ["Megatron-FSDP saved this bf16/fp16 run's fp32 main weights: --dtype bfloat16 (or float16) writes the "
              "training dtype"] * (cfg.is_file() and any(read_json_object(cfg).get(k) is True for k in ("bf16", "fp16")))
    return Layout("megatron", "fsdp_dtensor", root, hf_dir, files=[dist], parallel=parallel, notes=notes)


# torch DCP of a model state dict: where producers put the folder, relative to what a user points at (accelerate's
# checkpoint-N/, NeMo RL's step_N/ or policy/, NeMo Automodel's epoch_E_step_N/, torch's consolidating writer).
DCP_SUBDIRS = ("pytorch_model_fsdp_0", "policy/weights", "weights", "model", "sharded")
DISTCP_RE = re.compile(r"^__(\d+)_\d+\.distcp$")
ST_SHARD_RE = re.compile(r"^shard-(\d+)-model-\d+-of-\d+\.safetensors$")


def _dcp_writers(d: Path) -> tuple[str, set[int]] | None:
    """("torch" | "safetensors", the writer ranks in the file names) for a DCP folder, else None."""
    if not d.is_dir():
        return None
    for storage, pattern in (("torch", DISTCP_RE), ("safetensors", ST_SHARD_RE)):
        ranks = {int(m.group(1)) for p in d.iterdir() if (m := pattern.match(p.name))}
        if ranks or (storage == "torch" and (d / ".metadata").is_file()):
            return storage, ranks
    return None


def find_dcp(root: Path) -> Path | None:
    return next((d for d in (root, *(root / s for s in DCP_SUBDIRS)) if _dcp_writers(d)), None)


def _dcp_version(d: Path, storage: str) -> str:
    if d.name == "model":
        producer = "automodel"
    elif re.fullmatch(r"pytorch_model_fsdp_\d+", d.name):
        producer = "accelerate"
    elif d.name == "weights" and d.parent.name == "policy":
        producer = "nemo-rl"
    else:
        producer = "torchtitan" if re.fullmatch(r"step-\d+", d.name) else ""
    return "-".join(filter(None, (producer, "safetensors" if storage == "safetensors" else ""))) or "dcp"


def _consolidated_copy(dcp: Path) -> Path | None:
    """The full HF copy a producer may save beside the shards (Automodel's consolidated/, torch's parent dir)."""
    for d in (dcp / "consolidated", dcp.parent if dcp.name == "sharded" else None):
        if d is not None and any(d.glob("model*.safetensors")):
            return d
    return None


def detect_dcp(root: Path) -> Layout | None:
    """torch DCP of a model state dict, torch.save-serialised (`.metadata` + `__R_S.distcp`) or safetensors-serialised
    (`shard-R-model-X-of-Y.safetensors`); see DCP_SUBDIRS for where producers put it."""
    dcp = find_dcp(root)
    if dcp is None:
        return None
    storage, writers = _dcp_writers(dcp)  # type: ignore[misc]
    if (dcp / "metadata.json").is_file():
        raise CheckpointError(f"{dcp} is a Megatron torch_dist folder",
                              hint=f"pass the directory above it ({dcp.parent}) so its config is found too")
    if storage == "torch" and not (dcp / ".metadata").is_file():
        raise CheckpointError(f"{dcp / '.metadata'} is missing: the DCP save did not finish",
                              hint="use an earlier checkpoint, or re-copy the directory if the copy was cut short")
    looked = list(dict.fromkeys((dcp / "huggingface", root / "huggingface", dcp / "consolidated", dcp, root,
                                 dcp.parent)))
    hf_dir = next((d for d in looked if (d / "config.json").is_file()), None)
    if hf_dir is None:
        raise ConfigError(
            f"no config.json beside the DCP checkpoint {dcp}: looked in {', '.join(map(str, looked))}",
            hint=f"torch DCP holds no model config: copy the trained model's config.json (and tokenizer) into {looked[0]}",
        )
    copy = _consolidated_copy(dcp)
    notes = [f"{copy} also holds a consolidated copy; converting from the shards in {dcp} (the training state)"] \
        if copy else []
    return Layout(format="dcp", version=_dcp_version(dcp, storage), root=root, hf_dir=hf_dir, files=[dcp],
                  parallel={"world_size": len(writers)} if writers else {}, notes=notes)


def detect(path: Path, backend: str = "auto") -> Layout:
    root, notes = resolve_checkpoint_dir(Path(path))
    from hubexport.detect_deepspeed import detect_deepspeed

    detectors = {"fsdp": [detect_fsdp], "megatron": [detect_megatron_fsdp, detect_megatron], "dcp": [detect_dcp],
                 "megatron-fsdp": [detect_megatron_fsdp], "deepspeed": [detect_deepspeed],
                 "auto": [detect_fsdp, detect_megatron_fsdp, detect_megatron, detect_dcp, detect_deepspeed]}
    if backend not in detectors:
        raise CheckpointError(f"unknown backend {backend!r}",
                              hint="use --backend auto, fsdp, megatron, megatron-fsdp, dcp or deepspeed")
    for fn in detectors[backend]:
        layout = fn(root)
        if layout is not None:
            layout.notes[:0] = notes
            return layout
    what = {"auto": "a verl FSDP, Megatron, torch DCP or DeepSpeed checkpoint", "fsdp": "a verl FSDP checkpoint",
            "megatron": "a Megatron checkpoint", "dcp": "a torch DCP checkpoint",
            "megatron-fsdp": "a Megatron-FSDP fsdp_dtensor checkpoint",
            "deepspeed": "a DeepSpeed ZeRO checkpoint"}[backend]
    raise CheckpointError(
        f"{root} is not {what}: no model_world_size_*_rank_*.pt, dist_ckpt/, model/ or .metadata found",
        hint="point --local-dir at global_step_N/actor (or the run root holding latest_checkpointed_iteration.txt)",
    )
