"""`hubexport demo`: the whole job on a built-in example, no GPU, network or token. A tiny Qwen2 is trained one step
with real torch FSDP2 on CPU, saved as verl saves it, merged, then checked against the trained model."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from hubexport.errors import HubexportError
from hubexport.examples import PROMPT, FsdpCase, make_checkpoints
from hubexport.executor import merge
from hubexport.options import Output


def run_demo(out_dir: Path, *, world_size: int = 2, log: Callable[[str], None] = print) -> dict[str, float]:
    import transformers
    from safetensors.torch import load_file

    transformers.utils.logging.disable_progress_bar()
    case = FsdpCase("demo", world_size=world_size, vocab_size=127)
    if out_dir.exists():
        shutil.rmtree(out_dir / case.name, ignore_errors=True)
    log(f"training a tiny Qwen2 one step with FSDP2 on {world_size} CPU processes…")
    make_checkpoints([case], out_dir)
    actor = out_dir / case.name / "global_step_1" / "actor"
    model_dir = out_dir / "model"
    merge(out_dir / case.name, Output(model_dir, overwrite=True), log=log)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").eval()
    reference = load_file(out_dir / case.name / "expected" / "state_dict.safetensors")
    loaded = model.state_dict()
    differing = [k for k, v in reference.items() if not torch.equal(loaded[k], v)]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(PROMPT)).logits.float()
    max_diff = (logits - torch.load(out_dir / case.name / "expected" / "logits.pt")).abs().max().item()
    if differing or max_diff > 1e-5:
        raise HubexportError(f"demo merge differs from the trained model: {differing[:3]}, logits Δ={max_diff:g}",
                             hint="please report this with `hubexport --debug demo` output")
    log(f"checkpoint: {actor}")
    log(f"merged:     {model_dir}")
    log(f"verified:   {len(reference)} tensors bit-exact, max |Δlogits| = {max_diff:g}")
    return {"tensors": len(reference), "max_logit_diff": max_diff}
