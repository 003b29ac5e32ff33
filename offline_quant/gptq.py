"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) for one nn.Linear, after the paper's reference gptq.py.

    gptq = GPTQ(layer, name="model.layers.0.mlp.down_proj")
    for x in calibration_inputs:  # inputs of `layer`, [..., K]
        gptq.add_batch(x)
    result = gptq.fasterquant(cfg)  # GPTQResult: q, zeros, scales, g_idx, Q, stats
    gptq.free()

Shapes: W [N, K] = [rows, columns] (nn.Linear: out x in), H [K, K], G groups of `group_size` columns.
Grid (offline_quant/grid.py, docs/FORMAT.md): Q = scale * (q - zero), per output row and group.

The solve is the paper's Algorithm 1 (lazy batches of `blocksize` columns, per-column quantization with
error feedback through the upper Cholesky factor of H^-1, called Hinv as in the paper) with changes
that do not change the result (tests/test_gptq.py checks it against a textbook OBS), only its cost:

- Hinv is never formed. Factor H = V V^T with V upper triangular (Cholesky run from the last column
  backwards, _upper_cholesky_); then H^-1 = U^T U with U = V^-1 upper, so U is the paper's
  Hinv = Cholesky(H^-1)^T. One factorization (K^3/3 flops, in place) replaces the reference's Cholesky,
  cholesky_inverse and second Cholesky (4K^3/3), and no explicit inverse loses precision in fp32. Only
  U's diagonal blocks are needed (Hinv1 = V1^-1, 128x128).
- The lazy-batch update is left-looking. The paper's errors satisfy W - Q = Err U, so the update a block
  receives from all earlier columns, -Err[:, :i1] @ Hinv[:i1, i1:i2], equals
  (W - Q)[:, :i1] @ V[:i1, i1:i2] @ Hinv1: one GEMM with a long inner dimension per block instead of a
  rank-128 update of every later column.
- The per-column loop runs on a transposed block ([count, N], each column contiguous), in sub-blocks of
  SUB_BLOCK columns, with one thread: its ops are small, and on a busy 2-core machine thread
  synchronisation costs more than they do. The big GEMMs use torch's thread setting.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time

import torch

from vllm_gptq_plugin import format as fmt
from vllm_gptq_plugin.offline_quant import grid

log = logging.getLogger(__name__)

DAMP_STEP = 10.0  # on a failed Cholesky, damp_percent is multiplied by this ...
DAMP_CAP = 1.0    # ... while it stays <= DAMP_CAP; after that the layer falls back to RTN
# Damping of the fp-target correction, a fraction of mean diag(H). The correction moves W in the
# directions the calibration text excites; measured on SmolLM2 calibrated on the Python docs alone,
# 0.01 made Shakespeare worse than RTN (ratio 1.29), 0.1 kept the docs' gain and fixed that (0.78).
FP_TARGET_DAMP = 0.1
SUB_BLOCK = 16    # columns per rank-1-update tile inside a block (a performance knob only)
CHOLESKY_BLOCK = 512  # block size of _upper_cholesky_ (a performance knob only)
TOKENS_PER_GEMM = 2048  # add_batch's slice of tokens on the CPU (a memory knob: results change only in rounding)
TOKENS_PER_GEMM_GPU = 8192  # on a GPU: a default batch of 4 x 2048 tokens in one GEMM
GRAM_COLUMNS_ELEMENTS = 1 << 24  # fp32 elements of one slice of a Gram update (64 MiB; a memory knob)


class NonFiniteActivations(ValueError):
    """NaN or Inf in a layer's calibration inputs (kind "NaN" or "Inf"), or finite inputs whose Hessian
    overflowed fp32 (kind "overflow"); layer: the layer's name. The driver adds the block and advice."""

    def __init__(self, message: str, layer: str | None, kind: str):
        super().__init__(message)
        self.layer, self.kind = layer, kind


