"""The README's demo runs and shows the approximation at work (some causal level runs MuSe, the logits
differ from the exact model's) on a shorter context than its default, to stay quick."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_muse():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--context", "1024",
                        "--reps", "1"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    levels = re.search(r"causal levels \(segment: exact/MuSe\): (.*)", r.stdout).group(1)
    assert "MuSe" in levels, levels
    rse = float(re.search(r"logits RSE vs exact model:\s+([0-9.e+-]+)", r.stdout).group(1))
    assert 1e-9 < rse < 1e-2, rse
    assert "rewritten" in r.stdout
