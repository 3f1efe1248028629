"""The runtime package needs only the base install: with the test extras unimportable (peft), every hubexport module
imports and `hubexport demo` runs end to end."""

from __future__ import annotations

import os
import subprocess
import sys

# Blocks the test-only extras (a None entry in sys.modules makes `import peft` raise ImportError), imports every
# module of the package, then runs the demo CLI at world size 1 (about 10 s).
SCRIPT = """
import importlib, pkgutil, sys
for extra in ("peft", "hypothesis", "pytest", "deepspeed"):
    sys.modules[extra] = None
import hubexport
names = [m.name for m in pkgutil.walk_packages(hubexport.__path__, "hubexport.")]
for name in names:
    importlib.import_module(name)
print("imported", len(names), "modules", file=sys.stderr)
from hubexport.cli import main
sys.argv = ["hubexport", "demo", "--out", sys.argv[1], "--world-size", "1"]
main()
"""


def test_package_and_demo_work_without_test_extras(tmp_path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "demo")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = int(proc.stderr.split("imported ", 1)[1].split()[0])
    assert n >= 30  # walk_packages found the package (sources, mapping, writers...), not an empty path
    assert "tensors bit-exact" in proc.stderr + proc.stdout
    assert (tmp_path / "demo" / "model" / "model.safetensors").is_file()
