"""`hubexport demo`: the whole job on a built-in example, no GPU, network or token. A tiny Qwen2 is trained one step
with real torch FSDP2 on CPU from a random init (kept as its base model), saved as verl saves it with a validation
metric logged by verl's file logger, then merged, checked against the trained model, carded (weight delta vs the
init, evaluation results) and dry-run pushed offline: every file that would be sent is listed, nothing is."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from hubexport.errors import HubexportError
from hubexport.examples import PROMPT, FsdpCase, make_checkpoints
from hubexport.executor import merge
from hubexport.options import CardOptions, Output, PushOptions

DEMO_REPO = "you/tiny-qwen2-demo"
METRIC = "val-core/demo_prompt/neg_loss/mean@1"  # verl's validation key layout: <data source>/<reward>/mean@K


def _neg_loss(model) -> float:
    with torch.no_grad():
        ids = torch.tensor(PROMPT)
        return -float(model(input_ids=ids, labels=ids).loss)


def log_validation(run_root: Path) -> Path:
    """What verl's file logger would have written for this run (step 0: the init, step 1: after the training step),
    measured here on the demo prompt; next to the run, where push finds it."""
    import transformers
    from safetensors.torch import load_file

    model = transformers.AutoModelForCausalLM.from_pretrained(run_root / "base_model", dtype="auto").eval()
    before = _neg_loss(model)
    model.load_state_dict(load_file(run_root / "expected" / "state_dict.safetensors"))
    after = _neg_loss(model)
    path = run_root / "metrics.jsonl"
    with open(path, "w") as f:
        for step, value in ((0, before), (1, after)):
            f.write(json.dumps({"step": step, "data": {METRIC: value}}, separators=(",", ":")) + "\n")
    return path


def _check_bit_exact(model_dir: Path, expected: Path) -> tuple[int, float]:
    import transformers
    from safetensors.torch import load_file

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    reference = load_file(expected / "state_dict.safetensors")
    loaded = model.state_dict()
    differing = [k for k, v in reference.items() if not torch.equal(loaded[k], v)]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROMPT)).logits.float()
    max_diff = (logits - torch.load(expected / "logits.pt")).abs().max().item()
    if differing or max_diff > 1e-5:
        raise HubexportError(f"demo merge differs from the trained model: {differing[:3]}, logits Δ={max_diff:g}",
                             hint="please report this with `hubexport --debug demo` output")
    return len(reference), max_diff


def run_demo(out_dir: Path, *, world_size: int = 2, log: Callable[[str], None] = print) -> dict[str, float]:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    case = FsdpCase("demo", world_size=world_size, vocab_size=127, save_base=True)
    if out_dir.exists():
        shutil.rmtree(out_dir / case.name, ignore_errors=True)
    log(f"training a tiny Qwen2 one step with FSDP2 on {world_size} CPU processes…")
    make_checkpoints([case], out_dir)
    run_root = out_dir / case.name
    log_validation(run_root)
    model_dir = out_dir / "model"
    # A dry run that asks nothing of any Hub: the gate, the card and the listing of what `push` would send.
    push = PushOptions(DEMO_REPO, dry_run=True, offline=True, card=CardOptions(license="apache-2.0"))
    result = merge(run_root, Output(model_dir, overwrite=True), push=push, log=log)
    tensors, max_diff = _check_bit_exact(model_dir, run_root / "expected")
    pushed = result.push
    log(f"checkpoint: {run_root / 'global_step_1' / 'actor'}")
    log(f"merged:     {model_dir}")
    log(f"verified:   {tensors} tensors bit-exact, max |Δlogits| = {max_diff:g}")
    log(f"card:       {model_dir / 'README.md'} (weight delta vs the initial model, evaluation results)")
    log(f"push it for real: HF_TOKEN=<a write token> hubexport push {run_root} --repo-id <you>/tiny-qwen2-demo "
        "--license apache-2.0 --private")
    return {"tensors": tensors, "max_logit_diff": max_diff, "files": pushed.files_uploaded}
