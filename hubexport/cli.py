"""The Click CLI: parse options, call one package function, render text or --json. Errors become one line + a hint."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import click

from hubexport import __version__
from hubexport.errors import HubexportError

DTYPES = click.Choice(["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"])


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(_jsonable(obj), indent=2))


def friendly(fn: Callable) -> Callable:
    """Turn HubexportError into `error: …` + `hint: …` and its exit code; --debug re-raises for a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except HubexportError as e:
            if debug:
                raise
            click.echo(f"error: {e.message}", err=True)
            if e.hint:
                click.echo(f"hint: {e.hint}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; the target was left as it was before this run", err=True)
            sys.exit(130)

    return wrapper


def say(msg: str) -> None:
    click.echo(msg, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="hubexport")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Turn sharded RL training checkpoints (verl FSDP, Megatron torch_dist) into Hugging Face models, and back."""


def merge_options(fn: Callable) -> Callable:
    """The options `merge` shares with verl's merger (both spellings) and with `push`."""
    opts = [
        click.option("--backend", type=click.Choice(["auto", "fsdp", "megatron"]), default="auto", show_default=True,
                     help="Checkpoint kind; auto-detected by default."),
        click.option("--dtype", type=DTYPES, default=None,
                     help="Cast floating-point weights; by default each tensor keeps its dtype."),
        click.option("--max-shard-size", "--max_shard_size", default="5GB", show_default=True,
                     help="Largest safetensors file, e.g. 5GB or 500MB."),
        click.option("--tie-word-embedding", "--tie_word_embedding", "tie_word_embedding", is_flag=True,
                     help="verl flag: assert tied embeddings (an error if the config says otherwise)."),
        click.option("--is-value-model", "--is_value_model", "is_value_model", is_flag=True,
                     help="Export a critic (score head) as *ForTokenClassification."),
        click.option("--trust-remote-code", "--trust_remote_code", "trust_remote_code", is_flag=True,
                     help="Allow the config's custom modeling code (auto_map)."),
        click.option("--use-cpu-initialization", "--use_cpu_initialization", "use_cpu_initialization", is_flag=True,
                     hidden=True, help="Accepted for verl compatibility; hubexport never needs a GPU."),
        click.option("--lora", "lora_mode", type=click.Choice(["adapter", "fuse", "both"]), default=None,
                     help="For LoRA checkpoints: adapter = base model + lora_adapter/ (the default); fuse = one model "
                          "with W + (alpha/r)·B·A folded in; both = the fused model + lora_adapter/ (apply the adapter "
                          "to the base model, never to the fused one)."),
        click.option("--lora-alpha", "--lora_alpha", "lora_alpha", type=float, default=None,
                     help="LoRA alpha the run trained with (default: lora_train_meta.json or adapter_config.json)."),
        click.option("--lora-rank", "--lora_rank", "lora_rank", type=int, default=None,
                     help="LoRA rank r the run trained with (default: those files, else the tensor shapes)."),
        click.option("--base-model", "--base_model", "base_model", type=click.Path(path_type=Path), default=None,
                     help="Hugging Face folder with the base weights, for a LoRA-only checkpoint (save_lora_only)."),
        click.option("--overwrite", is_flag=True, help="Replace a non-empty target directory."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def merge_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    kw.pop("use_cpu_initialization", None)
    return kw


@cli.command()
@click.option("--local-dir", "--local_dir", "local_dir", required=True, type=click.Path(path_type=Path),
              help="global_step_N/actor, global_step_N, or the run root with latest_checkpointed_iteration.txt.")
@click.option("--target-dir", "--target_dir", "target_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder (created atomically).")
@merge_options
@click.option("--hf-upload-path", "--hf_upload_path", "hf_upload_path", default=None,
              help="verl flag: push the merged model to this Hub repo id.")
@click.option("--private", is_flag=True, help="With --hf-upload-path: create the repo private.")
@click.option("--dry-run", is_flag=True, help="Print the plan; read no tensor and write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@friendly
def merge(local_dir: Path, target_dir: Path, hf_upload_path: str | None, private: bool, dry_run: bool,
          as_json: bool, **kw: Any) -> None:
    """Merge a sharded training checkpoint into a Hugging Face model folder."""
    from hubexport.convert import merge as do_merge

    result = do_merge(local_dir, target_dir, dry_run=dry_run, log=say, **merge_kwargs(kw))
    if hf_upload_path and not dry_run:
        from hubexport.hub import push_folder

        push = push_folder(result.target_dir, repo_id=hf_upload_path, private=private, merge_result=result, log=say)
        result = {"merge": result, "push": push}
    if as_json:
        emit_json(result)


@cli.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True,
              help="Where the demo checkpoint and the merged model go.")
@click.option("--world-size", default=2, show_default=True, help="FSDP processes for the demo training step.")
@friendly
def demo(out_dir: Path, world_size: int) -> None:
    """Train a tiny model one step with real FSDP on CPU, save it verl-style, merge it and verify it."""
    from hubexport.demo import run_demo

    run_demo(out_dir, world_size=world_size, log=say)


def main() -> None:
    cli(prog_name="hubexport")
