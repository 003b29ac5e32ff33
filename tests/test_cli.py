"""The `vllm-gptq` console script: inspect output and one clear error (exit 2) for bad input."""
import json
import subprocess
import sys

import pytest

from vllm_gptq_plugin import cli
from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant import rtn


@pytest.fixture(scope="module")
def mixed_ckpt(tiny_llama, tmp_path_factory):
    cfg = fmt.QuantConfig(bits=4, group_size=64, dynamic={r"+:.*down_proj": {"bits": 8, "group_size": 128},
                                                          r"-:model\.layers\.1\.self_attn\..*": {}})
    return rtn.quantize_model(tiny_llama, tmp_path_factory.mktemp("cli") / "mixed", cfg)


def test_inspect_summarizes_mixed_precision(mixed_ckpt, capsys):
    assert cli.main(["inspect", str(mixed_ckpt), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "format          gptq" in out and "valid" in out
    # 2 blocks x (4 attention + 3 MLP) Linears, minus block 1's 4 attention layers = 10 quantized.
    assert "quantized       10 layers" in out
    assert "   2 layers   bits=8 group_size=128" in out
    assert "   8 layers   bits=4 group_size=64" in out
    assert "model.layers.1.self_attn.q_proj" not in out
    tensors = fmt.read_tensors(mixed_ckpt)
    assert "model.layers.1.self_attn.q_proj.weight" in tensors  # skipped layers stay fp


def test_inspect_errors_exit_2(tiny_llama, tmp_path, capsys):
    assert cli.main(["inspect", str(tiny_llama)]) == 2
    assert "is not a quantized checkpoint" in capsys.readouterr().err
    (tmp_path / fmt.CONFIG_FILE).write_text(json.dumps({"bits": 5, "group_size": 64}))
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert "bits=5 is not supported: use one of (2, 3, 4, 8)" in capsys.readouterr().err


def test_console_script_lists_commands():
    out = subprocess.run([sys.executable, "-m", "vllm_gptq_plugin.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for name in cli.COMMANDS:
        assert name in out
    bad = subprocess.run([sys.executable, "-m", "vllm_gptq_plugin.cli", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'frobnicate'" in bad.stderr
