"""benchmarks/quant_gpu.py runs end to end on the CPU (--tiny): the model made from its config, both
quantizer runs, the solve comparison. The GPU numbers come from the same script on a GPU."""
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quant_gpu.py"


def test_quant_gpu_benchmark_runs_tiny_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--work", str(tmp_path)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    solves = re.findall(r"^\d+ x \d+ .* (\S+)$", out, re.M)
    assert len(solves) == 3, out
    # the plain solve is the paper's algorithm: the same layer-output error up to fp32 rounding
    assert all(abs(float(r) - 1) < 0.01 for r in solves), solves
    runs = dict(re.findall(r"^(defaults|no-fp-targets) +([\d.]+) ", out, re.M))
    assert runs.keys() == {"defaults", "no-fp-targets"} and all(float(s) > 0 for s in runs.values()), out
    assert (tmp_path / "tiny" / "config.json").exists() and not (tmp_path / "tiny-defaults-q").exists()
