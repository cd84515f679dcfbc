"""Fast EM for Gaussian mixtures: scikit-learn's algorithm, without the dense n x k work.

Why: at the paper's scale (32,256 forward vectors, N_G = 1792) scikit-learn's EM spends its
time on the dense (n, k) matrix of log-densities — building it, ``logsumexp`` and ``exp``
over 58 M entries per iteration — although almost all of it is ``exp(-hundreds)``: each
weight vector belongs to its neuron's component. A dense torch E-step is no faster (memory
bound: measured), so this module skips what cannot matter, *provably*, and does the rest as
small matmuls:

- **Bound.** For a diagonal Gaussian the Mahalanobis distance is a sum of non-negative
  per-dimension terms, so the sum over a few dimensions S (16) is a lower bound; for a full
  one, the leading s coordinates of ``(x - mu) @ P`` (P upper triangular, scikit-learn's
  ``precisions_cholesky_``) depend only on the leading s dimensions of x, which gives the same
  kind of bound. Either is one float32 matmul with ``2s + 1`` (or ``s(s+3)/2 + 1``) features
  instead of ``2d + 1``: an upper bound ``U[x, k] >= log w_k + log N(x | k)``, its rounding
  error bounded and absorbed in the threshold.
- **Tiles.** Points are sorted by their likely component (the previous iteration's best, the
  k-means label, or the neuron index for :func:`detector.gmm.neuron_init`) and taken 256 at a
  time. A tile is first evaluated exactly on its likely components, giving ``L[x] <= log
  p(x)``; a component is skipped for the whole tile when ``U[x, k] < L[x] - tau - log k`` for
  every point of it. The skipped pairs of a point together hold less than ``exp(-tau)``
  (``tau = 50``: 2e-22) of its density, far below float64 resolution, so log-likelihoods,
  responsibilities and the M-step agree with the dense computation to rounding.
- **Exact on the rest**, as matmuls over (tile x kept components), and the M-step's sums are
  gathered on the way. A component left with almost no responsibility (< 1e-10) is recomputed
  over every point, so even dead components follow scikit-learn's formulas. When the bound
  keeps most components (broad k-means mixtures) it switches itself off and tiles are dense.

Semantics follow ``sklearn.mixture.GaussianMixture`` (n_init = 1): ``reg`` added to the
covariance diagonal, ``nk + 10 eps``, weights ``nk / sum(nk)``, convergence when the change of
the mean log-likelihood (computed in the E-step, before the M-step) is below ``tol``, the
parameters after the last M-step returned, ``n_iter`` counted the same way; k-means
initialisation is scikit-learn's own ``KMeans(n_init=1, random_state=seed)``, so both start
from the same labels. ``tests/detector/test_em.py`` compares the two; ``backdoor-gate bench`` times them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: score_samples switches to the pruned evaluation of detector.em from this many (n x k) pairs
FAST_SCORE_PAIRS = 1 << 22


@dataclass(frozen=True)
class Mixture:
    """A fitted GMM as arrays. ``precisions_cholesky``: (k, d, d) for full, (k, d) for diag."""

    weights: np.ndarray
    means: np.ndarray
    precisions_cholesky: np.ndarray
    covariance: str
    n_iter: int = 0
    converged: bool = True

    @property
    def n_components(self) -> int:
        return int(self.weights.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.means.shape[1])

    def n_parameters(self) -> int:
        k, d = self.means.shape
        cov = k * d * (d + 1) // 2 if self.covariance == "full" else k * d
        return int(cov + k * d + k - 1)

    def score_samples(self, X: np.ndarray, chunk_bytes: int = 64 << 20, method: str = "auto") -> np.ndarray:
        """log p(x) for each row of X (higher = more typical).

        ``method="auto"``: large inputs (all reference vectors against N_G in the thousands)
        go through :func:`detector.em.score_samples` ("pruned": it skips only pairs provably
        below 1e-21 of a point's density); small ones (one network) are evaluated "dense" here.
        """
        if method not in ("auto", "dense", "pruned"):
            raise ValueError(f"method must be 'auto', 'dense' or 'pruned', got {method!r}")
        X = np.asarray(X, dtype=np.float64)
        n, d = X.shape
        k = self.n_components
        if method == "pruned" or (method == "auto" and n * k >= FAST_SCORE_PAIRS):
            return score_samples(self, X)
        if self.covariance == "diag":
            P = self.precisions_cholesky  # (k, d) = 1/sigma
            # ||(x - mu) * P||^2 expanded, [x², x, 1]·[P², −2μP², Σ(μP)²]: one matmul and one
            # (n, k) array, the rest in place (every temporary of that size costs the gate its first
            # touch, which dominates a fresh process's time at the paper's N_G).
            P2 = P**2
            Y = np.hstack([P2, -2.0 * self.means * P2, ((self.means * P) ** 2).sum(axis=1, keepdims=True)])
            out = np.hstack([X**2, X, np.ones((n, 1))]) @ Y.T
            out *= -0.5
            log_det = np.log(P).sum(axis=1)
        else:
            P = self.precisions_cholesky  # (k, d, d)
            log_det = np.log(np.diagonal(P, axis1=1, axis2=2)).sum(axis=1)
            out = np.empty((n, k))
            step = max(1, int(chunk_bytes // max(1, n * d * 8)))
            for s in range(0, k, step):
                Pc = P[s : s + step]
                Y = np.einsum("nd,kde->kne", X, Pc) - np.einsum("kd,kde->ke", self.means[s : s + step], Pc)[:, None, :]
                out[:, s : s + step] = -0.5 * (Y**2).sum(axis=2).T
        out += log_det + np.log(np.clip(self.weights, 1e-300, None)) - 0.5 * d * _LOG_2PI
        m = out.max(axis=1, keepdims=True)
        out -= m  # log-sum-exp over components, in place
        np.exp(out, out=out)
        return m[:, 0] + np.log(out.sum(axis=1))

    def aic(self, X: np.ndarray) -> float:
        return float(-2.0 * self.score_samples(X).sum() + 2.0 * self.n_parameters())

    def bic(self, X: np.ndarray) -> float:
        return float(-2.0 * self.score_samples(X).sum() + self.n_parameters() * np.log(len(X)))


#: nats: the dropped pairs of a point hold less than exp(-TAU) of its probability.
TAU = 50.0
#: mixtures this small are evaluated densely (the bound would not save anything).
DENSE_MAX_COMPONENTS = 32
#: components with less total responsibility than this are recomputed over every point.
WEAK_COMPONENT = 1e-10
_EPS10 = 10.0 * float(np.finfo(np.float64).eps)  # scikit-learn's nk floor
_LOG_2PI = math.log(2.0 * math.pi)

ILL_DEFINED = (
    "Fitting the mixture model failed because some components have ill-defined empirical covariance "
    "(for instance caused by singleton or collapsed samples). Try to decrease the number of components, "
    "increase reg_covar, or scale the input data."
)


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch threads, then restore; None keeps torch's own setting (which follows
    ``$OMP_NUM_THREADS``: the library reads no environment itself)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Parameters as torch tensors
# --------------------------------------------------------------------------------------------
class _Params:
    """weights (k,), means (k, d), prec: (k, d) = 1/sigma for diag, (k, d, d) upper P for full."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, prec: torch.Tensor, covariance: str) -> None:
        self.weights, self.means, self.prec, self.covariance = weights, means, prec, covariance
        self.k, self.d = means.shape
        if covariance == "diag":
            log_det = torch.log(prec).sum(1)
            self.prec2 = prec * prec
        else:
            log_det = torch.log(torch.diagonal(prec, dim1=1, dim2=2)).sum(1)
        self.log_norm = torch.log(weights.clamp_min(1e-300)) + log_det - 0.5 * self.d * _LOG_2PI  # (k,)

    @classmethod
    def from_mixture(cls, m: Mixture) -> _Params:
        t = lambda a: torch.as_tensor(np.ascontiguousarray(a, dtype=np.float64))  # noqa: E731
        prec = t(m.precisions_cholesky)
        if m.covariance == "full" and bool((torch.tril(prec, -1) != 0).any()):
            prec = _upper_cholesky(prec @ prec.transpose(1, 2))  # the bound needs scikit-learn's upper form
        return cls(t(m.weights), t(m.means), prec, m.covariance)

    def to_mixture(self, n_iter: int, converged: bool) -> Mixture:
        return Mixture(
            weights=self.weights.numpy().copy(),
            means=self.means.numpy().copy(),
            precisions_cholesky=self.prec.numpy().copy(),
            covariance=self.covariance,
            n_iter=int(n_iter),
            converged=bool(converged),
        )


def _upper_cholesky(precision: torch.Tensor) -> torch.Tensor:
    """Upper-triangular U with U U^T = precision (scikit-learn's flipped Cholesky)."""
    flip = lambda a: torch.flip(a, (-2, -1))  # noqa: E731
    L, info = torch.linalg.cholesky_ex(flip(precision))
    if bool((info != 0).any()):
        raise ValueError("precisions_cholesky of the init does not give positive-definite precisions")
    return flip(L).contiguous()


def precision_cholesky(cov: torch.Tensor, covariance: str) -> torch.Tensor:
    """scikit-learn's ``_compute_precision_cholesky``: 1/sqrt(var), or inv(chol(cov)).T."""
    if covariance == "diag":
        if bool((cov <= 0.0).any()):
            raise ValueError(ILL_DEFINED)
        return 1.0 / torch.sqrt(cov)
    L, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):
        raise ValueError(ILL_DEFINED)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype).expand_as(cov)
    return torch.linalg.solve_triangular(L, eye, upper=False).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# Exact log joints  log w_k + log N(x | k)
