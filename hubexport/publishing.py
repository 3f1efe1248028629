"""Publishing a folder: the token preflight (run before any work), the README decision and the upload. Rank 0 alone
creates a Publisher; it never writes into the folder it publishes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from hubexport import hub
from hubexport.card import check_card_options
from hubexport.hub import PushResult
from hubexport.model_facts import facts_from_merge, model_facts
from hubexport.options import PushOptions
from hubexport.readme import render
from hubexport.result import Result


@dataclass
class Publisher:
    session: hub._Session
    options: PushOptions
    repo_id: str  # namespace/name, the namespace filled in from whoami

    @classmethod
    def connect(cls, options: PushOptions, log: Callable[[str], None]) -> Publisher:
        """Token, role and namespace checked, and the card options loaded, before anything is merged or sent."""
        check_card_options(options.card)
        session = hub.connect(options.endpoint, options.token, log)
        return cls(session, options, hub.preflight(session, options.repo_id))

    def render_card(self, folder: Path, result: Result) -> str:
        """The card of a merge hubexport made itself (written into its output before it is published)."""
        return render(folder, self.options.card, repo_id=self.repo_id, merge_result=result,
                      sha256=_digests(result), log=self.session.log)

    def publish(self, folder: Path, *, card: str | None, merge_result: Result | None = None) -> PushResult:
        """One commit of what changed. `card`: the README text to upload in place of the folder's (None: the
        folder's own README.md, or none)."""
        known = _digests(merge_result) if merge_result else {}
        step = merge_result.global_step if merge_result else None
        message = f"Upload global_step_{step} with hubexport" if step is not None else "Upload model with hubexport"
        return hub.upload(self.session, folder, self.options, repo_id=self.repo_id,
                          extra={"README.md": card.encode()} if card is not None else {}, known=known,
                          facts=lambda sha256: model_facts(folder, merge_result, sha256), message=message)

    def planned(self, result: Result) -> PushResult:
        """--dry-run of a checkpoint: what the merge would write, and where it would go."""
        size = sum(f.size for f in result.files)
        self.session.log(f"dry run: would merge into {len(result.files)} files ({size:,} bytes) and push them to "
                         f"{self.repo_id}")
        return PushResult(self.repo_id, f"{self.session.endpoint}/{self.repo_id}", None, None,
                          self.options.revision or "main", bool(self.options.private), len(result.files), size,
                          no_op=False, model=facts_from_merge(result, {}), dry_run=True)


def _digests(result: Result) -> Mapping[str, str]:
    return {f.name: f.sha256 for f in result.files if f.sha256}
