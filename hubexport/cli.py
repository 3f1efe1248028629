"""The Click CLI: parse options, call one package function, render text or --json. Errors become one line + a hint."""

from __future__ import annotations

import functools
import json
import os
import signal
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
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports, so stdout holds one document
        return
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
        click.option("--overwrite", is_flag=True, help="Replace a non-empty target directory."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def lora_base_option(*flags: str) -> Callable:
    """The base weights of a LoRA-only checkpoint. `merge` spells it --base-model; `push` only --lora-base-model,
    because there --base-model is the card's Hub id."""
    return click.option(*flags, "lora_base_model", type=click.Path(path_type=Path), default=None,
                        help="Hugging Face folder with the base weights, for a LoRA-only checkpoint (save_lora_only).")


def merge_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    kw.pop("use_cpu_initialization", None)
    kw["base_model"] = kw.pop("lora_base_model", None)
    return kw


@cli.command()
@click.option("--local-dir", "--local_dir", "local_dir", required=True, type=click.Path(path_type=Path),
              help="global_step_N/actor, global_step_N, or the run root with latest_checkpointed_iteration.txt.")
@click.option("--target-dir", "--target_dir", "target_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder (created atomically).")
@merge_options
@lora_base_option("--base-model", "--base_model", "--lora-base-model")
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


@cli.command("to-megatron")
@click.option("--hf-model-path", "--hf_model_path", "hf_model_path", required=True, type=click.Path(path_type=Path),
              help="Hugging Face model folder (config.json + safetensors, sharded or not).")
@click.option("--output-path", "--output_path", "output_path", required=True, type=click.Path(path_type=Path),
              help="Where the torch_dist checkpoint goes (created atomically).")
@click.option("--spec", type=click.Choice(["te", "local"]), default="te", show_default=True,
              help="Layer spec of the model that will load it: Transformer Engine, or megatron's local modules.")
@click.option("--test", is_flag=True, help="Re-read the written checkpoint and compare it with the HF tensors.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output path.")
@click.option("--trust-remote-code", "--trust_remote_code", "trust_remote_code", is_flag=True,
              help="Allow the config's custom code (auto_map).")
@click.option("--use-cpu-initialization", "--use_cpu_initialization", "use_cpu_initialization", is_flag=True,
              hidden=True, help="Accepted for verl compatibility; hubexport never builds a model.")
@click.option("--pp-size", "--pp_size", "pp_size", type=int, default=None, hidden=True,
              help="Accepted for verl compatibility; the checkpoint loads at any PP.")
@click.option("--ep-size", "--ep_size", "ep_size", type=int, default=None, hidden=True,
              help="Accepted for verl compatibility; the checkpoint loads at any EP.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@friendly
def to_megatron(hf_model_path: Path, output_path: Path, spec: str, test: bool, overwrite: bool,
                trust_remote_code: bool, use_cpu_initialization: bool, pp_size: int | None, ep_size: int | None,
                as_json: bool) -> None:
    """Convert a Hugging Face model into a megatron-core torch_dist checkpoint, on CPU, loadable at any TP/PP/EP.

    Under torchrun every rank writes its share; the output path must then be on a shared filesystem."""
    import os

    from hubexport.to_megatron import to_megatron as convert

    main = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 talks
    if (pp_size or ep_size) and main:
        say("--pp_size/--ep_size ignored: the checkpoint holds global tensors that load at any TP/PP/EP")
    result = convert(hf_model_path, output_path, spec=spec, test=test, overwrite=overwrite,
                     trust_remote_code=trust_remote_code, log=say)
    if as_json and main:
        emit_json(result)


def _parse_vars(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    pairs = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx=ctx, param=param)
        pairs[key.strip()] = value
    return pairs


def card_options(fn: Callable) -> Callable:
    """The options `card` and `push` share: what the card says beyond what hubexport can read from the model."""
    opts = [
        click.option("--base-model", default=None, help="Hub id of the model the training started from."),
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
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def card_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """Split the card options out of a command's keyword arguments (they are removed from `kw`)."""
    out = {k: kw.pop(k) for k in ("base_model", "license", "variables", "card_data", "template", "training_config")}
    if out["template"].endswith(".j2") or Path(out["template"]).is_file():
        out["template"] = Path(out["template"])
    return out


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@card_options
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Where to write the card; - for stdout. Default: FOLDER/README.md.")
@friendly
def card(folder: Path, output: Path | None, **kw: Any) -> None:
    """Render the model card (README.md) of a Hugging Face model folder; its metadata is validated."""
    from hubexport.card import render_card

    text = render_card(folder, log=say, **card_kwargs(kw))
    if output == Path("-"):
        click.echo(text, nl=False)
        return
    path = output or folder / "README.md"
    path.write_text(text)
    say(f"wrote {path}")


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--repo-id", "--repo_id", "repo_id", required=True, help="namespace/name (or just name: yours).")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to push to; created from main if missing.")
@click.option("--commit-message", default=None, help="Commit title.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--target-dir", "--target_dir", "target_dir", type=click.Path(path_type=Path), default=None,
              help="For a checkpoint: keep the merged model here (default: a temporary directory, removed after).")
@card_options
@merge_options
@lora_base_option("--lora-base-model")
@click.option("--dry-run", is_flag=True, help="Show what would be uploaded; create and send nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@friendly
def push(source: Path, repo_id: str, private: bool, revision: str | None, commit_message: str | None,
         create_pr: bool, target_dir: Path | None, dry_run: bool, as_json: bool, **kw: Any) -> None:
    """Push a model folder to the Hub, or merge a training checkpoint, render its card and push it.

    Token from HF_TOKEN (or `hf auth login`), endpoint from HF_ENDPOINT. Re-running is safe: unchanged files are
    not sent, and a run with nothing new makes no commit."""
    from hubexport.card import CardOptions
    from hubexport.hub import publish

    card = CardOptions(**card_kwargs(kw))
    result = publish(source, repo_id=repo_id, target_dir=target_dir, merge_options=merge_kwargs(kw), card=card,
                     private=private, revision=revision, commit_message=commit_message, create_pr=create_pr,
                     dry_run=dry_run, log=say)
    if result is None:  # a torchrun rank other than 0: it merged its share, rank 0 pushed and reports
        return
    if as_json:
        emit_json(result)
        return
    click.echo(f"repo:     {result.repo_url} ({'private' if result.private else 'public'})")
    click.echo(f"revision: {result.revision}")
    if result.commit_sha:
        click.echo(f"commit:   {result.commit_sha} {result.commit_url}" + (" (no change)" if result.no_op else ""))
    if result.pr_url:
        click.echo(f"pr:       {result.pr_url}")
    verb = "would upload" if dry_run else "uploaded"
    click.echo(f"{verb}: {result.files_uploaded} files, {result.bytes_uploaded:,} bytes")


# ---- summary: a push result rendered for CI (the GitHub Action's step summary and outputs) ---------------------------
@cli.command()
@click.argument("result_json", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Append the markdown here (e.g. $GITHUB_STEP_SUMMARY). Default: stdout.")
@click.option("--github-output", type=click.Path(path_type=Path), default=None,
              help="Append the step outputs here ($GITHUB_OUTPUT format): repo-id, repo-url, commit-sha, ...")
@click.option("--template", default="default", show_default=True, help="Bundled summary template or a .md.j2 path.")
@friendly
def summary(result_json: Path, output: Path | None, github_output: Path | None, template: str) -> None:
    """Render RESULT_JSON (what `hubexport push --json` printed) as a markdown job summary, and as step outputs."""
    from hubexport.summary import action_outputs, github_output_lines, load_result, render_summary

    result = load_result(result_json)
    text = render_summary(result, template)
    if github_output is not None:
        with open(github_output, "a") as f:
            f.write(github_output_lines(action_outputs(result)))
    if output is None:
        click.echo(text, nl=False)
    else:
        with open(output, "a") as f:
            f.write(text)


@cli.command()
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--reference", required=True, type=click.Path(path_type=Path),
              help="An HF folder (single-file or sharded), or a training checkpoint merged on the fly.")
@click.option("--backend", type=click.Choice(["auto", "fsdp", "megatron"]), default="auto", show_default=True,
              help="Kind of a training-checkpoint reference.")
@click.option("--logits", is_flag=True, help="Also load both with transformers on CPU and compare logits.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@friendly
def verify(candidate: Path, reference: Path, backend: str, logits: bool, as_json: bool) -> None:
    """Compare CANDIDATE with a reference tensor by tensor (exit 0 = same, 1 = differences, 2 = error)."""
    _verify(candidate, reference, backend=backend, logits=logits, as_json=as_json)


@cli.command("test", hidden=True)
@click.option("--backend", type=click.Choice(["auto", "fsdp", "megatron"]), default="auto")
@click.option("--local-dir", "--local_dir", "local_dir", required=True, type=click.Path(path_type=Path))
@click.option("--test-hf-dir", "--test_hf_dir", "test_hf_dir", required=True, type=click.Path(path_type=Path))
@click.option("--tie-word-embedding", "--tie_word_embedding", is_flag=True, hidden=True)
@click.option("--is-value-model", "--is_value_model", is_flag=True, hidden=True)
@click.option("--trust-remote-code", "--trust_remote_code", is_flag=True, hidden=True)
@click.option("--use-cpu-initialization", "--use_cpu_initialization", is_flag=True, hidden=True)
@friendly
def verl_test(backend: str, local_dir: Path, test_hf_dir: Path, **_: Any) -> None:
    """verl's `model_merger test`: the checkpoint, merged on the fly, must equal --test_hf_dir."""
    _verify(test_hf_dir, local_dir, backend=backend, logits=False, as_json=False)


def _verify(candidate: Path, reference: Path, *, backend: str, logits: bool, as_json: bool) -> None:
    from hubexport.errors import DifferencesFound
    from hubexport.verify import verify as do_verify

    report = do_verify(candidate, reference, backend=backend, logits=logits, log=say)
    if as_json:
        emit_json({"ok": report.ok, **_jsonable(report)})
    else:
        for d in report.differences[:50]:
            click.echo(f"{d.kind:8} {d.name}: {d.detail}")
        more = len(report.differences) - 50
        click.echo(f"... and {more} more" if more > 0 else "", nl=more > 0)
        logit = f", max |Δlogits| {report.max_logit_diff:.3g}" if report.max_logit_diff is not None else ""
        click.echo(f"{'OK' if report.ok else 'DIFFERENT'}: {report.compared} tensors compared, "
                   f"{len(report.differences)} difference(s){logit}")
    if not report.ok:
        raise DifferencesFound(f"{candidate} differs from {reference} ({len(report.differences)} difference(s), "
                               f"first: {report.differences[0].name})", hint="see the list above")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(["auto", "fsdp", "megatron"]), default="auto", show_default=True)
@click.option("--max-shard-size", "--max_shard_size", default="5GB", show_default=True)
@click.option("--dtype", type=DTYPES, default=None, help="Plan with this cast.")
@click.option("--trust-remote-code", "--trust_remote_code", "trust_remote_code", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly
def inspect(path: Path, backend: str, max_shard_size: str, dtype: str | None, trust_remote_code: bool,
            as_json: bool) -> None:
    """Show what PATH is (format, parallel layout, architecture, dtype, parameters) and the conversion plan,
    without reading tensor data."""
    from hubexport.inspection import inspect as do_inspect
    from hubexport.inspection import render_text

    info = do_inspect(path, backend=backend, max_shard_size=max_shard_size, dtype=dtype,
                      trust_remote_code=trust_remote_code)
    if as_json:
        emit_json(info)
    else:
        click.echo(render_text(info))


@cli.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("demo-out"), show_default=True,
              help="Where the demo checkpoint and the merged model go.")
@click.option("--world-size", default=2, show_default=True, help="FSDP processes for the demo training step.")
@friendly
def demo(out_dir: Path, world_size: int) -> None:
    """Train a tiny model one step with real FSDP on CPU, save it verl-style, merge it and verify it."""
    from hubexport.demo import run_demo

    run_demo(out_dir, world_size=world_size, log=say)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so the staging folder is removed on the way out


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    cli(prog_name="hubexport")


# ---- hidden helpers of the GitHub Action (action.yml) ----------------------------------------------------------------
@cli.command("oidc-token", hidden=True)
@click.option("--repo-id", required=True, help="The repo that trusts this workflow (namespace/name).")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Write the token here (mode 600).")
@friendly
def oidc_token(repo_id: str, output: Path) -> None:
    """Exchange this job's OIDC id token for a short-lived Hub token limited to REPO_ID (Trusted Publishers) and
    write it to OUTPUT. Prints no token."""
    from hubexport.oidc import exchange, write_private

    write_private(output, exchange(repo_id, log=say))


@cli.command("failure-summary", hidden=True)
@click.option("--stage", required=True, help="The action step that failed, e.g. 'merging and pushing'.")
@click.option("--log", "log_path", type=click.Path(path_type=Path), default=None, help="That step's captured stderr.")
@click.option("--repo-id", default="")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None)
@click.option("--target-dir", type=click.Path(path_type=Path), default=None)
@click.option("--since", type=click.Path(path_type=Path), default=None,
              help="A file touched when the step started: a target-dir counts as merged only if written after it.")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Append the markdown here.")
@friendly
def failure_summary(stage: str, log_path: Path | None, repo_id: str, checkpoint: Path | None,
                    target_dir: Path | None, since: Path | None, output: Path) -> None:
    """Append the job summary of a failed action run to OUTPUT, and print the error as a GitHub annotation."""
    from hubexport.failure import annotation, read_failure, render_failure

    failure = read_failure(stage, log_path, repo_id=repo_id, checkpoint=checkpoint, target_dir=target_dir, since=since)
    with open(output, "a") as f:
        f.write(render_failure(failure))
    click.echo(annotation(failure))
