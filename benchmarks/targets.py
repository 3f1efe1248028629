"""Issue 15's targets, each as its measured ratio in this run and whether it holds."""

from __future__ import annotations

from harness import FLOOR_LABEL

ONE = "hubexport, 1 process"
FULL = "hubexport, 1 process, full path"  # HUBEXPORT_NO_FAST_PATH=1: torch and transformers, the names cached
COLD = "hubexport, 1 process, cold cache"  # a first merge: FSDP's is planned in a second process (first_merge)
COLD_INLINE = "hubexport, 1 process, cold cache, planned in-process"  # a first merge before first_merge
TORCHRUN = "hubexport, torchrun 2 processes"
TORCHRUN_1 = "hubexport, torchrun 1 process"  # the launcher's own start-up, paid by any torchrun job
VERL = "verl.model_merger (0.9.1)"
SUITE_NAMES = {"flat": "merge 8 GB", "fsdp-flat": "FSDP 8 GB"}  # the suites whose torchrun runs are at 8 GB


def _wall(suite: dict, label: str, other: str) -> float:
    return suite[label]["wall_s"] / suite[other]["wall_s"]


def _row(target: str, value: str, holds: bool) -> str:
    return f"| {target} | {value} | {'holds' if holds else 'missed'} |"


def rows(results: dict) -> list[str]:
    out = []
    if fsdp := results.get("fsdp", {}).get("runs"):
        if VERL in fsdp:
            for label in (ONE, FULL, COLD):
                r = _wall(fsdp, label, VERL)
                out.append(_row(f"FSDP wall ≤ 0.33× verl ({label})", f"{r:.2f}×", r <= 0.33))
            m = fsdp[ONE]["peak_rss_bytes"] / fsdp[VERL]["peak_rss_bytes"]
            out.append(_row("FSDP peak RSS ≤ 0.15× verl", f"{m:.2f}×", m <= 0.15))
        for label in (ONE, FULL, COLD):
            r = _wall(fsdp, label, FLOOR_LABEL)
            out.append(_row(f"FSDP wall ≤ 1.3× disk floor ({label})", f"{r:.2f}×", r <= 1.3))
        if COLD_INLINE in fsdp:
            r = _wall(fsdp, COLD, COLD_INLINE)
            same = fsdp[COLD].get("digest") == fsdp[COLD_INLINE].get("digest") is not None
            out.append(_row("FSDP first merge: planned beside, no slower than planned in-process, same bytes",
                            f"{r:.2f}×, {'identical' if same else 'DIFFERENT'}", r <= 1 and same))
    for name, what in (("megatron", "Megatron"), ("megatron-tp2", "Megatron TP=2")):
        if not (mcore := results.get(name)):
            continue
        for label in (ONE, FULL, COLD):
            if label in mcore["runs"]:
                r = _wall(mcore["runs"], label, FLOOR_LABEL)
                out.append(_row(f"{what} wall ≤ 1.3× disk floor ({label})", f"{r:.2f}×", r <= 1.3))
        bound = mcore["largest_group_bytes"] + 300e6
        rss = mcore["runs"][ONE]["peak_rss_bytes"]
        out.append(_row(f"{what} peak RSS ≤ largest group + 300 MB", f"{rss / 1e6:.0f} MB vs {bound / 1e6:.0f} MB",
                        rss <= bound))
    if tomc := results.get("to-megatron", {}).get("runs"):
        for label in (ONE, FULL, COLD):
            if label in tomc:
                r = _wall(tomc, label, FLOOR_LABEL)
                out.append(_row(f"to-megatron wall ≤ 1.3× disk floor ({label})", f"{r:.2f}×", r <= 1.3))
    if flat := results.get("flat", {}).get("runs"):
        for what in ("to-megatron", "merge torch_dist"):
            small, big = flat[f"{what}, 1 GB"]["peak_rss_bytes"], flat[f"{what}, 8 GB"]["peak_rss_bytes"]
            out.append(_row(f"peak RSS 8 GB / 1 GB within ±10% ({what})",
                            f"{big / 1e6:.0f} / {small / 1e6:.0f} MB = {big / small:.2f}", abs(big / small - 1) <= 0.1))
    if ff := results.get("fsdp-flat", {}).get("runs"):
        sizes = [gb for gb in (1, 8) if f"{ONE}, {gb} GB" in ff]
        for label in (ONE, FULL) if len(sizes) == 2 else ():
            small, big = ff[f"{label}, 1 GB"]["peak_rss_bytes"], ff[f"{label}, 8 GB"]["peak_rss_bytes"]
            out.append(_row(f"peak RSS 8 GB / 1 GB within ±10% (FSDP merge, {label})",
                            f"{big / 1e6:.0f} / {small / 1e6:.0f} MB = {big / small:.2f}", abs(big / small - 1) <= 0.1))
        for gb in sizes:
            for label in (ONE, FULL, COLD):
                r = _wall(ff, f"{label}, {gb} GB", f"{FLOOR_LABEL}, {gb} GB")
                out.append(_row(f"FSDP {gb} GB wall ≤ 1.3× disk floor ({label})", f"{r:.2f}×", r <= 1.3))
            r = _wall(ff, f"{COLD}, {gb} GB", f"{COLD_INLINE}, {gb} GB")
            out.append(_row(f"FSDP {gb} GB first merge: planned beside, no slower than planned in-process",
                            f"{r:.2f}×", r <= 1))
        if 8 in sizes:
            digests = {ff[f"{label}, 8 GB"].get("digest") for label in (ONE, FULL, COLD, COLD_INLINE)}
            out.append(_row("FSDP 8 GB: fast path, full path and both first merges write the same bytes",
                            "identical" if len(digests) == 1 and None not in digests else "DIFFERENT",
                            len(digests) == 1 and None not in digests))
    for name in ("fsdp", "megatron", "megatron-tp2", "to-megatron"):
        if FULL in (runs := results.get(name, {}).get("runs", {})):
            same = runs[ONE].get("digest") == runs[FULL].get("digest") is not None
            out.append(_row(f"{name}: the fast path writes the full path's bytes", "identical" if same else "DIFFERENT",
                            same))
    pairs = [(n, ONE, TORCHRUN) for n in ("fsdp", "megatron", "megatron-tp2", "to-megatron")]
    pairs.append(("flat", "merge torch_dist, 8 GB", f"merge torch_dist, 8 GB, {TORCHRUN}"))
    pairs.append(("fsdp-flat", f"{ONE}, 8 GB", f"{TORCHRUN}, 8 GB"))
    for name, one, many in pairs:
        runs = results.get(name, {}).get("runs", {})
        if many in runs:
            r = _wall(runs, many, one)
            same = runs[many].get("digest") == runs[one].get("digest") is not None
            single = many.replace(TORCHRUN, TORCHRUN_1)
            launcher = f"; {_wall(runs, many, single):.2f}× torchrun 1" if single in runs else ""
            out.append(_row(f"{SUITE_NAMES.get(name, name)}: torchrun 2 byte-identical, never slower "
                            "than 1 process", f"{'identical' if same else 'DIFFERENT'}, {r:.2f}×{launcher}",
                            same and r <= 1.0))
    return out


def table(results: dict) -> str:
    return "\n".join(["| target | measured | status |", "|---|---|---|", *rows(results)])
