"""One executor for every command. A command is a job (detect → source → mapping → plan, done before any byte moves)
run through the same steps: safety checks → token preflight when it will push → lock and stage → every rank writes
its share → rank 0 finishes the folder → read-back checks → swap into place → card and upload on rank 0.

The rules kept here, once: the target is never the input, inside it or above it; nothing under an input is written;
one run at a time owns a target and stages into its own folder; a failure on any rank stops every rank; only rank 0
talks to the Hub, once."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from hubexport.card import find_training_config
from hubexport.detect import is_hf_folder
from hubexport.dist import Dist
from hubexport.errors import HubError, TargetError
from hubexport.first_merge import Unconfirmed
from hubexport.launch import alone_if
from hubexport.model_facts import sha256_file
from hubexport.options import MegatronOptions, MergeOptions, Output, PushOptions
from hubexport.publishing import Publisher
from hubexport.readme import readme_to_publish
from hubexport.result import OnFile, Result, Throughput, WrittenFile
from hubexport.targets import (
    TargetLock,
    check_disjoint,
    check_target,
    discard,
    new_staging,
    swap_into_place,
    uninterrupted,
)

if TYPE_CHECKING:
    from hubexport.evidence import Evidence
    from hubexport.gate import FileGate
    from hubexport.resolve import ResolvedModel

Log = Callable[[str], None]


class Job(Protocol):
    """One direction's parts, planned before any byte moves."""

    inputs: tuple[Path, ...]  # what the user owns: never written, and the target must not overlap it

    def result(self, command: str, target: Path) -> Result: ...
    def describe(self, result: Result) -> list[str]: ...
    def planned_files(self) -> list[WrittenFile]: ...
    def precheck(self) -> None: ...  # rank 0, before any write
    def write(self, tmp: Path, dist: Dist, on_file: OnFile | None = None) -> list[WrittenFile]: ...  # every rank
    def finish(self, tmp: Path, files: list[WrittenFile]) -> None: ...  # rank 0, after every rank wrote
    def check(self, tmp: Path, dist: Dist) -> None: ...  # every rank, before the swap
    def done(self, result: Result) -> str: ...
    def close(self) -> None: ...


def _silent(_: str) -> None:
    pass


