"""The first merge of a model, written while it is planned. With no recipe yet (`merge_recipe`), planning needs
torch, transformers and the model's modeling code (4–5 s of imports, on one core) before the first byte moves. For
verl FSDP rank files whose every tensor is byte runs, the outcome is nearly always foreseeable from the checkpoint and
config.json alone: every tensor as it is, named as it is, without a tied `lm_head`. So the merge guesses that recipe
(`guess`, no torch), starts the real planning in a second process (`Planning`: the full path's `prepare`, which
stores the recipe it would record) and copies the guessed files meanwhile. Nothing leaves the job before planning
confirms the guess field by field (`fast_merge.FastJob`); when it does not, or planning fails, the staged files are
discarded and the full path merges again, with its own checks and errors (`executor.merge`).

Only a process that has not imported transformers guesses: one that has plans in-process in a fraction of that."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

from hubexport import merge_recipe
from hubexport.core import Group, TensorSpec
from hubexport.mapping.archnames import FSDP_PREFIX, is_value_checkpoint, model_class
from hubexport.merge_recipe import Recipe, Shapes
from hubexport.options import MergeOptions
from hubexport.plan import make_plan, parse_size
from hubexport.sources.torchsave import ITEMSIZE

TIED = ("lm_head.weight", "model.embed_tokens.weight")  # (alias, canonical) save_pretrained drops when tied


class DtypeName(str):
    """A torch dtype by name, with what planning asks of one (the guess plans without torch)."""

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self]

    @property
    def is_floating_point(self) -> bool:
        return self.startswith(("float", "bfloat"))


def worth_guessing() -> bool:
    """Planning in a second process pays only where this one would have to import transformers first."""
    return "transformers" not in sys.modules


def guess(hf_dir: Path, shapes: Shapes, options: MergeOptions) -> Recipe | None:
    """The recipe a full merge of these FSDP tensors would record, with config.json left empty; None when it is
    not foreseeable (no architectures or tying stated, a class name to repair, custom code, tensors beyond 2-D)."""
    try:
        config = json.loads((hf_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None
    archs = config.get("architectures") if isinstance(config, dict) else None
    if (not isinstance(archs, list) or not archs or not isinstance(archs[0], str) or archs[0].startswith(FSDP_PREFIX)
            or not isinstance(config.get("tie_word_embeddings"), bool) or config.get("auto_map")):
        return None
    if any(n.startswith("base_model.") or len(shape) > 2 for n, shape, _ in shapes):
        return None  # a PEFT model (LoRA is exported), fused experts (split on saving), convolutions: left to planning
    specs = {n: TensorSpec(n, shape, DtypeName(d)) for n, shape, d in shapes}
    value_model = options.is_value_model or is_value_checkpoint(specs, specs)
    tied = config["tie_word_embeddings"] and not value_model
    if options.tie_word_embedding and not config["tie_word_embeddings"]:
        return None  # the full path's error
    architecture, notes = model_class(SimpleNamespace(**config), value_model=value_model)
    alias, canonical = TIED
    checks = ((alias, canonical),) if tied and alias in specs and canonical in specs else ()
    groups = [Group(pair, (), dict) for pair in checks] + [
        Group((n,), (s,), dict, passthrough=True) for n, s in specs.items() if not (tied and n == alias)]
    plan = make_plan(groups, max_shard_size=parse_size(options.max_shard_size))
    return Recipe(architecture=architecture, dtype=str(plan.dominant_dtype() or "float32"),
                  num_parameters=plan.num_parameters, tied=tied, value_model=value_model,
                  peak_tensor_bytes=plan.peak_bytes(specs), notes=tuple(notes), files=merge_recipe.headers(plan),
                  index=merge_recipe.index_of(plan), config="", checks=checks, copies=())


class Unconfirmed(Exception):
    """Planning did not confirm the guessed recipe: what was staged is discarded and the full path merges again
    (and says what is wrong, if anything is). The message says so in one line."""


_CHILD = "import sys; sys.path.insert(0, sys.argv[1]); from hubexport.first_merge import plan; sys.exit(plan(sys.argv[2:]))"


class Planning:
    """The full path's planning of this merge in a second process. It answers with the recipe it would record, in a
    file of its own (a cache that cannot be written, e.g. a shared read-only HF_HOME, loses nothing), and stores it
    in the cache for the next merge."""

    def __init__(self, proc: subprocess.Popen, answer: Path) -> None:
        self._proc, self._answer = proc, answer

    @classmethod
    def start(cls, local_dir: Path, key: str, options: MergeOptions) -> Planning | None:
        """None when no second interpreter can start (the merge then plans in-process)."""
        root = str(Path(__file__).resolve().parent.parent)  # this very hubexport, wherever the process was started
        try:
            fd, answer = tempfile.mkstemp(prefix="hubexport-plan-", suffix=".json")
            os.close(fd)
            args = [sys.executable, "-c", _CHILD, root, str(Path(local_dir).resolve()), key,
                    json.dumps(_plain(options)), answer]
            return cls(subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL), Path(answer))
        except OSError:
            return None

    def done(self) -> bool:
        return self._proc.poll() is not None

    def confirm(self, guessed: Recipe) -> Recipe:
        """The recipe planning recorded, when it is the guess (config.json aside); else Unconfirmed."""
        planned = Recipe.of(_read(self._answer)) if self._proc.wait() == 0 else None
        differs = [k for k in Recipe.__dataclass_fields__
                   if planned is not None and k != "config" and getattr(planned, k) != getattr(guessed, k)]
        if planned is None or differs:
            why = f" ({', '.join(differs)} differ)" if planned is not None else ""
            raise Unconfirmed(f"planning did not confirm the plan above{why}: merging again by the full plan")
        return planned

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._answer.unlink(missing_ok=True)


def _read(answer: Path) -> dict | None:
    try:
        return json.loads(answer.read_text())
    except (OSError, ValueError):
        return None


def _plain(options: MergeOptions) -> dict[str, object]:
    """The options a recorded merge can have (any other makes the key None), as JSON."""
    return {k: v for k, v in asdict(options).items() if k in ("backend", "max_shard_size", "tie_word_embedding",
                                                              "is_value_model")}


def plan(argv: list[str]) -> int:
    """The planning process: the full path's plan of the checkpoint; its recipe written to the parent's answer file
    and stored under the parent's key."""
    from hubexport.to_hf import HfJob, prepare

    local_dir, key, options, answer = Path(argv[0]), argv[1], MergeOptions(**json.loads(argv[2])), Path(argv[3])
    job = HfJob(prepare(local_dir, options), local_dir)
    try:
        if job.prep.recipe_key != key:
            return 1
        with tempfile.TemporaryDirectory() as folder:
            recipe = job.planned_recipe(Path(folder))
        answer.write_text(json.dumps(recipe.as_json()))
        merge_recipe.store(key, recipe)
        return 0
    finally:
        job.close()
