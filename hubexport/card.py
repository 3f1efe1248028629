"""Model cards: what hubexport knows about a model (model_facts.py), the verl training config (redacted), and the
user's values, rendered with Jinja2 through huggingface_hub's ModelCard/ModelCardData.

Rendering is deterministic (no timestamps, no absolute paths, sorted config), so golden-file tests are possible.
Metadata is validated locally against the Hub's rules, so a bad card fails before any upload starts."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hubexport import __version__
from hubexport.card_metadata import REPO_ID_RE, validate_metadata
from hubexport.errors import CardError, HubexportError
from hubexport.model_facts import ModelFacts, model_config, model_facts
from hubexport.options import CardOptions
from hubexport.resources import templates_root

if TYPE_CHECKING:
    from hubexport.evalresults import EvalResults
    from hubexport.result import Result as MergeResult

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
class CardEvidence:
    """What push measured, for the card: the weight-delta section and the run's evaluation results."""

    delta_markdown: str | None = None
    evaluation: EvalResults | None = None


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
def _local_dir(value: Any) -> str | None:
    """--base-model given as a local model folder: read for the license and the publish gate, never in metadata."""
    return value if isinstance(value, str) and Path(value).expanduser().is_dir() else None


def _hub_id(value: Any) -> str | None:
    """A value that names a Hub repo (not a local path) or None."""
    if not isinstance(value, str) or not REPO_ID_RE.fullmatch(value) or Path(value).expanduser().exists():
        return None
    return value


def _base_model_card(base_model: str | None, local_path: Any,
                     log: Callable[[str], None]) -> tuple[Path | None, str | None]:
    """The base model's README (a local model dir, else its Hub repo: the cache, or a download of README.md and
    config.json) and the commit it comes from. Not finding it is a warning, never an error: the card is still made."""
    if isinstance(local_path, str) and (Path(local_path).expanduser() / "README.md").is_file():
        return Path(local_path).expanduser() / "README.md", None
    if not base_model:
        return None, None
    from huggingface_hub import try_to_load_from_cache

    from hubexport.resolve import CARD_FILES, resolve_model

    cached = try_to_load_from_cache(base_model, "README.md")
    if isinstance(cached, str):
        return Path(cached), Path(cached).parent.name  # .../snapshots/<commit sha>/README.md
    try:
        model = resolve_model(base_model, purpose="--base-model", log=log, files=CARD_FILES)
    except HubexportError as e:
        log(f"warning: the base model's card was not read ({e.message})")
        return None, None
    readme = model.path / "README.md"
    return (readme if readme.is_file() else None), model.sha


def _license_from_card(readme: Path | None) -> dict[str, str]:
    if readme is None:
        return {}
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return {k: data[k] for k in ("license", "license_name", "license_link") if isinstance(data.get(k), str)}


def check_card_options(options: CardOptions) -> None:
    """What can be checked before any merge or request: the template exists, the YAML files parse, and the metadata
    given explicitly is valid (the rest is inferred from the model and checked when the card is rendered)."""
    _template_text(options.template)
    if options.training_config:
        _load_yaml(options.training_config, "training config")
    meta = _load_yaml(options.card_data, "card data") if options.card_data else {}
    base_model = None if _local_dir(options.base_model) else options.base_model
    meta.update({k: v for k, v in (("license", options.license), ("base_model", base_model)) if v})
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


def _license(options: CardOptions, user_meta: Mapping[str, Any], readme: Path | None,
             log: Callable[[str], None]) -> dict[str, str]:
    """Never invented: --license, else --card-data, else the base model's card when it is on this machine."""
    if options.license:
        return {"license": options.license}
    licensing = {k: v for k, v in user_meta.items() if k in ("license", "license_name", "license_link")}
    if "license" in licensing:
        return licensing
    licensing = _license_from_card(readme)
    if licensing:
        log(f"card: license {licensing['license']} inherited from the base model's card ({readme})")
    else:
        log("warning: no license in the card: pass --license (derivatives usually inherit the base model's)")
    return licensing