def merge(local_dir: Path, out: Output, options: MergeOptions = MergeOptions(), *, push: PushOptions | None = None,
          log: Log = print, command: str = "merge", selection: str | None = None, kept: bool = True) -> Result:
    """Merge a training checkpoint into a save_pretrained-style folder at `out.target`; with `push`, gate it against
    its base model, card it into that folder and publish it (the token is checked before the merge). `selection`:
    why this step of the run (--select); `kept`: whether `out.target` outlives this call (not push's temporary)."""
    from hubexport.resolve import resolve_model

    check_disjoint(out.target, [local_dir, options.lora_base_model], option=out.option)
    check_target(out.target, overwrite=out.overwrite, option=out.option)
    alone = alone_if(lambda world: _fast_hf_job(local_dir, options, plan_beside=not out.dry_run, processes=world),
                     why="copies this merge file to file without torch, several files at a time")
    with _closed_on_error(alone):
        dist = Dist.from_env()
        log = log if dist.is_main else _silent
        publisher = _connect(push, local_dir, dist, log) if push else None
        base = None
        if options.lora_base_model is not None:  # a local folder, or a Hub id downloaded once
            base = resolve_model(options.lora_base_model, purpose="--base-model", log=log, dist=dist)
            options = replace(options, lora_base_model=base.path)
    job = alone or dist.run(lambda: _hf_job(local_dir, options, fast=dist.world_size == 1, plan_beside=not out.dry_run))
    proof = _evidence(job, local_dir, base, push, selection, log, dist) if push else None
    files = _file_gate(proof, push) if publisher is not None and not out.dry_run else None
    stream = publisher.stream(files and files.admit) if publisher is not None and not out.dry_run else None  # rank 0

    card: list[str] = []

    def write_card(tmp: Path, result: Result) -> None:  # into the folder this run made, before it is published
        if stream is not None:
            stream.settle()  # every file judged (the gate's rows), and sent if it may go
        proof.check(tmp, push, name=out.target, log=log, files=files)
        if stream is not None:  # the held files go once the model passed; nothing more when it is refused
            stream.abort(remove=True) if proof.delta and proof.delta.refusal else stream.release()
        proof.write_into(tmp)
        card.append(publisher.render_card(tmp, result, proof.card()))
        (tmp / "README.md").write_text(card[0])

    def send(f: WrittenFile, path: Path) -> None:
        if f.name.endswith(".safetensors"):
            stream.add(f.name, path, f.sha256)

    def run(job: Job) -> Result:
        return execute(job, out, command, dist, log, before_swap=write_card if publisher else None,
                       on_file=send if stream is not None else None)

    try:
        check_disjoint(out.target, job.inputs, option=out.option)
        try:
            result = run(job)
        except Unconfirmed as e:  # a first merge's guess (one process): nothing of it left the job
            unconfirmed = str(e)
        else:
            unconfirmed = None
        if unconfirmed is not None:  # outside the handler: the full path's own error is not chained to it
            job.close()
            log(unconfirmed)
            job = _hf_job(local_dir, options, fast=False)
            result = run(job)
        result.resolved = base.as_json() if base is not None and base.repo_id else None
        if proof is not None and not out.dry_run:  # the merged folder stays as it is; nothing is uploaded
            dist.run(lambda: proof.raise_refusal(out.target if kept else None), main_only=True)
        if push is not None:  # rank 0 uploads; the others wait, so every rank leaves (and tears gloo down) together
            result.push = dist.run(lambda: proof.annotate(publisher.planned(result) if out.dry_run else publisher.publish(
                out.target, card=card[0], merge_result=result, selection=selection, stream=stream)), main_only=True)
    except BaseException as e:
        if stream is not None:  # not published: after a Hub error the repo stays for a re-run to reuse
            stream.abort(remove=not isinstance(e, HubError))
        raise
    finally:
        job.close()
        if files is not None:
            files.close()
    return result


def _hf_job(local_dir: Path, options: MergeOptions, *, fast: bool, plan_beside: bool = False) -> Job:
    """The fast path's job when it can repeat a recorded merge, or write a first one while it is planned (one
    process, `first_merge`), else the full path's."""
    if fast and (job := _fast_hf_job(local_dir, options, plan_beside=plan_beside)) is not None:
        return job
    from hubexport.to_hf import HfJob, prepare

    return HfJob(prepare(local_dir, options), local_dir)


def _fast_hf_job(local_dir: Path, options: MergeOptions, *, plan_beside: bool, processes: int = 1) -> Job | None:
    """`processes`: torchrun's, as one process writing at least as many files at a time."""
    from hubexport import fast_merge

    return fast_merge.job(local_dir, options, plan_beside=plan_beside, writers=max(processes, fast_merge.WRITERS))


@contextlib.contextmanager
def _closed_on_error(job: Job | None) -> Iterator[None]:
    """A job made before the steps in the block is closed when one of them fails."""
    try:
        yield
    except BaseException:
        if job is not None:
            job.close()
        raise


def _mcore_job(model: ResolvedModel, options: MegatronOptions, dist: Dist) -> Job:
    """The fast path's job when it can repeat a recorded conversion (one process), else the full path's."""
    if dist.world_size == 1 and (job := _fast_mcore_job(model, options)) is not None:
        return job
    from hubexport.to_mcore import McoreJob

    return McoreJob(model, options, dist)


def _fast_mcore_job(model: ResolvedModel, options: MegatronOptions) -> Job | None:
    from hubexport import fast_to_mcore

    return fast_to_mcore.job(model, options)


def _model(hf_model: str | Path, out: Output, log: Log, dist: Dist | None = None) -> ResolvedModel:
    """The folder to convert (a Hub id fetched once), never the target or around it."""
    from hubexport.resolve import resolve_model

    model = resolve_model(hf_model, purpose="--hf-model-path", log=log, dist=dist)
    check_disjoint(out.target, [model.path], option=out.option)
    return model


def _file_gate(proof: Evidence, push: PushOptions) -> FileGate | None:
    """The publish gate file by file, when there is a base to compare the weights with."""
    from hubexport import gate

    return gate.FileGate(proof.base, push.gate) if proof.base is not None else None