# --------------------------------------------------------------------------------------------
def _tile_log_joint(
    Y: torch.Tensor, c: torch.Tensor, p: _Params, cols: torch.Tensor | None, Y2: torch.Tensor | None = None
) -> torch.Tensor:
    """(rows, cols) exact log joints of a tile of points against some components, float64.

    ``Y`` are the tile's points minus a centre ``c`` (in the working dtype: centring keeps the
    expanded square's cancellation small, even in float32). Diagonal: two matmuls,
    ``-y^2 @ P^2 / 2 + y @ ((mu - c) P^2)``. Full: ``(y - (mu - c)) @ P`` batched over the
    components.
    """
    dtype = Y.dtype
    cs = torch.arange(p.k) if cols is None else cols
    if p.covariance == "diag":
        P2, mu = p.prec2[cs].to(dtype), p.means[cs].to(dtype) - c
        if Y2 is None:
            Y2 = Y * Y
        out = torch.addmm(Y @ (mu * P2).T, Y2, P2.T, alpha=-0.5).to(torch.float64)
        return out + (p.log_norm[cs] - 0.5 * (mu * mu * P2).sum(1).to(torch.float64))[None, :]
    out = torch.empty(len(Y), len(cs), dtype=torch.float64)
    step = max(1, (1 << 21) // max(1, len(Y) * p.d))
    for s in range(0, len(cs), step):
        cc = cs[s : s + step]
        Z = torch.matmul(Y[None] - (p.means[cc].to(dtype) - c)[:, None, :], p.prec[cc].to(dtype))  # (b, rows, d)
        out[:, s : s + step] = (p.log_norm[cc][:, None] - 0.5 * (Z * Z).sum(2).to(torch.float64)).T
    return out


# --------------------------------------------------------------------------------------------
# The bound: an upper bound on every log joint from a few leading / chosen dimensions
# --------------------------------------------------------------------------------------------
#: (nk, S1, S2, kept): the M-step's sums, uncentred
_SumsTuple = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list | None]
#: (float32 bound weights, hint per sorted point, margin per sorted point)
_BoundArrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class _Sums:
    """Sums over responsibilities of 1, y and y^2 (y = x - centre) for the M-step; ``kept`` holds
    (y, columns, R) per tile for the full covariance."""

    nk: torch.Tensor
    S1: torch.Tensor
    S2: torch.Tensor | None
    kept: list | None

    @classmethod
    def empty(cls, k: int, d: int, covariance: str) -> _Sums:
        diag = covariance == "diag"
        return cls(
            torch.zeros(k, dtype=torch.float64),
            torch.zeros(k, d, dtype=torch.float64),
            torch.zeros(k, d, dtype=torch.float64) if diag else None,
            None if diag else [],
        )

    def add(
        self, Y: torch.Tensor, Y2: torch.Tensor | None, cols: torch.Tensor | None, R: torch.Tensor, f64: bool
    ) -> None:
        y = Y if f64 else Y.to(torch.float64)
        y2 = None if self.S2 is None else (Y2 if f64 and Y2 is not None else y * y)
        if cols is None:
            self.nk += R.sum(0)
            self.S1 += R.T @ y
            if self.S2 is not None and y2 is not None:
                self.S2 += R.T @ y2
        else:
            self.nk.index_add_(0, cols, R.sum(0))
            self.S1.index_add_(0, cols, R.T @ y)
            if self.S2 is not None and y2 is not None:
                self.S2.index_add_(0, cols, R.T @ y2)
        if self.kept is not None:
            self.kept.append((y, cols, R))

    def uncentred(self, centre: torch.Tensor) -> _SumsTuple:
        """Back to scikit-learn's sums: sum r x = S1 + c nk, sum r x^2 = S2 + 2 c S1 + c^2 nk."""
        c = centre.to(torch.float64)
        if self.S2 is not None:
            self.S2 += 2.0 * c * self.S1 + (c * c) * self.nk[:, None]
        self.S1 += c * self.nk[:, None]
        return self.nk, self.S1, self.S2, self.kept


