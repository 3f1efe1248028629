"""Publishing a folder: the token preflight (run before any work), the README decision and the upload. Rank 0 alone
creates a Publisher; it never writes into the folder it publishes. An offline publisher (`--dry-run --offline`)
makes no request at all: it lists every file that would be sent, without asking the Hub what it already holds."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from hubexport import hub
from hubexport.card import CardEvidence, check_card_options
from hubexport.errors import ConfigError
from hubexport.hub import PushResult
from hubexport.model_facts import ModelFacts, facts_from_merge, model_facts
from hubexport.options import PushOptions
from hubexport.readme import render
from hubexport.result import Result
from hubexport.upload_stream import Admit, UploadStream


@dataclass
class Publisher:
    session: hub._Session | None  # None offline: no request is made
    options: PushOptions
    repo_id: str  # namespace/name, the namespace filled in from whoami
    log: Callable[[str], None]

    @classmethod
    def connect(cls, options: PushOptions, log: Callable[[str], None]) -> Publisher:
        """Token, role and namespace checked, and the card options loaded, before anything is merged or sent."""
        check_card_options(options.card)
        if options.offline:
            if "/" not in options.repo_id:
                raise ConfigError(f"--repo-id {options.repo_id!r} needs its namespace with --offline",
                                  hint="offline there is no whoami to fill it in: pass namespace/name")
            log("dry run, offline: no request is made; every file is listed as if the repo were empty")
            return cls(None, options, options.repo_id, log)
        session = hub.connect(options.endpoint, options.token, log)
        return cls(session, options, hub.preflight(session, options.repo_id), log)

    @property
    def endpoint(self) -> str:
        from hubexport.resolve import hub_environment

        return self.session.endpoint if self.session else (self.options.endpoint or hub_environment()[0])

    def render_card(self, folder: Path, result: Result, evidence: CardEvidence = CardEvidence()) -> str:
        """The card of a merge hubexport made itself (written into its output before it is published)."""
        return render(folder, self.options.card, repo_id=self.repo_id, merge_result=result,
                      sha256=_digests(result), log=self.log, evidence=evidence)

    def stream(self, admit: Admit | None = None) -> UploadStream | None:
        """Weight files sent as they are merged, once `admit` lets them (None offline or on a dry run: nothing is
        sent)."""
        if self.session is None or self.options.dry_run:
            return None
        return UploadStream(self.session, self.options, self.repo_id, admit)

    def publish(self, folder: Path, *, card: str | None, merge_result: Result | None = None,
                extra: Mapping[str, bytes] | None = None, selection: str | None = None,
                known: Mapping[str, str] | None = None, stream: UploadStream | None = None) -> PushResult:
        """One commit of what changed. `card`: the README text to upload in place of the folder's (None: the
        folder's own README.md, or none); `extra`: more files made in memory (evaluation results); `selection`:
        why this step was chosen, for the commit title; `known`: sha256 digests already computed, by file name;
        `stream`: what was sent while the folder was merged."""
        known = {**(_digests(merge_result) if merge_result else {}), **(known or {})}
        step = merge_result.global_step if merge_result else None
        message = f"Upload global_step_{step} with hubexport" if step is not None else "Upload model with hubexport"
        if selection:
            message += f" ({selection.split(',')[0]})"
        files = {**(extra or {}), **({"README.md": card.encode()} if card is not None else {})}

        def facts(sha256: dict[str, str]) -> ModelFacts:
            return model_facts(folder, merge_result, sha256)

        if self.session is None:
            return self._offline_listing(folder, files, known, facts)
        target, sent = stream.finish() if stream is not None else (None, {})
        return hub.upload(self.session, folder, self.options, repo_id=self.repo_id, extra=files, known=known,
                          facts=facts, message=message, target=target, sent=sent)

    def _offline_listing(self, folder: Path, extra: Mapping[str, bytes], known: Mapping[str, str],
                         facts: Callable[[dict[str, str]], ModelFacts]) -> PushResult:
        local = hub.local_files(folder, known, extra)
        for f in local:
            self.log(f"  + {f.path} ({f.size:,} bytes{', generated' if isinstance(f.file, bytes) else ''})")
        size = sum(f.size for f in local)
        self.log(f"dry run, offline: would upload {len(local)} files ({size:,} bytes) to {self.repo_id}; "
                 "nothing was sent")
        return PushResult(self.repo_id, f"{self.endpoint}/{self.repo_id}", None, None,
                          self.options.revision or "main", bool(self.options.private), len(local), size, no_op=False,
                          target_dir=str(folder), model=facts({f.path: f.sha256 for f in local}), dry_run=True)

    def planned(self, result: Result) -> PushResult:
        """--dry-run of a checkpoint: what the merge would write, and where it would go."""
        size = sum(f.size for f in result.files)
        self.log(f"dry run: would merge into {len(result.files)} files ({size:,} bytes) and push them to {self.repo_id}")
        return PushResult(self.repo_id, f"{self.endpoint}/{self.repo_id}", None, None,
                          self.options.revision or "main", bool(self.options.private), len(result.files), size,
                          no_op=False, model=facts_from_merge(result, {}), dry_run=True)


def _digests(result: Result) -> Mapping[str, str]:
    return {f.name: f.sha256 for f in result.files if f.sha256}
