"""The Click CLI: parse options, call one package function, render text or --json. Errors become one line + a hint."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import click

from hubexport import __version__, cli_action
from hubexport.cli_options import (
    BACKEND,
    CARD_BASE_MODEL,
    CPU_INIT,
    DTYPES,
    JSON,
    MAX_SHARD_SIZE,
    OVERWRITE,
    TRUST_REMOTE_CODE,
    VISIBILITY,
    card_options,
    lora_base_option,
    merge_options,
    publish_options,
    take_card_options,
    take_merge_options,
    take_publish_options,
)
from hubexport.cli_output import emit_json, friendly, jsonable, say, say_once
from hubexport.options import MegatronOptions, Output, PushOptions


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="hubexport")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Turn sharded RL training checkpoints (verl FSDP, Megatron torch_dist) into Hugging Face models, and back."""


@cli.command()
@click.option("--local-dir", "--local_dir", "local_dir", required=True, type=click.Path(path_type=Path),
              help="global_step_N/actor, global_step_N, or the run root with latest_checkpointed_iteration.txt.")
@click.option("--target-dir", "--target_dir", "target_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder (created atomically; never the checkpoint, inside it or above it).")
@merge_options
@lora_base_option("--base-model", "--base_model", "--lora-base-model")
@click.option("--hf-upload-path", "--hf_upload_path", "hf_upload_path", default=None,
              help="verl flag: push the merged model to this Hub repo id (token checked before the merge; the card "
                   "is written into --target-dir).")
@VISIBILITY
@card_options
@publish_options
@click.option("--dry-run", is_flag=True, help="Print the plan; read no tensor and write nothing.")
@JSON
@friendly
def merge(local_dir: Path, target_dir: Path, hf_upload_path: str | None, private: bool | None, dry_run: bool,
          as_json: bool, overwrite: bool, **kw: Any) -> None:
    """Merge a sharded training checkpoint into a Hugging Face model folder."""
    from hubexport import executor

    options = take_merge_options(kw)
    card = take_card_options(kw)
    publish = take_publish_options(kw)
    push = PushOptions(hf_upload_path, private=private, dry_run=dry_run, card=card, **publish) if hf_upload_path else None
    result = executor.merge(local_dir, Output(target_dir, overwrite, dry_run), options, push=push, log=say)
    if as_json:
        emit_json(result)


@cli.command("to-megatron")
@click.option("--hf-model-path", "--hf_model_path", "hf_model_path", required=True,
              help="Hugging Face model folder (config.json + safetensors, sharded or not), or a Hub id "
                   "ORG/NAME[@REVISION] (downloaded once into the Hugging Face cache; HF_TOKEN, HF_ENDPOINT, "
                   "HF_HUB_OFFLINE honoured).")
@click.option("--dtype", type=DTYPES, default=None,
              help="What FP8 block-quantized weights (DeepSeek-V3 as published) are dequantized into [default: bf16].")
@click.option("--output-path", "--output_path", "output_path", required=True, type=click.Path(path_type=Path),
              help="Where the torch_dist checkpoint goes (created atomically).")
@click.option("--spec", type=click.Choice(["te", "local"]), default="te", show_default=True,
              help="Layer spec of the model that will load it: Transformer Engine, or megatron's local modules.")
@click.option("--test", is_flag=True, help="Re-read the written checkpoint and compare it with the HF tensors.")
@OVERWRITE
@TRUST_REMOTE_CODE
@CPU_INIT
@click.option("--pp-size", "--pp_size", "pp_size", type=int, default=None, hidden=True,
              help="Accepted for verl compatibility; the checkpoint loads at any PP.")
@click.option("--ep-size", "--ep_size", "ep_size", type=int, default=None, hidden=True,
              help="Accepted for verl compatibility; the checkpoint loads at any EP.")
@JSON
@friendly
def to_megatron(hf_model_path: str, output_path: Path, dtype: str | None, spec: str, test: bool, overwrite: bool,
                trust_remote_code: bool, use_cpu_initialization: bool, pp_size: int | None, ep_size: int | None,
                as_json: bool) -> None:
    """Convert a Hugging Face model into a megatron-core torch_dist checkpoint, on CPU, loadable at any TP/PP/EP.

    Under torchrun every rank writes its share; the output path must then be on a shared filesystem."""
    from hubexport import executor

    if pp_size or ep_size:
        say_once("--pp_size/--ep_size ignored: the checkpoint holds global tensors that load at any TP/PP/EP")
    result = executor.to_megatron(hf_model_path, Output(output_path, overwrite, option="--output-path"),
                                  MegatronOptions(spec, test, trust_remote_code, dtype), log=say)
    if as_json:
        emit_json(result)


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@CARD_BASE_MODEL
@card_options
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Where to write the card; - for stdout. Default: FOLDER/README.md.")
@click.option("--overwrite", is_flag=True, help="Replace a README.md you wrote (one hubexport generated is always "
                                                "replaced).")
