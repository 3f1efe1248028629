"""DeepSpeed ZeRO checkpoints: the folder `engine.save_checkpoint(save_dir)` wrote (`latest`, `global_stepN/`, the
transformers Trainer's `checkpoint-N/`, OpenRLHF's `ckpt/_actor/`) or a `global_stepN/` itself → a Layout. Reads file
names, `latest`, and rank 0's optimizer pickle for the ZeRO stage (memory-mapped: no tensor bytes)."""

from __future__ import annotations

import re
from pathlib import Path

from hubexport.detect import Layout
from hubexport.errors import CheckpointError, ConfigError

OPTIM_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
MODEL3_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")  # ZeRO 3: one per rank
MODEL12_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")  # ZeRO 1/2: written by data-parallel rank 0
PIPE_RE = re.compile(r"^layer_\d+-model_\d+-model_states\.pt$")  # pipeline-parallel engines
RECOPY = "re-copy the whole global_stepN folder"


def is_tag_dir(d: Path) -> bool:
    return d.is_dir() and any(OPTIM_RE.match(p.name) or MODEL3_RE.match(p.name) or MODEL12_RE.match(p.name)
                              for p in d.iterdir())


def is_deepspeed_dir(d: Path) -> bool:
    """A global_stepN/ folder, or the folder save_checkpoint was given (it holds one)."""
    return is_tag_dir(d) or (d.is_dir() and any(is_tag_dir(c) for c in d.iterdir() if c.is_dir()))


def _tag_dir(root: Path) -> Path:
    if is_tag_dir(root):
        return root
    latest = root / "latest"
    tags = sorted((c for c in root.iterdir() if is_tag_dir(c)), key=lambda c: c.stat().st_mtime)
    if not latest.is_file():
        raise CheckpointError(
            f"{latest} is missing: the DeepSpeed save did not finish (save_checkpoint writes it last)",
            hint=f"pass the global_stepN folder itself if you know it is complete (e.g. {tags[-1]})")
    tag = latest.read_bytes()[:256].decode("utf-8", errors="replace").strip()
    tag_dir = root / tag
    if not tag or "/" in tag or tag in (".", "..") or not tag_dir.is_dir():
        raise CheckpointError(f"{latest} names {tag[:60]!r}, which is not a folder in {root}",
                              hint="the save did not finish or the copy is incomplete; pass an existing global_stepN")
    return tag_dir


def _by_rank(tag_dir: Path, pattern: re.Pattern[str], rank_group: int) -> dict[int, Path]:
    return {int(m.group(rank_group)): p for p in tag_dir.iterdir() if (m := pattern.match(p.name))}


def _check_ranks(tag_dir: Path, ranks: dict[int, Path], world_size: int, example: str) -> None:
    for r in range(world_size):
        if r not in ranks:
            raise CheckpointError(f"rank file {tag_dir / example.format(r)} is missing",
                                  hint=f"the save did not finish or the copy is incomplete; {RECOPY}")
    extra = sorted(set(ranks) - set(range(world_size)))
    if extra:
        raise CheckpointError(f"{ranks[extra[0]]} has rank {extra[0]} but the save has {world_size} ranks",
                              hint="files of two saves were mixed; keep one run's files")


