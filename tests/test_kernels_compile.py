"""The op boundary (kernels/ops.py): torch.compile(fullgraph=True, dynamic=True) traces a small model of
quantized Linears with no graph break and gives the eager output, on every CPU path and on the Triton
path (its interpreter here, compiled on a GPU); torch.library.opcheck checks the schema and the fake
implementation; on a GPU a CUDA graph captured at M = 1 and M = 16 replays with the eager output.
"""
import pytest
import torch

import gptq_reference as ref
from vllm_gptq_plugin.kernels import cpu, cpu_dispatch, gptq_gemm, prepare

ON_GPU = torch.cuda.is_available()


class QuantLinear(torch.nn.Module):
    def __init__(self, n, k, bits, group_size, dtype, backend, device, act_order, seed):
        super().__init__()
        t = ref.random_layer(n, k, bits, group_size, act_order=act_order, seed=seed)
        self.w = prepare(**{name: v.to(device) for name, v in t.items()}, bits=bits, dtype=dtype,
                         backend=backend)
        self.bias = torch.nn.Parameter(torch.randn(n, device=device).to(dtype) * 0.1, requires_grad=False)

    def forward(self, x):
        return gptq_gemm(x, self.w, self.bias)


class TinyMLP(torch.nn.Module):
    """A gated MLP block with a residual, the shape of what vLLM compiles around the op."""

    def __init__(self, bits, dtype, backend, device="cpu", hidden=128, inner=256):
        super().__init__()
        args = dict(bits=bits, dtype=dtype, backend=backend, device=device)
        self.gate = QuantLinear(inner, hidden, group_size=64, act_order=True, seed=1, **args)
        self.up = QuantLinear(inner, hidden, group_size=32, act_order=False, seed=2, **args)
        self.down = QuantLinear(hidden, inner, group_size=-1, act_order=False, seed=3, **args)

    def forward(self, x):
        h = torch.nn.functional.silu(self.gate(x)) * self.up(x)
        return x + self.down(h) * 0.1


def _paths(model, m):
    return {cpu.path(lin.w.impl, m) for lin in (model.gate, model.up, model.down) if lin.w.backend != "triton"}


CASES = [  # (backend, bits, dtype): each CPU layout and the Triton layout
    ("int4pack", 4, torch.float32),   # a measured table: int4pack GEMM at M <= 16, tiles above
    ("dequant", 8, torch.float16),    # tiles at every M
    (None, 4, torch.bfloat16),        # the dispatch's choice: fused on AVX512-BF16, else int4pack/tiles
    ("triton", 3, torch.float32),     # Triton (interpreted without a GPU)
]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def int4pack_then_tiles(tmp_path, monkeypatch):
    """This machine's CPU table (cpu_dispatch) says: int4pack up to M = 16, tiles above."""
    monkeypatch.setattr(cpu_dispatch, "TABLE_DIR", tmp_path)
    fake = lambda key, fns: {"int4pack": 1.0, "tiles": 2.0, "fused": 3.0}[key[3]] * (1 if key[2] <= 16 else -1) + 9
    cpu_dispatch.write(cpu_dispatch.measure(((128, 256), (256, 128)), (1, 16, 64), torch.float32, stream_bytes=0,
                                            timer=fake))
    yield
    cpu_dispatch.clear_cache()


@pytest.mark.parametrize("backend,bits,dtype", CASES)
def test_compiled_fullgraph_dynamic_matches_eager(backend, bits, dtype, int4pack_then_tiles):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyMLP(bits, dtype, backend)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    seen = set()
    for m in (1, 5, 33):  # decode and prefill sizes through one compiled graph (M is symbolic)
        x = (0.1 * torch.randn(2, m, 128)).to(dtype)  # activations of a normed hidden state: no fp16 overflow
        with torch.no_grad():
            want, got = model(x), compiled(x)
        assert want.float().isfinite().all()
        assert got.dtype == want.dtype and got.shape == want.shape
        err = (got.float() - want.float()).abs().max().item()
        assert err <= TOL[dtype] * want.float().abs().max().item(), f"M={m}: compiled differs from eager by {err}"
        seen |= _paths(model, 2 * m)
    if backend == "int4pack":
        assert seen == {"int4pack", "tiles"}, seen  # the M-bucket choice is made inside the op, per call


def test_opcheck_schema_and_fake_implementation():
    for backend, bits, dtype in CASES:
        w = TinyMLP(bits, dtype, backend).gate.w
        x = torch.randn(3, 128).to(dtype)
        torch.library.opcheck(torch.ops.vllm_gptq_plugin.gemm.default, (x, w.tensors, None, w.meta),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_fake_implementation_refuses_a_wrong_k_at_trace_time():
    w = TinyMLP(4, torch.float32, "int4pack").gate.w
    f = torch.compile(lambda x: gptq_gemm(x, w), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"x must be \[\.\.\., 128\]"):
        f(torch.randn(2, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", (3, 4))
def test_cuda_graph_replays_the_eager_output(bits):
    model = TinyMLP(bits, torch.bfloat16, None, device="cuda")
    for m in (1, 16):
        static_x = torch.randn(m, 128, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            want = model(static_x).clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                model(static_x)  # warm-up (compiles the kernels) outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_y = model(static_x)
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
        assert torch.equal(static_y, want), f"M={m}: replay differs from eager"
        compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
        with torch.no_grad():
            for _ in range(3):
                got = compiled(static_x)
        err = (got.float() - want.float()).abs().max().item()  # Inductor fuses silu * mul its own way
        assert err <= TOL[torch.bfloat16] * want.float().abs().max().item(), f"M={m}: compiled graph off by {err}"
