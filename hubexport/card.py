"""Model cards: what hubexport knows about a model (from a MergeResult or from the folder itself), the verl training
config (redacted), and the user's values, rendered with Jinja2 through huggingface_hub's ModelCard/ModelCardData.

Rendering is deterministic (no timestamps, no absolute paths, sorted config), so golden-file tests are possible.
Metadata is validated locally against the Hub's rules, so a bad card fails before any upload starts."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hubexport import __version__
from hubexport.detect import STEP_RE
from hubexport.errors import CardError
from hubexport.jsonfile import read_json_object
from hubexport.options import CardOptions
from hubexport.resources import templates_root

if TYPE_CHECKING:
    from hubexport.result import Result as MergeResult

# Hub license ids (hub-docs repositories-licenses.md); anything else must be `other` + license_name + license_link.
HUB_LICENSES = frozenset(
    """
apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m
afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5
cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0
cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0
cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl openrail++
osl-3.0 postgresql ofl-1.1 ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license fair-noncommercial-research-license
llama2 llama3 llama3.1 llama3.2 llama3.3 llama4 gemma unknown other
""".split()  # noqa: SIM905 (a table reads better as words)
)
BASE_MODEL_RELATIONS = ("adapter", "merge", "quantized", "finetune")
REPO_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}")
SECRET_KEY_RE = re.compile(r"token|secret|key|password|api|wandb", re.IGNORECASE)
SECRET_VALUE_RE = re.compile(r"\b(hf|api|sk)_[A-Za-z0-9]{16,}\b")
REDACTED = "<redacted>"
TRAINING_CONFIG_NAMES = ("config.yaml", ".hydra/config.yaml")
# (label, dotted path in the verl Hydra config): the RL settings worth a row in the card.
TRAINING_ROWS = (
    ("advantage estimator", "algorithm.adv_estimator"),
    ("KL penalty in reward", "algorithm.use_kl_in_reward"),
    ("KL loss", "actor_rollout_ref.actor.use_kl_loss"),
    ("KL loss coefficient", "actor_rollout_ref.actor.kl_loss_coef"),
    ("KL loss type", "actor_rollout_ref.actor.kl_loss_type"),
    ("clip ratio", "actor_rollout_ref.actor.clip_ratio"),
    ("clip ratio low", "actor_rollout_ref.actor.clip_ratio_low"),
    ("clip ratio high", "actor_rollout_ref.actor.clip_ratio_high"),
    ("entropy coefficient", "actor_rollout_ref.actor.entropy_coeff"),
    ("loss aggregation", "actor_rollout_ref.actor.loss_agg_mode"),
    ("learning rate", "actor_rollout_ref.actor.optim.lr"),
    ("train batch size", "data.train_batch_size"),
    ("PPO mini-batch size", "actor_rollout_ref.actor.ppo_mini_batch_size"),
    ("PPO epochs", "actor_rollout_ref.actor.ppo_epochs"),
    ("max prompt length", "data.max_prompt_length"),
    ("max response length", "data.max_response_length"),
    ("rollout engine", "actor_rollout_ref.rollout.name"),
    ("samples per prompt", "actor_rollout_ref.rollout.n"),
    ("temperature", "actor_rollout_ref.rollout.temperature"),
    ("top-p", "actor_rollout_ref.rollout.top_p"),
    ("reward function", "custom_reward_function.name"),
    ("reward function file", "custom_reward_function.path"),
    ("train files", "data.train_files"),
    ("training strategy", "actor_rollout_ref.actor.strategy"),
    ("nodes", "trainer.nnodes"),
    ("GPUs per node", "trainer.n_gpus_per_node"),
    ("total training steps", "trainer.total_training_steps"),
)
ALGORITHM_PAPERS = {
    "gae": "PPO, [arXiv:1707.06347](https://arxiv.org/abs/1707.06347)",
    "grpo": "GRPO (DeepSeekMath), [arXiv:2402.03300](https://arxiv.org/abs/2402.03300)",
    "dapo": "DAPO, [arXiv:2503.14476](https://arxiv.org/abs/2503.14476)",
    "rloo": "RLOO, [arXiv:2402.14740](https://arxiv.org/abs/2402.14740)",
    "reinforce_plus_plus": "REINFORCE++, [arXiv:2501.03262](https://arxiv.org/abs/2501.03262)",
}


@dataclass(frozen=True)
class Shard:
    name: str
    size: int
    sha256: str


@dataclass
class ModelFacts:
    architecture: str | None
    model_type: str | None
    dtype: str | None
    num_parameters: int
    tied_embeddings: bool
    value_model: bool
    source: str | None  # e.g. "verl FSDP checkpoint (fsdp2)"; None for a plain HF folder
    layout: str | None  # e.g. "FSDP world size 8" or "TP 2 · PP 2 · EP 1"
    global_step: int | None
    shards: list[Shard]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, error=CardError, hint="pass a Hugging Face model folder (hubexport merge output)")


def _model_config(folder: Path) -> dict[str, Any]:
    if not (folder / "config.json").is_file():
        raise CardError(f"{folder} has no config.json", hint="pass a Hugging Face model folder (hubexport merge output)")
    return _read_json(folder / "config.json")


def _tied(config: Mapping[str, Any]) -> bool:
    text_config = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text_config.get("tie_word_embeddings", False)))


def _step_from_path(path: Path) -> int | None:
    steps = [int(m.group(1)) for part in path.resolve().parts if (m := STEP_RE.fullmatch(part))]
    return steps[-1] if steps else None


def _describe_source(fmt: str, version: str, parallel: Mapping[str, int]) -> tuple[str, str]:
    if fmt == "fsdp":
        return f"verl FSDP checkpoint ({version})", f"FSDP world size {parallel.get('world_size', '?')}"
    layout = " · ".join(f"{k.upper()} {v}" for k, v in parallel.items()) or "single rank"
    return f"{'Megatron' if fmt == 'megatron' else fmt} checkpoint ({version})", layout


def facts_from_merge(result: MergeResult, config: Mapping[str, Any]) -> ModelFacts:
    source, layout = _describe_source(result.source_format, result.source_version, result.parallel)
    return ModelFacts(
        architecture=result.architecture,
        model_type=config.get("model_type"),
        dtype=result.dtype,
        num_parameters=result.num_parameters,
        tied_embeddings=result.tied_embeddings,
        value_model=result.value_model,
        source=source,
        layout=layout,
        global_step=result.global_step,
        shards=sorted((Shard(f.name, f.size, f.sha256) for f in result.files if f.name.endswith(".safetensors")),
                      key=lambda s: s.name),
    )


def facts_from_folder(folder: Path, config: Mapping[str, Any], sha256: Mapping[str, str] | None = None) -> ModelFacts:
    """Everything a plain HF folder tells: safetensors headers for shapes and dtypes, config.json for the rest."""
    from hubexport.safetensors_format import read_specs  # torch: imported only when a folder is read

    known = sha256 or {}
    shards, dtype_bytes, params = [], Counter(), 0
    for path in sorted(folder.glob("*.safetensors")):
        for spec in read_specs(path).values():
            dtype_bytes[spec.dtype] += spec.nbytes
            params += prod(spec.shape)
        shards.append(Shard(path.name, path.stat().st_size, known.get(path.name) or sha256_file(path)))
    dtype = dtype_bytes.most_common(1)[0][0] if dtype_bytes else None
    arch = (config.get("architectures") or [None])[0]
    return ModelFacts(
        architecture=arch,
        model_type=config.get("model_type"),
        dtype=str(dtype).removeprefix("torch.") if dtype else None,
        num_parameters=params,
        tied_embeddings=_tied(config),
        value_model=bool(arch and arch.endswith("ForTokenClassification")),
        source=None,
        layout=None,
        global_step=_step_from_path(folder),
        shards=shards,
    )


def model_facts(folder: Path, merge_result: MergeResult | None = None,
                sha256: Mapping[str, str] | None = None) -> ModelFacts:
    """What the card (and the action's summary) say about the model in `folder`: from the merge when there was one."""
    config = _model_config(Path(folder))
    return facts_from_merge(merge_result, config) if merge_result else facts_from_folder(Path(folder), config, sha256)


# ---- training config ------------------------------------------------------------------------------------------------
def find_training_config(checkpoint: Path) -> Path | None:
    """verl runs keep their resolved Hydra config near the checkpoint: the actor dir, global_step_N, or the run root."""
    d = Path(checkpoint).resolve()
    for folder in (d, d.parent, d.parent.parent):
        for name in TRAINING_CONFIG_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def _load_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CardError(f"cannot read {what} {path}: {first}", hint=f"pass a valid YAML file as the {what}") from None
    if not isinstance(data, dict):
        raise CardError(f"{what} {path} is not a YAML mapping", hint=f"the {what} must be key: value pairs")
    return data


def _shorten_path(value: str) -> str:
    """'/home/alice/data/gsm8k/train.parquet' → '…/gsm8k/train.parquet': keeps what identifies, drops who and where."""
    if not value.startswith(("/", "~")) or "\n" in value:
        return value
    parts = [p for p in value.split("/") if p and p != "~"]
    return "…/" + "/".join(parts[-2:]) if len(parts) > 2 else value


def redact(obj: Any) -> Any:
    """Secrets by key name (token/secret/key/password/api/wandb) or by token-like value; absolute paths shortened."""
    if isinstance(obj, Mapping):
        return {str(k): REDACTED if SECRET_KEY_RE.search(str(k)) else redact(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return REDACTED if SECRET_VALUE_RE.search(obj) else _shorten_path(obj)
    return obj


def _dig(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


# ---- base model and license ---------------------------------------------------------------------------------------
def _hub_id(value: Any) -> str | None:
    """A value that names a Hub repo (not a local path) or None."""
    if not isinstance(value, str) or not REPO_ID_RE.fullmatch(value) or Path(value).expanduser().exists():
        return None
    return value


def _base_model_card(base_model: str | None, local_path: Any) -> tuple[Path | None, str | None]:
    """The base model's README when it is on this machine (a local model dir, or the HF cache), and its revision."""
    if isinstance(local_path, str) and (Path(local_path).expanduser() / "README.md").is_file():
        return Path(local_path).expanduser() / "README.md", None
    if base_model:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(base_model, "README.md")
        if isinstance(cached, str):
            return Path(cached), Path(cached).parent.name  # .../snapshots/<commit sha>/README.md
    return None, None


def _license_from_card(readme: Path | None) -> dict[str, str]:
    if readme is None:
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return {k: data[k] for k in ("license", "license_name", "license_link") if isinstance(data.get(k), str)}


# ---- validation -------------------------------------------------------------------------------------------------
LICENSE_HINT = "use an id from https://huggingface.co/docs/hub/repositories-licenses, or license: other with " \
               "license_name and license_link"


def validate_metadata(meta: Mapping[str, Any]) -> None:
    """The Hub's rules for the metadata hubexport writes; raises CardError naming the first bad key."""

    def bad(message: str, hint: str) -> CardError:
        return CardError(f"model card metadata: {message}", hint=hint)

    lic = meta.get("license")
    if lic is not None and (not isinstance(lic, str) or lic not in HUB_LICENSES):
        raise bad(f"license {lic!r} is not a Hub license id", LICENSE_HINT)
    if lic == "other" and not (isinstance(meta.get("license_name"), str) and isinstance(meta.get("license_link"), str)):
        raise bad("license: other needs license_name and license_link", LICENSE_HINT)
    for key in ("base_model", "datasets"):
        value = meta.get(key)
        ids = [value] if isinstance(value, str) else value
        if value is not None and not (isinstance(ids, list) and all(isinstance(v, str) and REPO_ID_RE.fullmatch(v)
                                                                    for v in ids)):
            raise bad(f"{key} {value!r} must be Hub repo ids like org/name", f"local paths are not allowed in {key}")
    relation = meta.get("base_model_relation")
    if relation is not None and relation not in BASE_MODEL_RELATIONS:
        raise bad(f"base_model_relation {relation!r} is not one of {', '.join(BASE_MODEL_RELATIONS)}",
                  "hubexport writes finetune for RL full-weight exports")
    if relation is not None and meta.get("base_model") is None:
        raise bad("base_model_relation is set but base_model is not", "pass --base-model org/name")
    for key in ("tags", "language"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, str) or (isinstance(value, list)
                                                                  and all(isinstance(v, str) for v in value))):
            raise bad(f"{key} must be a string or a list of strings", f"fix {key} in the card data")


def validate_card(text: str) -> dict[str, Any]:
    """Parse a README's front matter and check it; returns the metadata."""
    from huggingface_hub import ModelCard

    try:
        meta = ModelCard(text).data.to_dict()
    except (ValueError, yaml.YAMLError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = "fix the front matter of README.md"
        raise CardError(f"model card metadata is not valid YAML: {first}", hint=hint) from None
    validate_metadata(meta)
    return meta


def check_card_options(options: CardOptions) -> None:
    """What can be checked before any merge or request: the template exists, the YAML files parse, and the metadata
    given explicitly is valid (the rest is inferred from the model and checked when the card is rendered)."""
    _template_text(options.template)
    if options.training_config:
        _load_yaml(options.training_config, "training config")
    meta = _load_yaml(options.card_data, "card data") if options.card_data else {}
    meta.update({k: v for k, v in (("license", options.license), ("base_model", options.base_model)) if v})
    if "base_model" not in meta:
        meta.pop("base_model_relation", None)  # the base model may still be inferred
    validate_metadata(meta)


# ---- rendering --------------------------------------------------------------------------------------------------
def _template_text(template: str | Path) -> str:
    """A bundled template by name (templates/modelcard_<name>.md.j2), or a path to the user's own."""
    if isinstance(template, Path) or template.endswith(".j2"):
        path = Path(template)
        if not path.is_file():
            raise CardError(f"card template {path} does not exist", hint="pass --template default, or a .md.j2 file")
        return path.read_text()
    name = f"modelcard_{template}.md.j2"
    root = templates_root()
    resource = root / name
    if not resource.is_file():
        names = sorted(p.name[len("modelcard_"):-len(".md.j2")] for p in root.iterdir()
                       if p.name.startswith("modelcard_"))
        raise CardError(f"no bundled card template named {template!r}", hint=f"use one of {', '.join(names)}")
    return resource.read_text()


def _lineage(facts: ModelFacts, base_model: str | None, base_revision: str | None) -> list[tuple[str, str]]:
    rows = [
        ("Base model", f"[{base_model}](/{base_model})" if base_model else None),
        ("Base model revision", f"`{base_revision}`" if base_revision else None),
        ("Source", facts.source),
        ("Parallel layout", facts.layout),
        ("Training step", str(facts.global_step) if facts.global_step is not None else None),
        ("Architecture", f"{facts.architecture} ({facts.model_type})" if facts.model_type else facts.architecture),
        ("Parameters", _human(facts.num_parameters)),
        ("Weights dtype", facts.dtype),
        ("Tied embeddings", _fmt(facts.tied_embeddings)),
        ("Value model (critic)", "yes" if facts.value_model else None),
        ("Exported with", f"hubexport {__version__}"),
    ]
    return [(k, v) for k, v in rows if v]


def _human(n: int) -> str:
    """'494.0M (494,032,768)': the rounded figure people quote, and the exact count."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit} ({n:,})"
    return str(n)


def _tags(facts: ModelFacts, training: Mapping[str, Any], extra: Any) -> list[str]:
    tags = ["hubexport"]
    estimator = _dig(training, "algorithm.adv_estimator")
    if facts.source or training:
        tags.append("verl")
    if estimator:
        tags += ["reinforcement-learning", str(estimator)]
    strategy = _dig(training, "actor_rollout_ref.actor.strategy")
    if strategy:
        tags.append(str(strategy))
    tags += [extra] if isinstance(extra, str) else list(extra or [])
    return list(dict.fromkeys(tags))


def render_card(
    folder: Path,
    *,
    merge_result: MergeResult | None = None,
    base_model: str | None = None,
    license: str | None = None,
    variables: dict[str, str] | None = None,
    card_data: Path | None = None,
    template: str | Path = "default",
    training_config: Path | None = None,
    sha256: Mapping[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> str:
    """The README.md text for `folder`. Precedence: explicit arguments > --card-data file > what hubexport infers.
    `sha256` maps file names to known digests so a caller that already hashed the shards does not hash twice."""
    folder = Path(folder)
    config = _model_config(folder)
    facts = model_facts(folder, merge_result, sha256)
    raw_training = _load_yaml(training_config, "training config") if training_config else {}
    user_meta = _load_yaml(card_data, "card data") if card_data else {}
    model_path = _dig(raw_training, "actor_rollout_ref.model.path")

    base = base_model or user_meta.get("base_model") or _hub_id(model_path) or _hub_id(config.get("_name_or_path"))
    if base and not base_model and "base_model" not in user_meta:
        log(f"card: base model {base} taken from the training config (override with --base-model)")
    readme, base_revision = _base_model_card(base if isinstance(base, str) else None, model_path)
    licensing = {k: v for k, v in user_meta.items() if k in ("license", "license_name", "license_link")}
    if license:
        licensing = {"license": license}
    elif "license" not in licensing:
        licensing = _license_from_card(readme)
        if licensing:
            log(f"card: license {licensing['license']} inherited from the base model's card ({readme})")
        else:
            log("warning: no license in the card: pass --license (derivatives usually inherit the base model's)")

    from huggingface_hub import ModelCard, ModelCardData

    meta: dict[str, Any] = {"library_name": "transformers", **user_meta, **licensing,
                            "tags": _tags(facts, raw_training, user_meta.get("tags"))}
    if base:
        meta.update(base_model=base, base_model_relation=user_meta.get("base_model_relation", "finetune"))
    if facts.architecture and facts.architecture.endswith("ForCausalLM"):
        meta.setdefault("pipeline_tag", "text-generation")
    validate_metadata(meta)
    data = ModelCardData(**meta)

    training = redact(raw_training)
    config_yaml = yaml.safe_dump(training, sort_keys=True, allow_unicode=True).rstrip() if training else ""
    values = dict(variables or {})
    estimator = _dig(raw_training, "algorithm.adv_estimator")
    context = {
        "card_data": data.to_yaml(),
        "model_name": values.get("repo_id") or folder.name,
        "base_model": base if isinstance(base, str) else None,
        "license": licensing.get("license"),
        "facts": facts,
        "lineage": _lineage(facts, base if isinstance(base, str) else None, base_revision),
        "training_rows": [(label, _fmt(v)) for label, path in TRAINING_ROWS if (v := _dig(training, path)) is not None],
        "algorithm": estimator,
        "algorithm_paper": ALGORITHM_PAPERS.get(str(estimator).lower()),
        "training_config_yaml": config_yaml,
        "verl": "verl" in meta["tags"],
        "vars": values,
        "hubexport_version": __version__,
    }
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined, autoescape=False)
    try:
        text = env.from_string(_template_text(template)).render(**context)
    except jinja2.TemplateError as e:
        raise CardError(f"card template {template}: {e}", hint="fix the template, or use --template default") from None
    card = ModelCard(text)  # parses the front matter back: what we return is what the Hub will read
    validate_metadata(card.data.to_dict())
    return str(card)