class _Bound:
    """Features of the points (fixed for a fit) and the per-iteration weight matrix."""

    def __init__(self, X64: torch.Tensor, covariance: str, s: int, dims: torch.Tensor | None = None):
        n, d = X64.shape
        self.covariance, self.s = covariance, min(s, d)
        self.centre = X64.mean(0)  # centred features: smaller terms, smaller rounding margin
        if covariance == "diag":
            self.dims = dims if dims is not None else torch.arange(self.s)
            Xs = X64[:, self.dims] - self.centre[self.dims]
            F = torch.cat([Xs * Xs, Xs, torch.ones(n, 1, dtype=X64.dtype)], 1)
        else:
            s = self.s
            Xs = X64[:, :s] - self.centre[:s]
            self.iu = torch.triu_indices(s, s)
            quad = Xs[:, self.iu[0]] * Xs[:, self.iu[1]]
            F = torch.cat([quad, Xs, torch.ones(n, 1, dtype=X64.dtype)], 1)
        # The bound's matmul runs in float32 (half the time and memory of float64); its
        # rounding error is at most gamma * sum_f |F[x, f] W[f, k]| <= gamma * |F[x]| @ max_k |W|,
        # which the threshold absorbs, so the bound stays an upper bound.
        self.F = F.to(torch.float32).contiguous()
        self.absF = F.abs()
        self.gamma = 1.01 * (F.shape[1] + 4) * 2.0**-24

    @staticmethod
    def choose_dims(p: _Params, s: int) -> torch.Tensor:
        """Diagonal case: the dimensions where components are furthest apart in their own units."""
        spread = p.means.var(0) * p.prec2.median(0).values
        return torch.argsort(spread, descending=True)[: min(s, p.d)]

    def weights(self, p: _Params) -> torch.Tensor:
        """(features, k), float64: F @ W = log w + log det - d/2 log 2pi - (partial Mahalanobis)/2."""
        if self.covariance == "diag":
            P2, mu = p.prec2[:, self.dims], p.means[:, self.dims] - self.centre[self.dims]
            const = p.log_norm - 0.5 * (mu * mu * P2).sum(1)
            return torch.cat([-0.5 * P2, mu * P2, const[:, None]], 1).T.contiguous()
        s = self.s
        Ps = p.prec[:, :s, :s]  # y[:s] = (x - mu)[:s] @ P[:s, :s]: P is upper triangular
        A = Ps @ Ps.transpose(1, 2)
        mu = p.means[:, :s] - self.centre[:s]
        Amu = torch.einsum("kij,kj->ki", A, mu)
        quad = A[:, self.iu[0], self.iu[1]] * torch.where(self.iu[0] == self.iu[1], -0.5, -1.0).to(A.dtype)
        const = p.log_norm - 0.5 * (mu * Amu).sum(1)
        return torch.cat([quad, Amu, const[:, None]], 1).T.contiguous()