@dataclasses.dataclass
class GPTQResult:
    q: torch.Tensor       # [N, K] int32 levels, original column order (from fasterquant: a view of a
                          # contiguous [K, N] tensor, q.t(), which is the layout format.pack_layer packs)
    zeros: torch.Tensor   # [G, N] int32 real zero points (>= 1 for v1 asymmetric)
    scales: torch.Tensor  # [G, N] fp32, each fp16-representable
    g_idx: torch.Tensor   # [K] int32 group of each input column
    Q: torch.Tensor       # [N, K] fp32 == (q - zeros[g_idx].T) * scales[g_idx].T, what the format dequantizes
                          # to (from fasterquant: also a transposed view)
    stats: dict


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class GPTQ:
    def __init__(self, layer: torch.nn.Linear, name: str | None = None):
        self.layer = layer
        self.name = name
        self.rows, self.columns = layer.weight.shape
        # Sums over all tokens of x x^T (and of x~ x^T with fp targets, see add_batch) in fp64: sums of
        # fp32 GEMM outputs are exact there (or nearly), so any split of the tokens into batches or
        # ranks (distributed.World.merge_hessians) gives the same fp32 H after its one rounding.
        self.Hsum = torch.zeros(self.columns, self.columns, dtype=torch.float64, device=layer.weight.device)
        self.Csum = None
        self._H = self._C = None
        self.target = None  # with fp targets: the weights the solve quantized (W'), for the report
        self.nsamples = 0  # tokens seen

    @property
    def H(self) -> torch.Tensor:
        """2/n sum of x x^T over the n tokens seen, in fp32 (made from Hsum on first use, which drops
        Hsum: no add_batch after that). Assignable, e.g. with a Hessian computed elsewhere."""
        if self._H is None and self.Hsum is not None:
            self._H, self.Hsum = self._mean(self.Hsum), None
        return self._H

    @H.setter
    def H(self, value: torch.Tensor) -> None:
        self._H, self.Hsum = value, None

    @property
    def C(self) -> torch.Tensor | None:
        """2/n sum of x~ x^T with fp targets, else None; made like H."""
        if self._C is None and self.Csum is not None:
            self._C, self.Csum = self._mean(self.Csum), None
        return self._C

    @C.setter
    def C(self, value: torch.Tensor | None) -> None:
        self._C, self.Csum = value, None

    def _mean(self, S: torch.Tensor) -> torch.Tensor:
        return S.mul_(2 / max(self.nsamples, 1)).to(torch.float32)

    def add_batch(self, inp: torch.Tensor, target: torch.Tensor | None = None) -> None:
        """Hsum += x x^T over the batch's tokens.

        target: what the layer's input x~ would be in the fp model (same tokens): then the layer is
        fit to the fp model's output, min |Q x - W x~|^2 (GPTAQ, Li et al. 2025), not to its own
        on its quantized inputs; this needs C = 2/n sum x~ x^T as well.
        """
        assert self.Hsum is not None, "add_batch after H was made (or set)"
        inp = inp.detach().reshape(-1, inp.shape[-1])
        if target is not None:
            target = target.detach().reshape(-1, target.shape[-1])
        if inp.shape[0] == 0:
            return
        # In slices of tokens: on the CPU the fp32 copies of inp and target stay small (a batch of 4096
        # tokens of a 1536-wide input was 25 MB each, and the heap kept them); on a GPU the slices are
        # larger, since each one costs a pass over the fp64 sums (14336^2 x 20 bytes for a down_proj).
        step = TOKENS_PER_GEMM if self.Hsum.device.type == "cpu" else TOKENS_PER_GEMM_GPU
        for t0 in range(0, inp.shape[0], step):
            x = inp[t0:t0 + step].to(device=self.Hsum.device, dtype=torch.float32)
            _add_gram(self.Hsum, x, x)
            if target is not None:
                if self.Csum is None:
                    self.Csum = torch.zeros_like(self.Hsum)
                _add_gram(self.Csum, target[t0:t0 + step].to(x), x)
            self.nsamples += x.shape[0]
        # A NaN or Inf anywhere in inp reaches diag(H) (sum of x_k^2), so K values tell what a full pass
        # over inp would.
        if not bool(torch.isfinite(self.Hsum.diagonal()).all()):
            where = f"layer {self.name}" if self.name else "this layer"
            if bool(torch.isfinite(inp).all()):  # finite inputs whose squares exceed fp32's range
                raise NonFiniteActivations(
                    f"the Hessian of {where} overflowed fp32: its calibration activations reach |x| = "
                    f"{float(inp.abs().max()):.3g}, and sums of their squares exceed fp32's range (3.4e38)",
                    self.name, "overflow")
            bad = "NaN" if bool(torch.isnan(inp).any()) else "Inf"
            raise NonFiniteActivations(f"{bad} in the calibration activations entering {where}", self.name, bad)

    def fasterquant(self, cfg: fmt.QuantConfig, blocksize: int = 128, mse: bool | None = None) -> GPTQResult:
        """Quantize the layer's weight with GPTQ against H. Does not modify the layer.

        mse: MSE-optimal clipping of every group's grid (grid.find_params(mse=True)); None reads
        cfg.meta["mse"] (default False). cfg.meta "mse_maxshrink" / "mse_norm" / "mse_grid" tune it.
        Threads: the O(K^3) GEMMs use torch's current thread count, everything else one thread.
        """
        threads = torch.get_num_threads()
        with _threads(1):
            return self._fasterquant(cfg, blocksize, mse, threads)

    def _fasterquant(self, cfg: fmt.QuantConfig, blocksize: int, mse: bool | None, threads: int) -> GPTQResult:
        tick = time.perf_counter()
        H = self.H
        W = self.layer.weight.detach().to(H.dtype, copy=True)  # the solve runs in H's dtype: fp32
        N, K = W.shape
        if self.C is not None:
            W = self._fp_target_weights(W, cfg.meta.get("fp_target_damp", FP_TARGET_DAMP), threads)
            self.target = W.clone()
        gs = K if cfg.group_size == -1 else cfg.group_size
        assert K % gs == 0, f"group_size {gs} must divide in_features {K}"
        if not bool(torch.isfinite(H.diagonal()).all()):
            raise NonFiniteActivations(f"the Hessian of layer {self.name or '?'} overflowed fp32 once summed "
                                       "over the calibration set: its activations are too large", self.name,
                                       "overflow")
        if gs < K:  # a group's grid is taken from the block's updated weights: groups must not straddle
            assert gs % SUB_BLOCK == 0, f"group_size {gs} must be a multiple of {SUB_BLOCK}"  # nor sub-blocks
            blocksize = max(blocksize // gs, 1) * gs
        mse = bool(cfg.meta.get("mse", False)) if mse is None else mse
        refine = bool(cfg.meta.get("refine_scales", False))
        find_params = lambda Wg: grid.find_params(  # noqa: E731  Wg [N, cols] -> (scale [N], zero [N])
            Wg, cfg.bits, cfg.sym, 1 if cfg.checkpoint_format == "gptq" and not cfg.sym else 0, mse=mse,
            norm=cfg.meta.get("mse_norm", 2.4), grid=cfg.meta.get("mse_grid", 100),
            maxshrink=cfg.meta.get("mse_maxshrink", 0.2))
        diag = H.diagonal()
        stats = {"nsamples": self.nsamples, "hessian_diag_min": float(diag.min()),
                 "hessian_diag_max": float(diag.max()), "hessian_diag_mean": float(diag.mean()), "mse": mse}

        dead = diag == 0  # inputs that were always 0: nothing to fit, so quantize them to exactly 0
        stats["dead_columns"] = int(dead.sum())
        if stats["dead_columns"]:
            # A diagonal entry keeps H invertible. The live columns' mean (the reference uses 1) keeps
            # mean(diag H), which sets the damping, what it is without these columns: 1 over-damped the
            # live ones wherever activations are small (3x the output error at |x| ~ 1e-3).
            live = diag[~dead]
            H[dead, dead] = live.mean() if live.numel() else 1.0
            W[:, dead] = 0

        # Grids of the original column groups, fixed before any update. One group per row (group_size
        # -1) is always fixed up front, as in the reference: it starts before any error feedback anyway.
        static_groups = cfg.static_groups or gs == K
        if static_groups:
            static = [find_params(W[:, g0:g0 + gs]) for g0 in range(0, K, gs)]

        perm = torch.arange(K, device=W.device)
        if cfg.desc_act:  # quantize the columns with the largest input energy first
            perm = torch.argsort(torch.diag(H), descending=True, stable=True)
            W = W[:, perm]
        # group of each column in quantization order
        gperm = perm // gs if static_groups else torch.arange(K, device=W.device) // gs

        V, percdamp, escalations = _upper_cholesky(H, perm if cfg.desc_act else None, cfg.damp_percent, threads)
        stats.update(damp_percent=percdamp, damp_escalations=escalations, fallback=None)
        if V is None:
            log.warning("GPTQ: Hessian of layer %s is not positive definite even with damp_percent %g: "
                        "falling back to RTN for this layer", self.name or "?", DAMP_CAP)
            return self._rtn(cfg, stats, tick)
        Vd = V.diagonal()
        stats["hessian_cond_est"] = float((Vd.max() / Vd.min()) ** 2)  # a lower bound on cond(H + damp)

        scales = torch.empty(K // gs, N, device=W.device)
        zeros = torch.empty(K // gs, N, device=W.device)
        if static_groups:
            scales[:], zeros[:] = torch.stack([s for s, _ in static]), torch.stack([z for _, z in static])
        maxq = 2 ** cfg.bits - 1
        # Results are gathered transposed, [K, N], so each block's rows land in their original column
        # positions with a contiguous row copy; q and Q are returned as [N, K] views of them.
        QT = torch.empty(K, N, dtype=W.dtype, device=W.device)
        qT = torch.empty(K, N, dtype=torch.int32, device=W.device)
        loss = 0.0
        for i1 in range(0, K, blocksize):
            i2 = min(i1 + blocksize, K)
            count = i2 - i1
            eye = torch.eye(count, dtype=W.dtype, device=W.device)
            Hinv1 = torch.linalg.solve_triangular(V[i1:i2, i1:i2].triu(), eye, upper=True)  # V1^-1
            W1 = W[:, i1:i2]
            if i1:  # the lazy-batch update; W[:, :i1] holds W - Q of the quantized columns by now
                with _threads(threads):
                    W1 = torch.addmm(W1, W[:, :i1], V[:i1, i1:i2] @ Hinv1)
            W1 = W1.t().contiguous()  # [count, N]: column i of the block is the contiguous row W1[i]
            Q1 = torch.empty_like(W1)
            Err1 = torch.empty_like(W1)
            L1 = torch.empty_like(W1)  # levels q - zero, as floats
            w_, l_, q_, e_ = W1.unbind(0), L1.unbind(0), Q1.unbind(0), Err1.unbind(0)
            d = Hinv1.diagonal().tolist()
            if static_groups:
                S1, Z1 = scales[gperm[i1:i2]], zeros[gperm[i1:i2]]  # [count, N]: each column's grid
                LO1, HI1 = -Z1, maxq - Z1
            # Algorithm 1's column loop, in sub-blocks of SUB_BLOCK columns: a column's error goes to
            # the rest of its sub-block at once (rank 1) and to the rest of the block one sub-block
            # at a time (rank SUB_BLOCK), so the per-column work stays on a cache-sized tile.
            for j1 in range(0, count, SUB_BLOCK):
                j2 = min(j1 + SUB_BLOCK, count)
                for i in range(j1, j2):
                    if static_groups:
                        scale, lo, hi = S1[i], LO1[i], HI1[i]
                    elif (i1 + i) % gs == 0:
                        # grid of the group starting here, from its weights updated so far
                        scale, zero = find_params(W1[i:i + gs].t().contiguous())
                        scales[(i1 + i) // gs], zeros[(i1 + i) // gs] = scale, zero
                        lo, hi = -zero, maxq - zero
                    # q = clamp(round(w / scale) + zero, 0, maxq), Q = scale * (q - zero)
                    torch.div(w_[i], scale, out=l_[i]).round_().clamp_(lo, hi)
                    torch.mul(l_[i], scale, out=q_[i])
                    err1 = torch.sub(w_[i], q_[i], out=e_[i]).div_(d[i])
                    W1[i + 1:j2].addr_(Hinv1[i, i + 1:j2], err1, alpha=-1)
                W1[j2:].addmm_(Hinv1[j1:j2, j2:].t(), Err1[j1:j2], alpha=-1)
            loss += float(Err1.square().sum()) / 2  # sum of the paper's Losses = (w - q)^2 / Hinv_ii^2 / 2
            W[:, i1:i2] -= Q1.t()
            QT.index_copy_(0, perm[i1:i2], Q1)
            qT.index_copy_(0, perm[i1:i2], (L1 + zeros[gperm[i1:i2]]).to(torch.int32))
        del W, V

        invperm = torch.argsort(perm)
        g_idx = gperm[invperm]
        if refine and gs < K:
            with _threads(threads):
                scales, QT = _refine_scales(self.layer.weight.detach().float(), H, qT, zeros, scales, g_idx,
                                            percdamp * float(H.diagonal().mean()), stats)
        stats.update(loss=loss, seconds=time.perf_counter() - tick)
        # Q is exactly what the format dequantizes q, zeros, scales to: levels are small integers in fp32.
        return GPTQResult(qT.t(), zeros.to(torch.int32), scales, g_idx.to(torch.int32), QT.t(), stats)

    def _fp_target_weights(self, W: torch.Tensor, percdamp: float, threads: int) -> torch.Tensor:
        """W' = argmin |W' X - W X~|^2 = W + W (C - H) H^-1 (H damped): the weights that, on the
        quantized inputs X, best reproduce the fp outputs; GPTQ then quantizes W' against H, since
        |Q X - W X~|^2 = |(Q - W') X|^2 + const. Unchanged W when X~ = X."""
        H = self.H.clone()
        H.diagonal().add_(percdamp * float(H.diagonal().mean()) + 1e-12)
        with _threads(threads):
            L, info = torch.linalg.cholesky_ex(H)
            del H  # K x K matrices are what a GPU's memory holds least of: at most four at a time here
            if int(info) != 0:
                log.info("GPTQ: fp-target correction skipped for %s (H not positive definite)", self.name)
                return W
            delta = torch.cholesky_solve((self.C.sub_(self.H).t() @ W.t()), L).t()  # C - H, in C's memory
        self.C = None
        return W + delta

    def _rtn(self, cfg: fmt.QuantConfig, stats: dict, tick: float) -> GPTQResult:
        from vllm_gptq_plugin.offline_quant import rtn
        q, zeros, scales, g_idx = rtn.quantize_weight(self.layer.weight.detach(), cfg)
        stats.update(fallback="rtn", loss=math.nan, hessian_cond_est=math.inf,
                     seconds=time.perf_counter() - tick)
        return GPTQResult(q, zeros, scales, g_idx, _dequantize(q, zeros, scales, g_idx), stats)

    def free(self) -> None:
        self.Hsum = self.Csum = self._H = self._C = self.target = None


def _add_gram(S: torch.Tensor, a: torch.Tensor, x: torch.Tensor) -> None:
    """S += a^T x (S fp64 [K, K], a and x fp32 [tokens, K]): fp32 GEMMs (in the caller's GEMM mode)
    of GRAM_COLUMNS_ELEMENTS // K columns at a time, so the fp32 product never needs a whole K x K."""
    cols = max(1, GRAM_COLUMNS_ELEMENTS // S.shape[0])
    for c0 in range(0, S.shape[1], cols):
        S[:, c0:c0 + cols] += a.t() @ x[:, c0:c0 + cols]


def _upper_cholesky(H: torch.Tensor, perm: torch.Tensor | None, percdamp: float, threads: int):
    """Upper triangular V with H[perm][:, perm] + damp*I = V V^T, damp = percdamp * mean(diag H).

    percdamp is multiplied by DAMP_STEP while the factorization fails, up to DAMP_CAP. Returns
    (V or None, percdamp used, escalations). Only V's upper triangle is meaningful (below it lies what
    is left of H). H is not modified.
    """
    mean_diag = float(H.diagonal().mean())
    escalations = 0
    while True:
        A = H[perm[:, None], perm] if perm is not None else H.clone()
        A.diagonal().add_(percdamp * mean_diag)
        if math.isfinite(mean_diag) and mean_diag > 0 and _upper_cholesky_(A, threads):
            return A, percdamp, escalations
        del A
        if percdamp * DAMP_STEP > DAMP_CAP * (1 + 1e-9):
            return None, percdamp, escalations
        log.info("GPTQ: Cholesky failed at damp_percent %g, retrying with %g", percdamp, percdamp * DAMP_STEP)
        percdamp *= DAMP_STEP
        escalations += 1


def _upper_cholesky_(A: torch.Tensor, threads: int = 1) -> bool:
    """A = V V^T with V upper triangular, V written over A's upper triangle; False if A is not PD.

    Blocked, from the last block column to the first: block column k of V is its block of A minus the
    contributions of the columns to its right (one GEMM), then the diagonal block is factored and the
    blocks above it solved against it. In place, and on this CPU faster than LAPACK's potrf.
    """
    K, nb = A.shape[0], CHOLESKY_BLOCK
    for k1 in range(K, 0, -nb):
        k0 = max(k1 - nb, 0)
        if k1 < K:
            with _threads(threads):
                A[:k1, k0:k1].addmm_(A[:k1, k1:], A[k0:k1, k1:].t(), alpha=-1)
        # upper factor of the small diagonal block: the lower one of it reversed, reversed back
        L, info = torch.linalg.cholesky_ex(A[k0:k1, k0:k1].flip(0, 1))
        if int(info) != 0:
            return False
        Vkk = L.flip(0, 1)
        A[k0:k1, k0:k1] = Vkk
        if k0:  # V[:k0, k] = A[:k0, k] Vkk^-T
            with _threads(threads):
                A[:k0, k0:k1] = torch.linalg.solve_triangular(Vkk.t(), A[:k0, k0:k1], upper=False, left=False)
    return True


def _refine_scales(W: torch.Tensor, H: torch.Tensor, qT: torch.Tensor, zeros: torch.Tensor,
                   scales: torch.Tensor, g_idx: torch.Tensor, damp: float, stats: dict,
                   budget: int = 1 << 25) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-fit each row's group scales to GPTQ's integer levels: (scales, QT), the levels unchanged.

    With the levels L = q - zero fixed, Q[n] = A_n s_n is linear in row n's G scales (A_n[k, g] =
    L[n, k] if column k is in group g), so the loss (W - Q) H (W - Q)^T is minimised row by row by
    s_n = (A_n^T H A_n)^-1 A_n^T H w_n. GPTQ picked each grid before the error feedback that followed
    it; this fits all of them to the final levels at once. Rows whose fitted (fp16-rounded) scales
    do not lower their loss keep the old ones. H is damped as in the solve; mean diag * damp.
    """
    K, N = qT.shape
    G = scales.shape[0]
    Hd = H.clone()
    Hd.diagonal().add_(damp)
    g = g_idx.long()
    onehot = torch.nn.functional.one_hot(g, G).to(W.dtype)  # [K, G]
    L = (qT.t() - zeros[g].t()).to(W.dtype)  # [N, K]
    new = scales.clone()
    rows = max(1, budget // (K * G))
    for n0 in range(0, N, rows):
        Ln, Wn = L[n0:n0 + rows], W[n0:n0 + rows]
        # T[n, k, g'] = sum over k' in group g' of H[k, k'] L[n, k']
        T = torch.einsum("nj,jg,kj->nkg", Ln, onehot, Hd)
        M = torch.einsum("nk,kg,nkh->ngh", Ln, onehot, T)  # A^T H A  [n, G, G]
        b = (Ln * (Wn @ Hd)) @ onehot                      # A^T H w  [n, G]
        ridge = 1e-6 * M.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-30)
        M.diagonal(dim1=1, dim2=2).add_(ridge[:, None])
        s = torch.linalg.solve(M, b).to(torch.float16).float()
        new[:, n0:n0 + rows] = torch.where(torch.isfinite(s) & (s > 0), s, scales[:, n0:n0 + rows].t()).t()
    Q_old = L * scales[g].t()
    Q_new = L * new[g].t()

    def row_loss(Q):
        E = W - Q
        return ((E @ Hd) * E).sum(dim=1)
    old_loss, new_loss = row_loss(Q_old), row_loss(Q_new)
    better = new_loss < old_loss
    stats["refined_rows"] = int(better.sum())
    stats["refine_gain"] = float(1 - new_loss[better].sum() / old_loss[better].sum()) if bool(better.any()) else 0.0
    scales = torch.where(better[None, :], new, scales)
    return scales, (L * scales[g].t()).t().contiguous()


def _dequantize(q, zeros, scales, g_idx) -> torch.Tensor:
    """Q [N, K] exactly as format.dequantize computes it from the packed tensors."""
    g = g_idx.long()
    return (q.float() - zeros[g].t().float()) * scales[g].t()