def _metadata(facts: ModelFacts, base: Any, licensing: Mapping[str, str], user_meta: Mapping[str, Any],
              training: Mapping[str, Any], measured: Mapping[str, Any]) -> dict[str, Any]:
    meta: dict[str, Any] = {"library_name": "transformers", **measured, **user_meta, **licensing,
                            "tags": _tags(facts, training, user_meta.get("tags"))}
    if base:
        meta.update(base_model=base, base_model_relation=user_meta.get("base_model_relation", "finetune"))
    if facts.architecture and facts.architecture.endswith("ForCausalLM"):
        meta.setdefault("pipeline_tag", "text-generation")
    validate_metadata(meta)
    return meta


def _render(template: str | Path, context: Mapping[str, Any]) -> str:
    import jinja2
    from huggingface_hub import ModelCard

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined, autoescape=False)
    try:
        text = env.from_string(_template_text(template)).render(**context)
    except jinja2.TemplateError as e:
        raise CardError(f"card template {template}: {e}", hint="fix the template, or use --template default") from None
    card = ModelCard(text)  # parses the front matter back: what we return is what the Hub will read
    validate_metadata(card.data.to_dict())
    return str(card)


def render_card(folder: Path, options: CardOptions = CardOptions(), *, merge_result: MergeResult | None = None,
                sha256: Mapping[str, str] | None = None, log: Callable[[str], None] = print,
                evidence: CardEvidence = CardEvidence()) -> str:
    """The README.md text for `folder`. Precedence: explicit options > --card-data file > what hubexport infers.
    `sha256` maps file names to known digests so a caller that already hashed the shards does not hash twice;
    `evidence` adds push's weight delta and evaluation results (model-index, unless --card-data has one)."""
    from huggingface_hub import ModelCardData

    folder = Path(folder)
    config = model_config(folder)
    facts = model_facts(folder, merge_result, sha256)
    raw_training = _load_yaml(options.training_config, "training config") if options.training_config else {}
    user_meta = _load_yaml(options.card_data, "card data") if options.card_data else {}
    model_path = _dig(raw_training, "actor_rollout_ref.model.path")
    local_base = _local_dir(options.base_model)
    explicit = None if local_base else options.base_model
    base = (explicit or user_meta.get("base_model") or _hub_id(model_path) or _hub_id(config.get("_name_or_path")))
    if base and not explicit and "base_model" not in user_meta:
        log(f"card: base model {base} taken from the training config (override with --base-model)")
    base_id = base if isinstance(base, str) else None
    readme, base_revision = _base_model_card(base_id, local_base or model_path, log)
    licensing = _license(options, user_meta, readme, log)
    model_name = options.variables.get("repo_id") or folder.name
    evaluation = evidence.evaluation
    measured = evaluation.card_metadata(model_name) if evaluation else {}
    meta = _metadata(facts, base, licensing, user_meta, raw_training, measured)
    training = redact(raw_training)
    estimator = _dig(raw_training, "algorithm.adv_estimator")
    return _render(options.template, {
        "card_data": ModelCardData(**meta).to_yaml(),
        "model_name": model_name,
        "base_model": base_id,
        "license": licensing.get("license"),
        "facts": facts,
        "lineage": _lineage(facts, base_id, base_revision),
        "training_rows": [(label, _fmt(v)) for label, path in TRAINING_ROWS if (v := _dig(training, path)) is not None],
        "algorithm": estimator,
        "algorithm_paper": ALGORITHM_PAPERS.get(str(estimator).lower()),
        "training_config_yaml": yaml.safe_dump(training, sort_keys=True, allow_unicode=True).rstrip() if training else "",
        "verl": "verl" in meta["tags"],
        "delta_section": evidence.delta_markdown or "",
        "eval_section": evaluation.markdown() if evaluation else "",
        "vars": dict(options.variables),
        "hubexport_version": __version__,
    })
