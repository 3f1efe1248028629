"""The push suite: `push` of a checkpoint (each file sent while the next is merged) against `merge` then `push` of the
folder, one after the other, on the Hub emulator whose uploads share one link of `bandwidth` bytes/s."""

from __future__ import annotations

import sys
from pathlib import Path

from harness import clear, load_average, measure, summary, warm


def push_suite(actor: Path, work: Path, env: dict[str, str], repeat: int, bandwidth: float) -> dict:
    from tests.fakehub import FakeHub

    token = "hf_BenchToken0123456789abcdef"
    hub = FakeHub(multipart_threshold=64 << 20, chunk_size=64 << 20, bandwidth=bandwidth)
    hub.add_user("bench", token)
    hub.start()
    env = {**env, "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    out, py = work / "out", sys.executable
    common = ["--private", "--license", "mit"]
    merge = [py, "-m", "hubexport", "merge", "--max-shard-size", "400MB", "--local-dir", str(actor), "--target-dir",
             str(out)]
    contenders = {
        "push CHECKPOINT (merge and upload overlapped)": lambda repo: [
            py, "-m", "hubexport", "push", str(actor), "--repo-id", repo, "--max-shard-size", "400MB", *common],
        "merge, then push FOLDER (one after the other)": lambda repo: [
            "sh", "-c", " ".join([*merge, "&&", py, "-m", "hubexport", "push", str(out), "--repo-id", repo, *common])],
    }
    runs: dict[str, tuple[list[float], list[int], list[str]]] = {label: ([], [], []) for label in contenders}
    try:
        for r in range(repeat):
            for i, (label, cmd) in enumerate(contenders.items()):
                clear(out)
                warm(actor)
                load = load_average()
                wall, rss = measure(cmd(f"bench/round{r}-{i}"), env)
                hub.repos.clear()  # the emulator keeps uploads in memory
                for acc, v in zip(runs[label], (wall, rss, load), strict=True):
                    acc.append(v)
                print(f"push       round {r + 1} {label:48} wall {wall:7.2f} s   load {load}", flush=True)
    finally:
        hub.stop()
        clear(out)
    return {label: summary(*acc) for label, acc in runs.items()}


def push_table(suite: dict, nbytes: int, bandwidth: float) -> str:
    upload = nbytes / bandwidth
    lines = [f"upload floor (bytes / link): {upload:.2f} s", "",
             "| run | wall (s) | × one after the other | × upload floor |", "|---|---|---|---|"]
    sequential = suite["merge, then push FOLDER (one after the other)"]["wall_s"]
    lines += [f"| {label} | {r['wall_s']:.2f} | {r['wall_s'] / sequential:.2f} | {r['wall_s'] / upload:.2f} |"
              for label, r in suite.items()]
    return "\n".join(lines)
