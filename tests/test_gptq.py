"""GPTQ for one layer: the solve against a slow textbook OBS, its error against RTN, g_idx, damping,
bad inputs, the format round trip and determinism. Small shapes: the whole file runs in seconds."""
from __future__ import annotations

import math

import pytest
import torch

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant import grid, rtn
from vllm_gptq_plugin.offline_quant import gptq as gptq_mod
from vllm_gptq_plugin.offline_quant.gptq import GPTQ, NonFiniteActivations

N, K, TOKENS = 64, 256, 2048


@pytest.fixture(autouse=True)
def one_thread():
    """Small shapes: a second thread only adds synchronisation (and the CI box has two cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_layer(seed=0, n=N, k=K):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
    return layer


def correlated_inputs(seed=1, k=K, tokens=TOKENS):
    """Activations near a low-dimensional subspace with uneven channel scales, like an LLM's: the
    correlations GPTQ exploits and RTN ignores."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(k // 4, k, generator=g)
    channel_scale = torch.exp(0.5 * torch.randn(k, generator=g))
    X = torch.randn(tokens, k // 4, generator=g) @ basis + 0.3 * torch.randn(tokens, k, generator=g)
    return X * channel_scale


def run_gptq(cfg, layer=None, X=None, batches=4, **kw):
    layer = layer if layer is not None else make_layer()
    X = X if X is not None else correlated_inputs()
    g = GPTQ(layer, name="test.layer")
    for xb in X.chunk(batches):
        g.add_batch(xb.reshape(2, -1, X.shape[-1]))  # [batch, seq, K] as a hook sees it
    H = g.H.clone()
    return g.fasterquant(cfg, **kw), H, layer, X


def obs_reference(W, H, cfg):
    """The slow, obviously-correct OBS of the paper's Section 3: explicit H^-1 in fp64, one column at a
    time, each column's error spread over all later columns, then column removed from H^-1 (eq. 3).
    Same grid as GPTQ: a group's scale/zero from the updated weights when its first column comes up."""
    W = W.double().clone()
    H = H.double().clone()
    n, k = W.shape
    gs = k if cfg.group_size == -1 else cfg.group_size
    zero_min = 1 if cfg.checkpoint_format == "gptq" and not cfg.sym else 0
    params = lambda Wg: grid.find_params(Wg.float(), cfg.bits, cfg.sym, zero_min)  # noqa: E731
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = cfg.static_groups or gs == k
    if static:
        groups = [params(W[:, g0:g0 + gs]) for g0 in range(0, k, gs)]
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if cfg.desc_act else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += cfg.damp_percent * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    loss = 0.0
    for i in range(k):
        if static:
            scale, zero = groups[int(perm[i]) // gs]
        elif i % gs == 0:
            scale, zero = params(W[:, i:i + gs])
        scale, zero = scale.double(), zero.double()
        Q[:, i] = scale * (torch.clamp(torch.round(W[:, i] / scale) + zero, 0, 2 ** cfg.bits - 1) - zero)
        d = Hinv[i, i]
        loss += float(((W[:, i] - Q[:, i]) ** 2 / d).sum()) / 2
        W[:, i:] -= ((W[:, i] - Q[:, i]) / d)[:, None] * Hinv[i, i:][None, :]
        Hinv -= Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / d
    return Q[:, torch.argsort(perm)].float(), loss


def output_error(layer, Q, X):
    W = layer.weight.detach()
    return float(torch.linalg.norm(X @ W.t() - X @ Q.t()))


CONFIGS = [
    dict(bits=4, group_size=128),
    dict(bits=4, group_size=32, sym=False),
    dict(bits=3, group_size=64, desc_act=True),
    dict(bits=2, group_size=-1, sym=False, checkpoint_format="gptq_v2"),
    dict(bits=8, group_size=64, desc_act=True, static_groups=True),
    dict(bits=4, group_size=64, desc_act=True, sym=False),
]


@pytest.mark.parametrize("cholesky_block", [512, 96])
@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_equals_slow_obs(kw, cholesky_block, monkeypatch):
    """In fp64 (the solve runs in H's dtype) lazy blocks, the Cholesky form and act-order change nothing:
    the same levels and grids as the textbook OBS, Q equal to rounding."""
    monkeypatch.setattr(gptq_mod, "CHOLESKY_BLOCK", cholesky_block)  # 96: blocks that don't align
    cfg = fmt.QuantConfig(**kw)
    layer = make_layer().double()
    X = correlated_inputs().double()
    g = GPTQ(layer, name="test.layer")
    g.H = 2 * X.t() @ X / X.shape[0]
    res = g.fasterquant(cfg, blocksize=128)
    Q_ref, loss_ref = obs_reference(layer.weight.detach(), g.H, cfg)
    torch.testing.assert_close(res.Q, Q_ref.double(), rtol=0, atol=1e-9)
    assert res.stats["loss"] == pytest.approx(loss_ref, rel=1e-9)


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_fp32_solve_matches_slow_obs(kw):
    """In fp32 a weight sitting on a level boundary can round the other way, and its row then follows a
    slightly different path: the loss agrees to fp32 noise and nearly all levels are the same."""
    cfg = fmt.QuantConfig(**kw)
    res, H, layer, _ = run_gptq(cfg, blocksize=128)
    Q_ref, loss_ref = obs_reference(layer.weight.detach(), H, cfg)
    close = (res.Q - Q_ref).abs() <= 1e-4 * res.scales.max()
    assert close.float().mean() >= 0.98, f"{int((~close).sum())} of {close.numel()} weights differ"
    assert res.stats["loss"] == pytest.approx(loss_ref, rel=5e-3)


@pytest.mark.parametrize("k,block", [(200, 64), (256, 512), (300, 100)])
def test_blocked_upper_cholesky(k, block, monkeypatch):
    monkeypatch.setattr(gptq_mod, "CHOLESKY_BLOCK", block)
    X = torch.randn(2 * k, k, dtype=torch.float64)
    H = X.t() @ X / k
    A = H.clone()
    assert gptq_mod._upper_cholesky_(A)
    V = A.triu()
    torch.testing.assert_close(V @ V.t(), H, rtol=0, atol=1e-10)
    assert (V.diagonal() > 0).all()
    H[k // 2, k // 2] = -1  # not positive definite
    assert not gptq_mod._upper_cholesky_(H.clone())


def test_mse_search_keeps_each_rows_best_shrink(monkeypatch):
    """The vectorized search (in row chunks) picks, per row, the first shrink factor with the lowest
    |w - w'|^2.4, as a plain loop over the candidates does."""
    torch.manual_seed(0)
    W = torch.randn(50, 64) * torch.rand(50, 1) * 3
    monkeypatch.setattr(grid, "MSE_CHUNK", 21 * 64 * 7)  # 7 rows per chunk
    for sym in (True, False):
        scale, zero = grid.find_params(W, 3, sym, 1, mse=True, grid=100, maxshrink=0.2)
        lo, hi = W.min(1).values.clamp(max=0), W.max(1).values.clamp(min=0)
        if sym:
            hi = torch.maximum(lo.abs(), hi)
            lo = torch.where(lo < 0, -hi, lo)
        for r in range(W.shape[0]):
            errs = []
            for i in range(21):
                p = 1 - i / 100
                s, z = grid._range_to_grid(p * lo[r:r + 1], p * hi[r:r + 1], 7, sym, 1)
                errs.append(float((grid.dequantize(grid.quantize(W[r:r + 1], s, z, 3), s, z) - W[r]).abs()
                                  .pow(2.4).sum()))
            i = min(range(21), key=lambda j: (errs[j], j))
            s, z = grid._range_to_grid((1 - i / 100) * lo[r:r + 1], (1 - i / 100) * hi[r:r + 1], 7, sym, 1)
            assert (float(scale[r]), float(zero[r])) == (float(s), float(z)), (r, i)


def test_blocksize_does_not_change_result():
    cfg = fmt.QuantConfig(bits=4, group_size=32, desc_act=True)
    a, *_ = run_gptq(cfg, blocksize=128)
    b, *_ = run_gptq(cfg, blocksize=32)
    c, *_ = run_gptq(cfg, blocksize=256)
    for other in (b, c):
        assert (a.q != other.q).float().mean() < 1e-3
        assert other.stats["loss"] == pytest.approx(a.stats["loss"], rel=1e-4)


@pytest.mark.parametrize("desc_act,ratio", [(False, 0.5), (True, 0.3)])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (3, 64), (4, -1), (2, 32)])
def test_output_error_far_below_rtn(bits, group_size, desc_act, ratio):
    cfg = fmt.QuantConfig(bits=bits, group_size=group_size, desc_act=desc_act)
    res, _, layer, X = run_gptq(cfg)
    q, zeros, scales, g_idx = rtn.quantize_weight(layer.weight.detach(), cfg)
    Q_rtn = (q.float() - zeros[g_idx.long()].t().float()) * scales[g_idx.long()].t()
    if bits == 2 and not desc_act:
        ratio = 0.65  # 2-bit groups widened by the error fed into them: still well below RTN
    assert output_error(layer, res.Q, X) < ratio * output_error(layer, Q_rtn, X)


def test_mse_clipping_lowers_weight_error_and_stays_on_fp16_grid():
    torch.manual_seed(0)
    W = torch.randn(32, 128)
    W[:, 0] *= 8  # an outlier per row: clipping it buys a finer step for the rest
    for sym in (True, False):
        s0, z0 = grid.find_params(W, 4, sym, 1)
        s1, z1 = grid.find_params(W, 4, sym, 1, mse=True)
        e = lambda s, z: (grid.dequantize(grid.quantize(W, s, z, 4), s, z) - W).abs().pow(2.4).sum(1)  # noqa: E731
        assert (e(s1, z1) <= e(s0, z0)).all() and (e(s1, z1) < e(s0, z0)).any()
        assert torch.equal(s1.half().float(), s1) and (z1 >= 1).all() and (z1 <= 15).all()


def test_mse_gptq_option():
    cfg = fmt.QuantConfig(bits=3, group_size=64, sym=False, meta={"mse": True})
    res, _, layer, X = run_gptq(cfg)
    base, *_ = run_gptq(fmt.QuantConfig(bits=3, group_size=64, sym=False))
    assert res.stats["mse"] and not base.stats["mse"]
    assert output_error(layer, res.Q, X) < 1.05 * output_error(layer, base.Q, X)
    _assert_round_trip(res, cfg)


@pytest.mark.parametrize("kw", CONFIGS[:4], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_refine_scales_keeps_levels_and_lowers_every_rows_loss(kw):
    base, H, layer, X = run_gptq(fmt.QuantConfig(**kw))
    cfg = fmt.QuantConfig(**kw, meta={"refine_scales": True})
    res, *_ = run_gptq(cfg)
    assert torch.equal(res.q, base.q) and torch.equal(res.zeros, base.zeros) and torch.equal(res.g_idx, base.g_idx)
    W = layer.weight.detach()
    row_loss = lambda Q: (((W - Q) @ H) * (W - Q)).sum(dim=1)  # noqa: E731
    assert bool((row_loss(res.Q) <= row_loss(base.Q) * (1 + 1e-5)).all())
    if kw["group_size"] != -1:  # per-channel: one scale per row, nothing to re-fit jointly
        assert res.stats["refined_rows"] > 0 and row_loss(res.Q).sum() < row_loss(base.Q).sum()
    _assert_round_trip(res, cfg)


def _fp_target_run(cfg, X, Xfp, layer):
    g = GPTQ(layer, name="test.layer")
    for xb, tb in zip(X.chunk(4), Xfp.chunk(4)):
        g.add_batch(xb, tb)
    return g.fasterquant(cfg)


def test_fp_targets_equal_plain_gptq_when_inputs_are_exact():
    cfg = fmt.QuantConfig(bits=4, group_size=64, desc_act=True, sym=False)
    base, _, layer, X = run_gptq(cfg)
    res = _fp_target_run(cfg, X, X, layer)
    torch.testing.assert_close(res.Q, base.Q, rtol=0, atol=1e-6)


def test_fp_targets_fit_the_fp_outputs_better():
    """Quantized-model inputs X differ from the fp model's X~ (upstream error): fitting Q X to W X~
    beats fitting it to W X, and beats RTN."""
    cfg = fmt.QuantConfig(bits=3, group_size=64, sym=False)
    layer, Xfp = make_layer(), correlated_inputs()
    g = torch.Generator().manual_seed(7)
    X = Xfp + 0.1 * Xfp @ (torch.randn(K, K, generator=g) / K ** 0.5)  # an upstream distortion
    W = layer.weight.detach()
    err = lambda Q: float(torch.linalg.norm(X @ Q.t() - Xfp @ W.t()))  # noqa: E731
    plain, *_ = run_gptq(cfg, layer=layer, X=X)
    fitted = _fp_target_run(cfg, X, Xfp, layer)
    rtn_q = rtn.quantize_weight(W, cfg)
    assert err(fitted.Q) < 0.9 * err(plain.Q)
    assert err(fitted.Q) < err(gptq_mod._dequantize(*rtn_q))
    _assert_round_trip(fitted, cfg)


def test_act_order_g_idx():
    cfg = fmt.QuantConfig(bits=4, group_size=32, desc_act=True)
    res, H, *_ = run_gptq(cfg)
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    # groups follow the quantization order: the first 32 columns quantized form group 0, ...
    assert torch.equal(res.g_idx[perm].long(), torch.arange(K) // 32)
    assert torch.equal(torch.bincount(res.g_idx.long()), torch.full((K // 32,), 32))
    assert not torch.equal(res.g_idx, fmt.default_g_idx(K, 32))


@pytest.mark.parametrize("desc_act", [False, True])
def test_static_groups_g_idx_is_k_div_group_size(desc_act):
    cfg = fmt.QuantConfig(bits=4, group_size=64, desc_act=desc_act, static_groups=True)
    res, *_ = run_gptq(cfg)
    assert torch.equal(res.g_idx, fmt.default_g_idx(K, 64))


@pytest.mark.parametrize("kw", CONFIGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_round_trip_through_format(kw):
    cfg = fmt.QuantConfig(**kw)
    res, *_ = run_gptq(cfg)
    _assert_round_trip(res, cfg)


def _assert_round_trip(res, cfg):
    assert res.q.dtype == res.zeros.dtype == res.g_idx.dtype == torch.int32
    packed = fmt.pack_layer(res.q, res.zeros, res.scales, res.g_idx, cfg.bits, cfg.checkpoint_format)
    Q = fmt.dequantize(packed["qweight"], packed["qzeros"], packed["scales"], packed["g_idx"], cfg.bits,
                       cfg.checkpoint_format)
    assert torch.equal(Q, res.Q)


def test_dead_columns_quantize_to_zero():
    X = correlated_inputs()
    X[:, [3, 100]] = 0
    res, *_ = run_gptq(fmt.QuantConfig(bits=4, group_size=32), X=X)
    assert res.stats["dead_columns"] == 2
    assert (res.Q[:, [3, 100]] == 0).all()


DEAD_GROUP = list(range(64, 96))  # one whole group of 32: the live columns keep their groups when it goes
DEAD_SCATTERED = [3, 100, 101, 200]


@pytest.mark.parametrize("input_scale", [1.0, 1e-3])  # 1e-3: small activations, where damping matters most
@pytest.mark.parametrize("kw,dead", [
    (dict(bits=4, group_size=32), DEAD_GROUP),
    (dict(bits=3, group_size=32, desc_act=True, static_groups=True, sym=False), DEAD_GROUP),
    (dict(bits=4, group_size=-1), DEAD_SCATTERED),
    (dict(bits=4, group_size=-1, desc_act=True, sym=False), DEAD_SCATTERED),
], ids=["g32", "g32-act-static-asym", "per-channel", "per-channel-act-asym"])
def test_dead_columns_go_to_the_zero_point_and_leave_the_live_ones_as_without_them(kw, dead, input_scale):
    """Inputs that are always 0 give H all-zero rows and columns. Their weights quantize to the zero
    point (Q = 0), nothing is NaN or Inf, and the live columns come out as the textbook OBS (fp64)
    quantizes the layer with the dead columns removed: same damping, same levels, same output error."""
    cfg = fmt.QuantConfig(**kw)
    layer = make_layer()
    X = correlated_inputs() * input_scale
    X[:, dead] = 0
    res, H, layer, X = run_gptq(cfg, layer=layer, X=X)
    for t in (res.q, res.zeros, res.scales, res.Q):
        assert torch.isfinite(t.float()).all()
    assert res.stats["dead_columns"] == len(dead) and math.isfinite(res.stats["loss"])
    assert torch.equal(res.q[:, dead], res.zeros[res.g_idx[dead].long()].t())
    assert (res.Q[:, dead] == 0).all()
    live = torch.ones(K, dtype=torch.bool)
    live[dead] = False
    W = layer.weight.detach()
    Q_ref, _ = obs_reference(W[:, live], H[live][:, live], cfg)
    close = (res.Q[:, live] - Q_ref).abs() <= 1e-4 * res.scales.max()
    assert close.float().mean() >= 0.98, f"{int((~close).sum())} of {close.numel()} live weights differ"
    error = lambda Q: float(torch.linalg.norm(X[:, live] @ (W[:, live] - Q).t()))  # noqa: E731
    assert error(res.Q[:, live]) == pytest.approx(error(Q_ref), rel=1e-3)


def _indefinite_hessian(k, neg):
    """A symmetric H with mean diagonal ~1 and one eigenvalue `neg`: damping must exceed |neg|."""
    torch.manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(k, k))
    eig = torch.ones(k)
    eig[0] = neg
    return (basis * eig) @ basis.t()


def test_non_pd_hessian_escalates_damping_and_completes():
    layer = make_layer()
    g = GPTQ(layer, name="test.layer")
    g.H = _indefinite_hessian(K, -0.05)  # 1% damping is not enough, 10% is
    g.nsamples = 1
    cfg = fmt.QuantConfig(bits=4, group_size=128)
    res = g.fasterquant(cfg)
    assert res.stats["damp_escalations"] == 1 and res.stats["damp_percent"] == pytest.approx(0.1)
    assert res.stats["fallback"] is None and math.isfinite(res.stats["loss"])
    _assert_round_trip(res, cfg)


def test_hopeless_hessian_falls_back_to_rtn():
    layer = make_layer()
    g = GPTQ(layer, name="test.layer")
    g.H = -torch.eye(K)
    cfg = fmt.QuantConfig(bits=4, group_size=128)
    res = g.fasterquant(cfg)
    assert res.stats["fallback"] == "rtn" and res.stats["damp_escalations"] >= 2
    q, zeros, scales, g_idx = rtn.quantize_weight(layer.weight.detach(), cfg)
    assert torch.equal(res.q, q) and torch.equal(res.scales, scales)
    _assert_round_trip(res, cfg)


def test_singular_hessian_completes():
    X = torch.randn(8, K).repeat(64, 1)  # rank 8 << K
    res, *_ = run_gptq(fmt.QuantConfig(bits=4, group_size=64, desc_act=True), X=X)
    assert res.stats["fallback"] is None and torch.isfinite(res.Q).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_name_the_layer(bad):
    g = GPTQ(make_layer(), name="model.layers.7.mlp.down_proj")
    X = correlated_inputs().to(torch.bfloat16)
    g.add_batch(X[:256])
    X[300, 5] = bad
    with pytest.raises(NonFiniteActivations, match=r"model\.layers\.7\.mlp\.down_proj") as e:
        g.add_batch(X[256:512])
    assert ("NaN" if bad != bad else "Inf") in str(e.value)


def test_hessian_is_running_mean_of_2xxT():
    X = correlated_inputs()
    g = GPTQ(make_layer(), name="x")
    for xb in X.split([100, 1000, 948]):
        g.add_batch(xb)
    assert g.nsamples == TOKENS
    torch.testing.assert_close(g.H, 2 * X.t() @ X / TOKENS, rtol=1e-4, atol=1e-4 * float(g.H.diagonal().mean()))


def test_deterministic():
    cfg = fmt.QuantConfig(bits=4, group_size=32, desc_act=True, sym=False)
    a, *_ = run_gptq(cfg)
    b, *_ = run_gptq(cfg)
    for f in ("q", "zeros", "scales", "g_idx", "Q"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert a.stats["loss"] == b.stats["loss"]


def test_layer_is_not_modified_and_stats_reported():
    layer = make_layer()
    W = layer.weight.detach().clone()
    res, *_ = run_gptq(fmt.QuantConfig(bits=4, group_size=128), layer=layer)
    assert torch.equal(layer.weight.detach(), W)
    for key in ("loss", "damp_percent", "damp_escalations", "dead_columns", "hessian_diag_min",
                "hessian_diag_max", "hessian_cond_est", "seconds", "nsamples", "fallback"):
        assert key in res.stats
    assert res.stats["damp_percent"] == 0.01 and res.stats["damp_escalations"] == 0
