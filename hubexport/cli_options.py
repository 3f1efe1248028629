"""The Click options several commands share, declared once, and the option objects they build."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from hubexport.options import DTYPE_NAMES, CardOptions, GateOptions, MergeOptions

DTYPES = click.Choice(list(DTYPE_NAMES))


def _options(*opts: Callable) -> Callable:
    def apply(fn: Callable) -> Callable:
        for opt in reversed(opts):
            fn = opt(fn)
        return fn
    return apply


JSON = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
BACKEND = click.option("--backend", type=click.Choice(["auto", "fsdp", "megatron", "megatron-fsdp", "dcp", "deepspeed"]),
                       default="auto", show_default=True, help="Checkpoint kind; auto-detected by default.")
TRUST_REMOTE_CODE = click.option("--trust-remote-code", "--trust_remote_code", "trust_remote_code", is_flag=True,
                                 help="Allow the config's custom modeling code (auto_map).")
MAX_SHARD_SIZE = click.option("--max-shard-size", "--max_shard_size", default="5GB", show_default=True,
                              help="Largest safetensors file, e.g. 5GB or 500MB.")
OVERWRITE = click.option("--overwrite", is_flag=True,
                         help="Replace a non-empty target (never one that is, holds or lies inside the input).")
CPU_INIT = click.option("--use-cpu-initialization", "--use_cpu_initialization", "use_cpu_initialization", is_flag=True,
                        hidden=True, help="Accepted for verl compatibility; hubexport never needs a GPU.")
VISIBILITY = click.option(
    "--private/--public", "private", default=None,
    help="Visibility of a repo this run creates. With neither, a new repo gets the Hub's default (public, with a "
         "warning); an existing repo keeps its visibility.")

merge_options = _options(
    BACKEND,
    click.option("--dtype", type=DTYPES, default=None,
                 help="Cast floating-point weights; by default each tensor keeps its dtype."),
    MAX_SHARD_SIZE,
    click.option("--tie-word-embedding", "--tie_word_embedding", "tie_word_embedding", is_flag=True,
                 help="verl flag: assert tied embeddings (an error if the config says otherwise)."),
    click.option("--is-value-model", "--is_value_model", "is_value_model", is_flag=True,
                 help="Export a critic (score head) as *ForTokenClassification."),
    TRUST_REMOTE_CODE,
    CPU_INIT,
    click.option("--lora", "lora_mode", type=click.Choice(["adapter", "fuse", "both"]), default=None,
                 help="For LoRA checkpoints: adapter = base model + lora_adapter/ (the default); fuse = one model "
                      "with W + (alpha/r)·B·A folded in; both = the fused model + lora_adapter/ (apply the adapter "
                      "to the base model, never to the fused one)."),
    click.option("--lora-alpha", "--lora_alpha", "lora_alpha", type=float, default=None,
                 help="LoRA alpha the run trained with (default: lora_train_meta.json or adapter_config.json)."),
    click.option("--lora-rank", "--lora_rank", "lora_rank", type=int, default=None,
                 help="LoRA rank r the run trained with (default: those files, else the tensor shapes)."),
    OVERWRITE,
)
MERGE_KEYS = ("backend", "dtype", "max_shard_size", "tie_word_embedding", "is_value_model", "trust_remote_code",
              "lora_mode", "lora_alpha", "lora_rank", "lora_base_model")


def lora_base_option(*flags: str) -> Callable:
    """The base weights of a LoRA-only checkpoint. `merge` spells it --base-model; `push` only --lora-base-model,
    because there --base-model is the card's Hub id."""
    return click.option(*flags, "lora_base_model", type=click.Path(path_type=Path), default=None,
                        help="Hugging Face folder with the base weights, for a LoRA-only checkpoint (save_lora_only).")


def take_merge_options(kw: dict[str, Any]) -> MergeOptions:
    kw.pop("use_cpu_initialization", None)
    return MergeOptions(**{k: kw.pop(k) for k in MERGE_KEYS})


def _parse_vars(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    pairs = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx=ctx, param=param)
        pairs[key.strip()] = value
    return pairs


CARD_BASE_MODEL = click.option("--base-model", default=None, help="Hub id of the model the training started from.")
card_options = _options(
    click.option("--license", "license", default=None,
                 help="Hub license id. Default: the base model's, when its card is on this machine."),
    click.option("--var", "variables", multiple=True, metavar="KEY=VALUE", callback=_parse_vars,
                 help='A value for the template, e.g. --var reward="exact match" (summary, reward, evaluation, '
                      "limitations have sections; others go to Notes). Repeatable."),
    click.option("--card-data", type=click.Path(path_type=Path), default=None,
                 help="YAML file of extra card metadata: language, datasets, tags, model-index, ..."),
    click.option("--template", default="default", show_default=True,
                 help="Bundled card template (default, minimal) or a path to a .md.j2 file."),
    click.option("--training-config", type=click.Path(path_type=Path), default=None,
                 help="verl config YAML. Default for checkpoints: config.yaml or .hydra/config.yaml next to it."),
)
CARD_KEYS = ("base_model", "license", "variables", "card_data", "template", "training_config")


def take_card_options(kw: dict[str, Any]) -> CardOptions:
    """The card options, removed from a command's keyword arguments."""
    out = {k: kw.pop(k, None) for k in CARD_KEYS}
    out["variables"] = out["variables"] or {}
    template = out["template"] or "default"
    out["template"] = Path(template) if template.endswith(".j2") or Path(template).is_file() else template
    return CardOptions(**out)


publish_options = _options(
    click.option("--diff-base", default=None, metavar="PATH|ORG/NAME",
                 help="The base model the publish gate compares the weights with (a Hub id is downloaded). Default: "
                      "the LoRA base, --base-model when it is a local folder or fully in the HF cache, or the "
                      "checkpoint config's _name_or_path when that is a local folder."),
    click.option("--allow-unchanged", is_flag=True, help="Publish a model identical to its base (refused by default)."),
    click.option("--allow-nonfinite", is_flag=True, help="Publish weights holding NaN/Inf (refused by default)."),
    click.option("--metrics", type=click.Path(path_type=Path), default=None,
                 help="verl's metrics JSONL (trainer.logger=file), for evaluation results on the Hub. Default: "
                      "found next to the run."),
)
PUBLISH_KEYS = ("diff_base", "allow_unchanged", "allow_nonfinite")


def take_publish_options(kw: dict[str, Any]) -> dict[str, Any]:
    """PushOptions' gate and metrics, removed from a command's keyword arguments."""
    return {"gate": GateOptions(**{k: kw.pop(k) for k in PUBLISH_KEYS}), "metrics": kw.pop("metrics")}