def _files(tag_dir: Path) -> tuple[list[Path], list[Path]]:
    """(model state files, optimizer files), by rank, checked complete and of one save."""
    names = [p.name for p in tag_dir.iterdir()]
    mp = sorted({int(m.group(3)) for n in names if (m := OPTIM_RE.match(n))} | {
        int(m.group(1)) for n in names if (m := MODEL12_RE.match(n))})
    if any(PIPE_RE.match(n) for n in names) or any(r > 0 for r in mp):
        raise CheckpointError(f"{tag_dir} is a model- or pipeline-parallel DeepSpeed save (mp_rank > 0 or layer_* "
                              "files)", hint="hubexport reads data-parallel ZeRO saves; convert it with the "
                                             "framework that trained it (e.g. Megatron-DeepSpeed's tools)")
    prefixes = {m.group(1) or "" for n in names if (m := OPTIM_RE.match(n))}
    if len(prefixes) > 1:
        raise CheckpointError(f"{tag_dir} holds both bf16_zero_pp_rank_* and zero_pp_rank_* optimizer files",
                              hint="two saves (bf16 and not) were mixed in one folder; keep one run's files")
    optim = _by_rank(tag_dir, OPTIM_RE, 2)
    prefix = prefixes.pop() if prefixes else ""
    if not optim:
        raise CheckpointError(f"{tag_dir} has no {prefix}zero_pp_rank_*_mp_rank_00_optim_states.pt: the DeepSpeed save "
                              "did not finish, or the optimizer states were not copied",
                              hint=f"ZeRO keeps the trained weights only in the optimizer states; {RECOPY}")
    model3 = _by_rank(tag_dir, MODEL3_RE, 1)
    world_size = max([*optim, *model3]) + 1  # the last rank's optimizer file may be the one missing
    _check_ranks(tag_dir, optim, world_size, f"{prefix}zero_pp_rank_{{}}_mp_rank_00_optim_states.pt")
    single = tag_dir / "mp_rank_00_model_states.pt"
    if model3 and single.is_file():
        raise CheckpointError(f"{tag_dir} holds both ZeRO-3 (zero_pp_rank_*_model_states.pt) and ZeRO-1/2 "
                              "(mp_rank_00_model_states.pt) model states", hint="two saves were mixed; keep one run's")
    if model3:
        _check_ranks(tag_dir, model3, world_size, "zero_pp_rank_{}_mp_rank_00_model_states.pt")
        models = [model3[r] for r in range(world_size)]
    elif single.is_file():
        models = [single]
    else:
        raise CheckpointError(f"{tag_dir} has no model states (mp_rank_00_model_states.pt or "
                              "zero_pp_rank_*_mp_rank_00_model_states.pt)", hint=f"the copy is incomplete; {RECOPY}")
    return models, [optim[r] for r in range(world_size)]


def _hf_dir(tag_dir: Path) -> tuple[Path, list[Path]]:
    """config.json: beside the rank files, beside `latest` (the Trainer's checkpoint-N/), or OpenRLHF's
    `--ckpt.save_hf` folder `<ckpt>/<tag>_hf/` next to `_actor/`."""
    save_dir = tag_dir.parent
    looked = list(dict.fromkeys([tag_dir, save_dir, save_dir / "huggingface", save_dir.parent / f"{tag_dir.name}_hf"]))
    found = next((d for d in looked if (d / "config.json").is_file()), None)
    if found is None:
        raise ConfigError(
            f"no config.json beside the DeepSpeed checkpoint {tag_dir}: looked in {', '.join(map(str, looked))}",
            hint=f"DeepSpeed saves no model config: copy the trained model's config.json (and tokenizer) into {save_dir}")
    return found, looked


def _half_precision(ds_config: object) -> str | None:
    """"bf16" / "fp16" when the saved DeepSpeed config turned that mode on."""
    if not isinstance(ds_config, dict):
        return None
    return next((k for k in ("bf16", "fp16") if isinstance(ds_config.get(k), dict) and ds_config[k].get("enabled")),
                None)


def _producer(save_dir: Path) -> str:
    if re.fullmatch(r"checkpoint-\d+", save_dir.name):
        return "trainer"
    return "openrlhf" if save_dir.name in ("_actor", "_critic") else ""


def detect_deepspeed(root: Path) -> Layout | None:
    if not is_deepspeed_dir(root):
        return None
    from hubexport.sources.deepspeed import load_ds_file, optim_state, zero_stage

    tag_dir = _tag_dir(root)
    models, optim = _files(tag_dir)
    first = load_ds_file(optim[0])
    stage = zero_stage(optim[0], optim_state(optim[0], first))
    hf_dir, _ = _hf_dir(tag_dir)
    notes = [f"using {tag_dir.name} ({root / 'latest'} names it)"] if tag_dir != root else []
    half = _half_precision(first.get("ds_config"))
    if half:
        notes.append(f"the run computed in {half} with fp32 master weights: the masters are what is converted "
                     f"(as zero_to_fp32 does); --dtype {half} gives the run's own {half} weights")
    if any(hf_dir.glob("*.safetensors")):
        notes.append(f"{hf_dir} also holds safetensors weights; converting the fp32 master weights in {tag_dir} "
                     "(the training state)")
    version = "-".join(filter(None, (_producer(tag_dir.parent), f"zero{stage}")))
    return Layout(format="deepspeed", version=version, root=tag_dir, hf_dir=hf_dir, files=[*models, *optim],
                  parallel={"world_size": len(optim)}, notes=notes)