def _evidence(job, local_dir: Path, lora_base, push: PushOptions, selection: str | None, log: Log, dist: Dist):
    """The base the gate will diff against and the run's evaluation results, before the merge."""
    from hubexport import evidence, gate

    layout = job.layout
    named = gate.Base(lora_base.path, lora_base.repo_id or lora_base.path.name, "--lora-base-model") \
        if lora_base is not None else None
    return evidence.for_checkpoint(local_dir, step=layout.global_step, config_dir=layout.hf_dir, lora_base=named,
                                   options=push, selection=selection, log=log, dist=dist)


def to_megatron(hf_model: str | Path, out: Output, options: MegatronOptions = MegatronOptions(), *,
                log: Log = print) -> Result:
    """Convert a Hugging Face folder, or a Hub id `ORG/NAME[@REVISION]` (downloaded once), into a megatron-core
    torch_dist checkpoint at `out.target`."""
    check_disjoint(out.target, [hf_model], option=out.option)
    check_target(out.target, overwrite=out.overwrite, option=out.option)
    job = alone_if(lambda world: _fast_mcore_job(_model(hf_model, out, log), options),
                   why="copies this conversion file to file without torch")
    with _closed_on_error(job):
        dist = Dist.from_env()
        log = log if dist.is_main else _silent
        if job is None:
            model = _model(hf_model, out, log, dist)
            job = dist.run(lambda: _mcore_job(model, options, dist))
    try:
        return execute(job, out, "to-megatron", dist, log)
    finally:
        job.close()


def push(source: Path, options: PushOptions, merge_options: MergeOptions = MergeOptions(), *,
         target: Output | None = None, log: Log = print) -> Result | None:
    """`hubexport push`: an HF folder is published as it is (its card from memory); a training checkpoint is merged
    first (into `target`, kept, or a temporary folder, removed), carded and published; a run root publishes the
    step --select picks. Returns None on torchrun ranks other than 0."""
    from hubexport import evidence

    source = Path(source)
    if not source.is_dir():
        raise TargetError(f"{source} is not a directory", hint="pass a model folder or a global_step_N/actor checkpoint")
    dist = Dist.from_env()
    if is_hf_folder(source):
        if target is not None:
            log(f"--target-dir ignored: {source} is already a Hugging Face folder")
        # Rank 0 alone publishes; the others wait for it, so every rank leaves (and tears gloo down) together.
        return dist.run(lambda: _push_folder(source, options, log), main_only=True)
    source, selection = dist.run(lambda: evidence.select(source, options, log), main_only=True) or (None, None)
    source, selection = dist.broadcast((source, selection))
    with _merge_target(target, options.dry_run, dist) as out:
        result = merge(source, out, merge_options, push=options, log=log, command="push", selection=selection,
                       kept=target is not None)
    if target is None:
        result.target_dir = None
        if result.push is not None:
            result.push = replace(result.push, target_dir=None)
    return result if dist.is_main else None


def _push_folder(source: Path, options: PushOptions, log: Log) -> Result:
    from hubexport import evidence

    proof = evidence.for_folder(source, options, log)  # the gate runs before any request
    digests = {p.name: sha256_file(p) for p in sorted(source.glob("*.safetensors"))}  # once, for card and upload
    # The card is decided (and a user's README validated) before any request.
    card = readme_to_publish(source, options.card, repo_id=options.repo_id, merge_result=None, sha256=digests,
                             log=log, evidence=proof.card())
    pushed = Publisher.connect(options, log).publish(source, card=card, extra=proof.files(), known=digests)
    return _folder_result(source, proof.annotate(pushed))


def _connect(push: PushOptions, source: Path, dist: Dist, log: Log) -> Publisher | None:
    """Rank 0 checks the token before any work; every rank stops when it is bad."""
    card = push.card
    if card.training_config is None and (found := find_training_config(source)) is not None:
        log(f"card: training config {found}")
        push = replace(push, card=replace(card, training_config=found))
    return dist.run(lambda: Publisher.connect(push, log), main_only=True)


