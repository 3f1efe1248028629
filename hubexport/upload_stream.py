"""Sending a merge's weight files while the merge goes on (`push` of a training checkpoint).

Each weight file's LFS object goes up as soon as the writer has written and hashed it, from background threads on rank
0, while the next file is merged. Several files go at once (as `upload_folder` sends them): the Hub client sends one
file's parts one after another, which alone leaves the link idle between parts. Nothing is published by that: the one
commit that publishes the model is made after the gate and the card (`hub.upload` reuses what was sent, so no byte
goes twice). A re-run sends nothing the Hub already stores (the LFS batch answer says so). A run that fails or is
refused before its commit leaves an existing repo as it was, and removes the repo it created itself, which then holds
nothing of its own."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hubexport import hub
from hubexport.errors import HubError
from hubexport.options import PushOptions

if TYPE_CHECKING:
    from huggingface_hub import CommitOperationAdd


Admit = Callable[[Path], "bool | None"]  # a written file → send it (and every held one), hold it, or send no more
SENDERS = 4  # files in flight at once: enough to keep a link busy between one file's parts


@dataclass(frozen=True)
class _File:
    path_in_repo: str
    file: Path
    sha256: str


class UploadStream:
    """One background thread judges each added file with `admit` (the publish gate, file by file, in order). A file
    that may go is handed to `SENDERS` sending threads; one that may not go yet is held until the whole model is
    judged, or never sent."""

    def __init__(self, session: hub._Session, options: PushOptions, repo_id: str, admit: Admit | None = None) -> None:
        self.session, self.options, self.repo_id = session, options, repo_id
        self.admit = admit
        self.target: hub.RepoTarget | None = None  # opened (the repo made if missing) before the first file goes
        self.sent: dict[str, CommitOperationAdd] = {}
        self._held: list[_File] = []
        self._admitted = admit is None
        self._queue: queue.Queue[_File | None] = queue.Queue()
        self._error: Exception | None = None
        self._outbox: queue.Queue[_File | None] = queue.Queue()  # admitted files, for the sending threads
        self._lock = threading.Lock()  # the repo is opened once, by the first file to go
        self._stopped = threading.Event()
        # Daemons: an upload in flight never holds up the exit of a run that failed or was interrupted.
        self._thread = threading.Thread(target=self._run, name="hubexport-upload", daemon=True)
        self._senders = [threading.Thread(target=self._send_loop, name=f"hubexport-send-{i}", daemon=True)
                         for i in range(SENDERS)]
        for t in (self._thread, *self._senders):
            t.start()

    def add(self, path_in_repo: str, file: Path, sha256: str) -> None:
        """Judge and send this finished file in the background; an upload error is raised by finish()."""
        self._queue.put(_File(path_in_repo, file, sha256))

    def settle(self) -> None:
        """Wait until every added file is judged, and sent if it may go: before the gate's verdict on the whole
        model (it reuses what `admit` computed) and before the files move into place."""
        self._queue.join()
        self._outbox.join()

    def release(self) -> None:
        """The whole model passed the gate: send what was held."""
        self._admitted = True
        for f in self._held:
            self._queue.put(f)
        self._held.clear()
        self.settle()

    def finish(self) -> tuple[hub.RepoTarget | None, dict[str, CommitOperationAdd]]:
        """The repo opened and the operations to commit; the first upload error, if any, is raised here."""
        self.settle()
        self._queue.put(None)
        self._thread.join()
        for _ in self._senders:
            self._outbox.put(None)
        for t in self._senders:
            t.join()
        if self._error is not None:
            raise self._error
        return self.target, self.sent

    def abort(self, *, remove: bool) -> None:
        """The run stops before its commit: send nothing more. `remove`: the model will not be published (refused,
        the merge failed), so a repo this run created goes too; after a Hub error it stays, and a re-run reuses what
        it holds."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._queue.put(None)
        self._thread.join(timeout=1.0)  # an upload in flight is abandoned (its LFS object is never committed)
        for _ in self._senders:
            self._outbox.put(None)
        with self._lock:  # a repo being opened right now is known once this returns; no file opens one after it
            target = self.target
        if not remove or target is None or not target.created:
            return
        s = self.session
        try:
            with hub.errors(s, f"removing {self.repo_id}", self.repo_id):
                s.api.delete_repo(self.repo_id, missing_ok=True)
            s.log(f"removed {self.repo_id}: this run created it and committed nothing to it")
        except HubError as e:
            s.log(f"warning: {self.repo_id} was created by this run and holds nothing; {e.message} "
                  f"(delete it at {target.url}/settings)")

    def _run(self) -> None:
        self._drain(self._queue, self._judge)

    def _send_loop(self) -> None:
        self._drain(self._outbox, self._send)

    def _drain(self, inbox: queue.Queue[_File | None], step: Callable[[_File], None]) -> None:
        while (item := inbox.get()) is not None:
            self._guarded(step, item)
            inbox.task_done()
        inbox.task_done()

    def _guarded(self, step: Callable[[_File], None], f: _File) -> None:
        try:
            if not self._stopped.is_set() and self._error is None:
                step(f)
        except Exception as e:  # the first one is raised by finish(), on the main thread
            self._error = self._error or e

    def _judge(self, f: _File) -> None:
        if self._admitted:
            self._dispatch(f)
            return
        verdict = self.admit(f.file)
        if verdict is None:
            self._held.append(f)
        elif verdict:
            self._admitted = True
            for held in [*self._held, f]:
                self._dispatch(held)
            self._held.clear()
        else:  # refused: the gate's verdict on the whole model will say why
            self._stopped.set()

    def _dispatch(self, f: _File) -> None:
        if not self._stopped.is_set():
            self._outbox.put(f)

    def _send(self, f: _File) -> None:
        s, o = self.session, self.options
        with self._lock:
            if self._stopped.is_set():  # aborted while this file waited: never make the repo now
                return
            if self.target is None:
                self.target = hub.open_target(s, self.repo_id, o)
        op = hub.addition(f.path_in_repo, f.file, f.sha256)
        with hub.errors(s, f"uploading {f.path_in_repo} to {self.repo_id}", self.repo_id), hub.xet_only_on_hf(s.endpoint):
            s.api.preupload_lfs_files(self.repo_id, [op], revision=o.revision or "main", create_pr=o.create_pr,
                                      num_threads=1, free_memory=False)
        if op._is_uploaded:  # an LFS file (weights always are); anything else goes with the commit
            self.sent[f.path_in_repo] = op
            s.log(f"{f.path_in_repo} is on the Hub ({op.upload_info.size:,} bytes), sent while the merge goes on")
