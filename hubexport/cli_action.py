"""The CLI commands the GitHub Action (action.yml) calls: the step summary and outputs of a push, the keyless (OIDC)
token exchange, and the summary of a failed run."""

from __future__ import annotations

from pathlib import Path

import click

from hubexport.cli_output import friendly, say


# ---- summary: a push result rendered for CI (the GitHub Action's step summary and outputs) ---------------------------
@click.command()
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


# ---- hidden helpers of the GitHub Action (action.yml) ----------------------------------------------------------------
@click.command("oidc-token", hidden=True)
@click.option("--repo-id", required=True, help="The repo that trusts this workflow (namespace/name).")
@click.option("--output", required=True, type=click.Path(path_type=Path), help="Write the token here (mode 600).")
@friendly
def oidc_token(repo_id: str, output: Path) -> None:
    """Exchange this job's OIDC id token for a short-lived Hub token limited to REPO_ID (Trusted Publishers) and
    write it to OUTPUT. Prints no token."""
    from hubexport.oidc import exchange, write_private

    write_private(output, exchange(repo_id, log=say))


@click.command("failure-summary", hidden=True)
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