def _folder_result(folder: Path, pushed) -> Result:
    m = pushed.model
    return Result(command="push", target_dir=folder, source_format="hf", source_version="safetensors", parallel={},
                  architecture=m.architecture or "", dtype=m.dtype or "", num_parameters=m.num_parameters,
                  tied_embeddings=m.tied_embeddings, value_model=m.value_model, global_step=m.global_step,
                  files=[WrittenFile(s.name, s.size, s.sha256) for s in m.shards], dry_run=pushed.dry_run,
                  push=pushed)


@contextlib.contextmanager
def _merge_target(target: Output | None, dry_run: bool, dist: Dist) -> Iterator[Output]:
    """`target`, or a temporary folder that rank 0 makes, shares with the other ranks, and removes."""
    if target is not None:
        yield replace(target, dry_run=dry_run)
        return
    tmp = Path(dist.broadcast(tempfile.mkdtemp(prefix="hubexport-") if dist.is_main else None))
    try:
        yield Output(tmp / "model", dry_run=dry_run)
    finally:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)


def execute(job: Job, out: Output, command: str, dist: Dist, log: Log, *,
            before_swap: Callable[[Path, Result], object] | None = None, on_file: OnFile | None = None) -> Result:
    """Run a planned job into `out.target`, atomically, on every rank. `on_file` (rank 0's): told of each file as
    soon as it is complete: while rank 0 writes the next one, and the other ranks' files once they are done."""
    result = job.result(command, out.target)
    for line in job.describe(result):
        log(line)
    if out.dry_run:
        result.files, result.dry_run = job.planned_files(), True
        return result
    started = time.perf_counter()
    dist.run(job.precheck, main_only=True)
    with _claimed(out, dist) as (tmp, commit):
        mine = dist.run(_writing(out, lambda: job.write(tmp, dist, on_file if dist.is_main else None)))
        result.files = sorted((f for part in dist.gather(mine) for f in part), key=lambda f: ("/" in f.name, f.name))
        for f in result.files if on_file is not None and dist.is_main else ():
            if f not in mine:
                on_file(f, tmp / f.name)
        dist.run(_writing(out, lambda: job.finish(tmp, result.files)), main_only=True)
        dist.run(lambda: job.check(tmp, dist))
        # Called on every rank whether or not rank 0 has a hook (other ranks never do): collectives must pair up.
        dist.run(_writing(out, lambda: before_swap and before_swap(tmp, result)), main_only=True)
        commit()
    result.throughput = Throughput.of(sum(f.size for f in result.files), time.perf_counter() - started)
    log(job.done(result))
    return result


def _writing(out: Output, fn: Callable[[], object]) -> Callable[[], object]:
    """Disk full, file too large, read-only filesystem...: one line naming the file; the target is left as it was."""

    def run() -> object:
        try:
            return fn()
        except OSError as e:
            where = Path(e.filename).name if e.filename else out.target
            raise TargetError(f"writing {where} for {out.target} failed: {e.strerror or e}",
                              hint=f"free space (or quota) on that filesystem, or choose another {out.option}") from None

    return run


@contextlib.contextmanager
def _claimed(out: Output, dist: Dist) -> Iterator[tuple[Path, Callable[[], None]]]:
    """Rank 0 locks the target and makes this run's staging folder; every rank gets its path. `commit` swaps it
    into place; leaving without committing (an error, Ctrl-C) removes it. The lock is released either way."""
    lock = TargetLock(out.target, out.option)
    tmp: Path | None = None

    def claim() -> str:
        nonlocal tmp
        with uninterrupted():  # what exists is always what the clean-up below knows of
            lock.acquire()
            # again, now that no other run can change it
            check_target(out.target, overwrite=out.overwrite, option=out.option)
            tmp = new_staging(out.target, out.option)
        return str(tmp)

    def swap() -> None:
        nonlocal tmp
        with uninterrupted():
            swap_into_place(tmp, out.target)
            tmp = None

    try:
        yield Path(dist.broadcast(dist.run(claim, main_only=True))), lambda: dist.run(_writing(out, swap), main_only=True)
    finally:
        if dist.is_main:
            with uninterrupted():
                if tmp is not None:
                    discard(tmp)
                lock.release()