# --------------------------------------------------------------------------------------------
# E-step (+ the M-step's sufficient statistics, gathered on the way)
# --------------------------------------------------------------------------------------------
class _View:
    """The points in one order (gathered once, so tiles are slices), with what tiles read.

    ``Y``: the points minus their mean (the expanded square then loses little to cancellation,
    even in float32); ``Y2 = Y * Y`` for diagonal mixtures; the bound's features, same order.
    """

    def __init__(self, eng: _Engine, order: torch.Tensor | None):
        self.order, self.centre = order, eng.centre
        self.Y = (eng.X if order is None else eng.X[order]) - eng.centre
        self.Y2 = self.Y * self.Y if eng.covariance == "diag" else None
        if eng.bound is not None and order is not None:
            self.F = eng.bound.F[order]


class _Engine:
    """Tiles of points (sorted by their likely component) against the components that matter.

    For each tile, the float32 bound over all components picks the columns whose upper bound
    reaches ``L - TAU - log k`` for some point of the tile (``L``: the exact log joint of the
    point's hint component, a lower bound of log p(x)); those columns are evaluated exactly
    with matmuls, the rest are provably negligible. When the bound keeps most columns it is
    switched off and every tile is dense (still chunked, so memory stays O(tile x k)).
    """

    def __init__(self, X: np.ndarray, covariance: str, dtype: str = "float64", bound_dims: int | None = None):
        self.X64 = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float64))
        if dtype not in ("float64", "float32"):
            raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}")
        self.dtype = torch.float64 if dtype == "float64" else torch.float32
        self.X = self.X64 if self.dtype == torch.float64 else self.X64.to(self.dtype)
        self.n, self.d = self.X64.shape
        self.covariance = covariance
        self.centre = self.X.mean(0)
        self._view_cache: _View | None = None
        self.bound_dims = bound_dims or (16 if covariance == "diag" else 8)
        self.tile = 256 if covariance == "diag" else 64
        self.bound: _Bound | None = None
        self.use_bound = True
        #: components evaluated exactly per point, per E-step (k when dense)
        self.columns_per_point: list[float] = []
        #: components recomputed over every point, per M-step
        self.weak_components: list[int] = []

    def _bound_for(self, p: _Params) -> _Bound:
        if self.bound is None:
            dims = _Bound.choose_dims(p, self.bound_dims) if self.covariance == "diag" else None
            self.bound = _Bound(self.X64, self.covariance, self.bound_dims, dims)
        return self.bound

    def _view(self, order: torch.Tensor | None) -> _View:
        """The points in ``order`` (None: as given), cached while the order stays the same."""
        cached = self._view_cache
        if cached is not None and (
            (order is None and cached.order is None)
            or (order is not None and cached.order is not None and torch.equal(order, cached.order))
        ):
            return cached
        self._view_cache = _View(self, order)
        return self._view_cache

    def e_step(
        self, p: _Params, hint: torch.Tensor | None, stats: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, _SumsTuple | None]:
        """Returns (logp (n,), new hint (n,) or None, M-step statistics or None)."""
        k, n, d = p.k, self.n, self.d
        bounded = self.use_bound and k > DENSE_MAX_COMPONENTS
        if bounded:
            view, hint, bound = self._bounded_view(p, hint)
            tile = self.tile
        else:
            view, bound = self._view(None), None
            tile = max(self.tile, (1 << 18) // max(1, k))
        logp_v = torch.empty(n, dtype=torch.float64)
        new_hint_v = torch.empty(n, dtype=torch.long) if bounded else None
        sums = _Sums.empty(k, d, self.covariance) if stats else None
        evaluated = 0
        for s in range(0, n, tile):
            sl = slice(s, s + tile)
            Y = view.Y[sl]
            Y2 = None if view.Y2 is None else view.Y2[sl]
            if bound is not None:
                cols, V = self._bounded_tile(p, view, bound, sl, Y, Y2)
            else:
                cols, V = None, _tile_log_joint(Y, view.centre, p, None, Y2)
            top, best = V.max(1)
            R = torch.exp(V - top[:, None])  # logsumexp by hand: its exp gives the responsibilities
            total = R.sum(1)
            logp_v[sl] = top + torch.log(total)
            if new_hint_v is not None:
                assert cols is not None
                new_hint_v[sl] = cols[best]
            evaluated += V.numel()
            if sums is not None:
                R /= total[:, None]
                sums.add(Y, Y2, cols, R, self.dtype == torch.float64)
        self.columns_per_point.append(evaluated / n)
        if bounded and evaluated > 0.5 * n * k:
            self.use_bound = False  # the bound no longer pays for itself on this mixture
        out = sums.uncentred(self.centre) if sums is not None else None
        if view.order is None:
            return logp_v, hint, out
        logp = torch.empty(n, dtype=torch.float64)
        logp[view.order] = logp_v
        new_hint = torch.empty(n, dtype=torch.long)
        assert new_hint_v is not None  # a view has an order only when bounded
        new_hint[view.order] = new_hint_v
        return logp, new_hint, out

    def _bounded_view(self, p: _Params, hint: torch.Tensor | None) -> tuple[_View, torch.Tensor, _BoundArrays]:
        """The points sorted by hinted component, and what the pruning bound needs per point."""
        k, n = p.k, self.n
        b = self._bound_for(p)
        W64 = b.weights(p)
        W = W64.to(torch.float32)
        if hint is None:
            step = max(1, (1 << 20) // k)
            hint = torch.cat([(b.F[s : s + step] @ W).argmax(1) for s in range(0, n, step)])
        order = torch.argsort(hint, stable=True)  # points of one component share a tile
        view = self._view(order)
        # margin for the float32 matmul's rounding (the threshold's own rounding: _bounded_tile)
        margin_v = (TAU + math.log(k) + b.gamma * (b.absF @ W64.abs().amax(1)))[order]
        return view, hint, (W, hint[order], margin_v)

    @staticmethod
    def _bounded_tile(
        p: _Params, view: _View, bound: _BoundArrays, sl: slice, Y: torch.Tensor, Y2: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact log joints of one tile on its hinted components, plus every component the bound
        cannot rule out: L = the hinted best <= log p(x)."""
        W, hint_v, margin_v = bound
        cols = torch.unique_consecutive(hint_v[sl])
        V = _tile_log_joint(Y, view.centre, p, cols, Y2)
        thr = V.amax(1) - margin_v[sl]
        thr = (thr - 2.0**-22 * thr.abs() - 1e-30).to(torch.float32)
        keep = ((view.F[sl] @ W) - thr[:, None]).amax(0) >= 0  # faster than (U >= thr).any(0)
        keep[cols] = False
        more = torch.nonzero(keep).flatten()
        if len(more):
            V = torch.cat([V, _tile_log_joint(Y, view.centre, p, more, Y2)], 1)
            cols = torch.cat([cols, more])
        return cols, V

    # -- M ------------------------------------------------------------------------------
    def m_step(self, p: _Params, logp: torch.Tensor, sums: _SumsTuple, reg: float) -> _Params:
        """scikit-learn's M-step from the gathered sums; weak components recomputed densely."""
        nk, S1, S2, tiles = sums
        X, k, d = self.X64, p.k, self.d
        weak = torch.nonzero(nk < WEAK_COMPONENT).flatten()
        self.weak_components.append(len(weak))
        R_weak = None
        if len(weak):  # these columns were (partly) skipped: take every point, as the dense EM does
            R_weak = torch.exp(self._all_points(p, weak) - logp[:, None])
            nk[weak] = R_weak.sum(0)
            S1[weak] = R_weak.T @ X
            if S2 is not None:
                S2[weak] = R_weak.T @ (X * X)
        nk = nk + _EPS10
        means = S1 / nk[:, None]
        if self.covariance == "diag":
            assert S2 is not None  # gathered for the diagonal covariance
            return self._finish(nk, means, S2 / nk[:, None] - means * means + reg)
        assert tiles is not None  # kept for the full covariance
        cov = torch.zeros(k, d, d, dtype=torch.float64)
        means_c = means - self.centre.to(torch.float64)  # the tiles hold centred points
        for y, cols, R in tiles:
            cs = torch.arange(k) if cols is None else cols
            step = max(1, (1 << 21) // max(1, len(y) * d))
            for s in range(0, len(cs), step):
                cc = cs[s : s + step]
                D = y[None] - means_c[cc][:, None, :]  # (b, rows, d) = x - mean
                cov[cc] += torch.bmm((D * R[:, s : s + step].T[:, :, None]).transpose(1, 2), D)
        for i, j in enumerate(weak.tolist()):
            assert R_weak is not None  # set above whenever there are weak components
            D = X - means[j]
            cov[j] = (R_weak[:, i, None] * D).T @ D
        cov = cov / nk[:, None, None] + reg * torch.eye(d, dtype=torch.float64)
        return self._finish(nk, means, cov)

    def _all_points(self, p: _Params, cols: torch.Tensor) -> torch.Tensor:
        """(n, len(cols)) exact log joints of every point against some components."""
        out = torch.empty(self.n, len(cols), dtype=torch.float64)
        v = self._view(None)
        for s in range(0, self.n, 4096):
            Y2 = None if v.Y2 is None else v.Y2[s : s + 4096]
            out[s : s + 4096] = _tile_log_joint(v.Y[s : s + 4096], self.centre, p, cols, Y2)
        return out

    def _finish(self, nk: torch.Tensor, means: torch.Tensor, cov: torch.Tensor) -> _Params:
        weights = nk / nk.sum()
        return _Params(weights, means, precision_cholesky(cov, self.covariance), self.covariance)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def _check_input(X: np.ndarray, n_components: int, covariance: str) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"EM needs a 2-D array of vectors, got shape {X.shape}")
    if covariance not in ("diag", "full"):
        raise ValueError(f"covariance must be 'diag' or 'full', got {covariance!r}")
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    if len(X) < 2:
        raise ValueError(f"EM needs at least 2 vectors, got {len(X)}")
    if len(X) < n_components:
        raise ValueError(
            f"cannot fit {n_components} Gaussian components to {len(X)} vectors: "
            f"use at most {len(X)} components (or more reference networks)"
        )
    if not np.isfinite(X).all():
        raise ValueError("EM input holds NaN or infinite values")
    return X


def _check_init(init: Mixture, n_components: int, d: int, covariance: str) -> None:
    if init.covariance != covariance:
        raise ValueError(f"init is a {init.covariance!r} mixture, the fit asks for {covariance!r}")
    if init.means.shape != (n_components, d):
        raise ValueError(f"init means have shape {init.means.shape}, expected {(n_components, d)}")


def _check_hint(hint: Any, n: int, k: int) -> torch.Tensor | None:
    if hint is None:
        return None
    h = np.asarray(hint)
    if h.shape != (n,) or not np.issubdtype(h.dtype, np.integer) or (n and (h.min() < 0 or h.max() >= k)):
        raise ValueError(f"hint must hold one component index in [0, {k}) per vector ({n}), got shape {h.shape}")
    return torch.as_tensor(h.astype(np.int64))


def kmeans_labels(X: np.ndarray, n_components: int, seed: int = 0) -> np.ndarray:
    """scikit-learn's default GaussianMixture init: ``KMeans(n_init=1, random_state=seed)``."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=n_components, n_init=1, random_state=seed).fit(X).labels_


def init_from_labels(X: np.ndarray, labels: np.ndarray, n_components: int, covariance: str, reg: float) -> Mixture:
    """Mixture from hard labels, exactly as scikit-learn's ``_initialize`` (weights = nk / n)."""
    Xt = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float64))
    lab = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    n, d = Xt.shape
    nk = torch.bincount(lab, minlength=n_components).to(torch.float64) + _EPS10
    means = torch.zeros(n_components, d, dtype=torch.float64).index_add_(0, lab, Xt) / nk[:, None]
    if covariance == "diag":
        S2 = torch.zeros(n_components, d, dtype=torch.float64).index_add_(0, lab, Xt * Xt)
        cov = S2 / nk[:, None] - means * means + reg
    else:
        D = Xt - means[lab]
        cov = torch.zeros(n_components, d, d, dtype=torch.float64).index_add_(0, lab, D[:, :, None] * D[:, None, :])
        cov = cov / nk[:, None, None] + reg * torch.eye(d, dtype=torch.float64)
    prec = precision_cholesky(cov, covariance)
    return _Params(nk / n, means, prec, covariance).to_mixture(0, False)


def fit(
    X: np.ndarray,
    n_components: int,
    *,
    covariance: str = "diag",
    reg: float = 1e-6,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    init: Mixture | None = None,
    hint: np.ndarray | None = None,
    dtype: str = "float64",
    threads: int | None = None,
    stats: dict | None = None,
) -> Mixture:
    """EM as ``GaussianMixture(n_components, covariance_type=covariance, reg_covar=reg,
    max_iter=max_iter, tol=tol, random_state=seed)`` with ``weights_init/means_init/
    precisions_init`` taken from ``init`` (or its k-means default when ``init`` is None).

    ``hint``: optional component index per vector believed to be its most likely one (e.g.
    the neuron index for :func:`detector.gmm.neuron_init`); it only speeds the E-step up.
    ``dtype="float32"`` evaluates densities in float32 (statistics stay float64).
    ``stats``, when given, receives ``lower_bounds``, ``columns_per_point`` (components
    evaluated exactly per vector, per E-step) and ``weak_components`` (per M-step).
    """
    X = _check_input(X, n_components, covariance)
    n, d = X.shape
    with _threads(threads):
        if init is None:
            labels = kmeans_labels(X, n_components, seed)
            init = init_from_labels(X, labels, n_components, covariance, reg)
            if hint is None:
                hint = labels
        else:
            _check_init(init, n_components, d, covariance)
        engine = _Engine(X, covariance, dtype=dtype)
        p = _Params.from_mixture(init)
        h = _check_hint(hint, n, n_components)
        lower_bound, converged, n_iter, lower_bounds = -math.inf, False, 0, []
        for n_iter in range(1, max_iter + 1):  # noqa: B007 (read after the loop)
            prev = lower_bound
            logp, h, sums = engine.e_step(p, h)
            assert sums is not None  # gathered by default
            p = engine.m_step(p, logp, sums, reg)
            lower_bound = float(logp.mean())
            lower_bounds.append(lower_bound)
            if abs(lower_bound - prev) < tol:
                converged = True
                break
        if stats is not None:
            stats.update(
                lower_bounds=lower_bounds,
                columns_per_point=list(engine.columns_per_point),
                weak_components=list(engine.weak_components),
            )
        if max_iter == 0:
            return init
        return p.to_mixture(n_iter, converged)


def score_samples(
    mixture: Mixture, X: np.ndarray, *, hint: np.ndarray | None = None, threads: int | None = None
) -> np.ndarray:
    """log p(x) per row, as :meth:`Mixture.score_samples`, with the pruned E-step."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != mixture.n_features:
        raise ValueError(f"expected vectors of length {mixture.n_features}, got an array of shape {X.shape}")
    with _threads(threads):
        engine = _Engine(X, mixture.covariance)
        h = _check_hint(hint, len(X), mixture.n_components)
        return engine.e_step(_Params.from_mixture(mixture), h, stats=False)[0].numpy()
