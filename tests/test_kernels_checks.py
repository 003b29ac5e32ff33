"""Bad input is refused before any kernel runs, with a reason that names the problem."""
import pytest
import torch

from vllm_gptq_plugin.format import FormatError
from vllm_gptq_plugin.kernels import can_implement, gptq_gemm, prepare
from vllm_gptq_plugin.kernels.testing import random_layer

N, K = 64, 128


@pytest.fixture
def layer():
    return random_layer(N, K, 4, 32, seed=0)


def test_good_layer_is_accepted(layer):
    assert can_implement(**layer, bits=4, checkpoint_format="gptq", dtype=torch.bfloat16) == (True, None)


@pytest.mark.parametrize("change,reason", [
    (dict(bits=5), "bits=5"),
    (dict(bits=8), "qweight must be"),                     # 4-bit tensors declared as 8-bit
    (dict(checkpoint_format="awq"), "checkpoint_format"),
    (dict(dtype=torch.int8), "activation dtype"),
])
def test_bad_arguments_are_refused(layer, change, reason):
    args = dict(bits=4, checkpoint_format="gptq", dtype=torch.float16) | change
    ok, why = can_implement(**layer, **args)
    assert not ok and reason in why
    with pytest.raises(FormatError, match=reason.split("=")[0]):
        prepare(**layer, **args)


@pytest.mark.parametrize("name,bad,reason", [
    ("qweight", lambda t: t.float(), "qweight must have dtype"),
    ("qweight", lambda t: t.t().contiguous().t(), "qweight must be contiguous"),
    ("qweight", lambda t: t[:-1].contiguous(), "qweight must be"),
    ("qzeros", lambda t: t[:, :-1].contiguous(), "qzeros must be"),
    ("qzeros", lambda t: t.to(torch.int64), "qzeros must have dtype"),
    ("scales", lambda t: t.to(torch.int32), "scales must have dtype"),
    ("scales", lambda t: t[:, :-8].contiguous(), "qweight must be"),    # N from scales disagrees
    ("g_idx", lambda t: t.float(), "g_idx must have dtype"),
    ("g_idx", lambda t: t + 100, "g_idx values must lie in"),
    ("g_idx", lambda t: t[:-8].contiguous(), "qweight must be"),        # K from g_idx disagrees
    ("g_idx", lambda t: t.tolist(), "g_idx must be a torch.Tensor"),
])
def test_bad_tensors_are_refused(layer, name, bad, reason):
    layer[name] = bad(layer[name])
    ok, why = can_implement(**layer, bits=4, checkpoint_format="gptq", dtype=torch.float16)
    assert not ok and reason in why, why
    with pytest.raises(FormatError):
        prepare(**layer, bits=4)


@pytest.mark.parametrize("x,bias,reason", [
    (torch.randn(2, K + 1), None, f"x must be [..., {K}]"),
    (torch.randint(0, 3, (2, K)), None, "x dtype"),
    (torch.randn(2, K), torch.randn(N + 1), f"bias must be [{N}]"),
])
def test_bad_activations_are_refused(layer, x, bias, reason):
    w = prepare(**layer, bits=4)
    with pytest.raises(FormatError) as e:
        gptq_gemm(x, w, bias)
    assert reason in str(e.value)


def test_unknown_backend_and_impossible_int4pack_are_refused(layer):
    with pytest.raises(ValueError, match="unknown backend"):
        prepare(**layer, bits=4, backend="cuda-magic")
    with pytest.raises(FormatError, match="4-bit container"):
        prepare(**random_layer(N, K, 8, 32), bits=8, backend="int4pack")