@friendly
def card(folder: Path, output: Path | None, overwrite: bool, **kw: Any) -> None:
    """Render the model card (README.md) of a Hugging Face model folder; its metadata is validated."""
    from hubexport.readme import check_replaceable, render

    path = None if output == Path("-") else output or folder / "README.md"
    if path is not None and not overwrite:
        check_replaceable(path)
    text = render(folder, take_card_options(kw), repo_id=None, merge_result=None, sha256={}, log=say)
    if path is None:
        click.echo(text, nl=False)
        return
    path.write_text(text)
    say(f"wrote {path}")


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--repo-id", "--repo_id", "repo_id", required=True, help="namespace/name (or just name: yours).")
@VISIBILITY
@click.option("--revision", default=None, help="Branch to push to; created from main if missing.")
@click.option("--commit-message", default=None, help="Commit title.")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--target-dir", "--target_dir", "target_dir", type=click.Path(path_type=Path), default=None,
              help="For a checkpoint: keep the merged model (and its card) here (default: a temporary directory, "
                   "removed after).")
@CARD_BASE_MODEL
@card_options
@merge_options
@lora_base_option("--lora-base-model")
@publish_options
@click.option("--select", default="latest", show_default=True, metavar="latest|best:METRIC",
              help="For a run root: the global_step_N to publish; best:<metric> takes the step with the highest "
                   "logged value of that validation metric (ties: the latest), named in the card and the commit.")
@click.option("--dry-run", is_flag=True, help="Show what would be uploaded; create and send nothing.")
@click.option("--offline", is_flag=True, help="With --dry-run: make no request at all (no token needed) and list "
                                              "every file that would be sent.")
@JSON
@friendly
def push(source: Path, repo_id: str, private: bool | None, revision: str | None, commit_message: str | None,
         create_pr: bool, target_dir: Path | None, select: str, dry_run: bool, offline: bool, as_json: bool,
         overwrite: bool, **kw: Any) -> None:
    """Push a model folder to the Hub, or merge a training checkpoint, render its card and push it.

    The folder is never written to: a generated card is uploaded from memory (your own README.md is kept). Token
    from HF_TOKEN (or `hf auth login`), endpoint from HF_ENDPOINT. Re-running is safe: unchanged files are not
    sent, and a run with nothing new makes no commit."""
    from hubexport import executor

    card = take_card_options(kw)
    options = PushOptions(repo_id, private=private, revision=revision, commit_message=commit_message,
                          create_pr=create_pr, dry_run=dry_run, card=card, offline=offline, select=select,
                          **take_publish_options(kw))
    target = Output(target_dir, overwrite) if target_dir is not None else None
    result = executor.push(source, options, take_merge_options(kw), target=target, log=say)
    if result is None:  # a torchrun rank other than 0: it merged its share, rank 0 pushed and reports
        return
    pushed = result.push
    if as_json:
        emit_json(pushed)
        return
    click.echo(f"repo:     {pushed.repo_url} ({'private' if pushed.private else 'public'})")
    click.echo(f"revision: {pushed.revision}")
    if pushed.commit_sha:
        click.echo(f"commit:   {pushed.commit_sha} {pushed.commit_url}" + (" (no change)" if pushed.no_op else ""))
    if pushed.pr_url:
        click.echo(f"pr:       {pushed.pr_url}")
    verb = "would upload" if dry_run else "uploaded"
    click.echo(f"{verb}: {pushed.files_uploaded} files, {pushed.bytes_uploaded:,} bytes")


@cli.command()
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--reference", required=True,
              help="An HF folder (single-file or sharded), a Hub id ORG/NAME[@REVISION], or a training checkpoint "
                   "merged on the fly.")
@BACKEND
@click.option("--logits", is_flag=True, help="Also load both with transformers on CPU and compare logits.")
@JSON
@friendly
def verify(candidate: Path, reference: Path, backend: str, logits: bool, as_json: bool) -> None:
    """Compare CANDIDATE with a reference tensor by tensor (exit 0 = same, 1 = differences, 2 = error)."""
    _verify(candidate, reference, backend=backend, logits=logits, as_json=as_json)


@cli.command("test", hidden=True)
@BACKEND
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
        emit_json({"ok": report.ok, **jsonable(report)})
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
@BACKEND
@MAX_SHARD_SIZE
@click.option("--dtype", type=DTYPES, default=None, help="Plan with this cast.")
@TRUST_REMOTE_CODE
@JSON
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


@cli.command()
@click.argument("candidate", type=click.Path(path_type=Path))
@click.option("--base", required=True, type=click.Path(path_type=Path), help="The base model's HF folder.")
@click.option("--check", is_flag=True, help="Also apply push's publish gate: exit 2 for a model identical to its base "
                                            "or holding NaN/Inf.")
@click.option("--allow-unchanged", is_flag=True, help="With --check: accept a model identical to its base.")
@click.option("--allow-nonfinite", is_flag=True, help="With --check: accept NaN/Inf weights.")
@JSON
@friendly
def diff(candidate: Path, base: Path, check: bool, allow_unchanged: bool, allow_nonfinite: bool, as_json: bool) -> None:
    """How far CANDIDATE moved from BASE: ‖ΔW‖/‖W‖, max |ΔW|, unchanged tensors, NaN/Inf, drift, per module type."""
    from hubexport.diff import check_publishable, diff_models, render_text

    report = diff_models(candidate, base, log=say)
    if as_json:
        emit_json(report.to_dict())
    else:
        click.echo(render_text(report))
    if check:
        for note in check_publishable(report, allow_unchanged=allow_unchanged, allow_nonfinite=allow_nonfinite):
            say(f"warning: {note}")


cli.add_command(cli_action.summary)
cli.add_command(cli_action.oidc_token)
cli.add_command(cli_action.failure_summary)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so the staging folder is removed on the way out


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)
    cli(prog_name="hubexport")

