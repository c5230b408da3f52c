"""The chunked machinery shared by every token-level divergence.

A divergence ``D(p, q)`` compares the teacher distribution ``p = softmax(t / tau)`` with the student
distribution ``q = softmax(s / tau)`` at every token. Subclasses of :class:`Divergence` only say how to
compute, for a chunk of rows, the per-row value and the analytic gradient with respect to the
tempered student logits ``z = s / tau``. Every divergence here is a function ``L(q)`` of the student
softmax, so with ``g = dL/dq`` the chain rule through the softmax gives

    dL/dz = q * g - q * sum_j(q_j g_j)                                        (projection)

and ``dL/ds = (dL/dz) / tau``. Subclasses return ``q * g`` (constants in ``g`` cancel) and
:func:`project` finishes it.

Memory: :class:`_ChunkedDivergence` walks over chunks of ``chunk_size`` rows. Forward keeps only a
few per-row statistics (the values a gradient needs, e.g. KL(q || p) for reverse KL); backward
recomputes the log-softmaxes chunk by chunk (one fused kernel each, cheaper than re-centring with
saved logsumexps) and writes the gradient rows. Extra memory is a handful of
(chunk_size x V) buffers plus the gradient itself, instead of several (N x V) fp32 tensors for a naive
autograd graph. The buffers live in a :class:`Workspace` reused by every chunk, and the kernels write
into them with ``out=`` and in-place ops: on CPU a fresh large tensor costs page faults that take
longer than the arithmetic of these memory-bound ops (measured ~10x on exp / log_softmax).

Sparse teacher: :class:`TopKLogProbs` holds the teacher's top-k log-probs (renormalised over the k
entries) and their vocabulary indices. The teacher distribution is then the renormalised top-k
distribution, zero elsewhere; the student stays full-vocabulary. The divergence re-tempers the values
with its own ``tau`` (``log_softmax(values / tau)`` over the k entries, exact for top-k log-probs
built at temperature 1 because the renormalisation constant cancels), so build caches with
``topk_logprobs(logits, k, tau=1.0)``. Divergences that need ``log p`` where ``q > 0`` but ``p = 0``
(reverse KL and its limits) are infinite there; those set :attr:`Divergence.restrict_to_support` and
are computed between ``p`` and the student renormalised over the teacher's support (no gradient
reaches logits outside it).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kdlab.config import Range, Type

# Stands in for log(0): exp(LOG_ZERO) is exactly 0 in fp32 and p * (LOG_ZERO - x) stays finite, so the
# formulas need no masking where p = 0 (outside a top-k support, or teacher logits of -inf).
LOG_ZERO = -1.0e4


class TopKLogProbs(NamedTuple):
    """Sparse teacher: ``values (..., k)`` log-probs renormalised over the k entries, ``indices (..., k)``, and
    where known ``tail (...)``, the log of the teacher's mass outside the k entries (what renormalising drops;
    divergences do not read it: kdlab.teacher.approximation measures what it costs)."""

    values: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor | None = None


@torch.no_grad()
def topk_logprobs(teacher_logits: torch.Tensor, k: int, tau: float = 1.0) -> TopKLogProbs:
    """The teacher's top-``k`` tokens of ``softmax(teacher_logits / tau)``, renormalised over those k.

    Keep ``tau=1`` for caches consumed by a divergence: the divergence applies its own temperature.
    """
    logits = teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32)) / tau
    top, idx = logits.topk(k, dim=-1)
    kept = top.logsumexp(-1) - logits.logsumexp(-1)      # log of the top-k's mass (<= 0)
    tail = torch.log(-torch.expm1(kept.clamp(max=-1e-30)))   # log(1 - mass); -inf-like when k = V
    return TopKLogProbs(torch.log_softmax(top, dim=-1), idx, tail)


class Workspace:
    """Named scratch buffers of one dtype, reused across chunks (see the module docstring)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device, self._bufs = dtype, device, {}

    def __call__(self, name: str, shape, dtype: torch.dtype | None = None) -> torch.Tensor:
        rows, cols = shape
        dtype = dtype or self.dtype
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype:
            buf = self._bufs[name] = torch.empty(rows, cols, dtype=dtype, device=self.device)
        return buf[:rows]


def project(qg: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. softmax inputs from ``q * dL/dq``: ``qg - q * sum(qg)`` (in place on ``qg``)."""
    return qg.addcmul_(q, qg.sum(-1, keepdim=True), value=-1)


def kl_rows(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """sum_j a_j (log a_j - log b_j) per row."""
    return torch.sub(log_a, log_b, out=ws("tmp", a.shape)).mul_(a).sum(-1)


def log_mix(logp: torch.Tensor, logq: torch.Tensor, w: float, out: torch.Tensor) -> torch.Tensor:
    """log(w p + (1 - w) q) into ``out`` as a logsumexp (never rounds below w p or (1 - w) q)."""
    if w == 0 or w == 1:
        return out.copy_(logq if w == 0 else logp)
    torch.add(logq, math.log((1 - w) / w), out=out)
    return torch.logaddexp(logp, out, out=out).add_(math.log(w))


COMMON_SCHEMA = {
    "tau": Range(0, low_open=True),
    "scale_by_tau_squared": Type(bool),
    "chunk_size": Range(1, integer=True),
    "top_k": Range(1, integer=True, optional=True),
}


class Divergence:
    """A token-level divergence between teacher ``p`` and student ``q``; see the module docstring.

    ``div(student_logits, teacher, mask)`` is the mean of the per-token values over masked-in tokens
    (0 when there are none), times ``tau**2`` if ``scale_by_tau_squared`` (Hinton et al. 2015; OKD
    Eq. 2) so that gradient magnitudes do not shrink as ``1/tau**2``. ``teacher`` is logits ``(..., V)``
    or a :class:`TopKLogProbs`; ``top_k`` (if set) sparsifies dense teacher logits the same way.
    Gradients flow only into ``student_logits``.
    """

    name: str = ""
    SCHEMA: dict = COMMON_SCHEMA
    supports_topk: bool = True

    def __init__(self, tau: float = 1.0, scale_by_tau_squared: bool = False, chunk_size: int = 256,
                 top_k: int | None = None):
        self.tau = float(tau)
        self.scale = self.tau**2 if scale_by_tau_squared else 1.0
        self.chunk_size = int(chunk_size)
        self.top_k = top_k

    # --- what a subclass defines -------------------------------------------------------------
    restrict_to_support: bool = False

    def values(self, logq: torch.Tensor, logp: torch.Tensor, ws: Workspace) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-row divergence ``(c,)`` and per-row statistics ``(c, m)`` that :meth:`grad` reuses.

        ``logq`` and ``logp`` are read-only; scratch comes from ``ws``.
        """
        raise NotImplementedError

    def grad(self, logq: torch.Tensor, logp: torch.Tensor, aux: torch.Tensor | None, ws: Workspace) -> torch.Tensor:
        """dL/dz per row ``(c, X)`` for tempered student logits ``z`` (may be a ``ws`` buffer)."""
        raise NotImplementedError

    # --- public API ----------------------------------------------------------------------------
    def per_token(self, student_logits: torch.Tensor, teacher) -> torch.Tensor:
        """Unreduced per-token values, shape ``student_logits.shape[:-1]``."""
        return self._run(student_logits, teacher, None)

    def __call__(self, student_logits: torch.Tensor, teacher, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            vals = self._run(student_logits, teacher, None)
            return vals.sum() / max(vals.numel(), 1)
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} != logits shape {tuple(student_logits.shape[:-1])}")
        rows = mask.reshape(-1).nonzero().squeeze(1)
        return self._run(student_logits, teacher, rows).sum() / max(rows.numel(), 1)

    def __repr__(self) -> str:
        params = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        return f"{type(self).__name__}({params})"

    # --- internals -----------------------------------------------------------------------------
    def _run(self, student_logits, teacher, rows):
        V = student_logits.shape[-1]
        if isinstance(teacher, torch.Tensor):
            if teacher.shape != student_logits.shape:
                raise ValueError(f"teacher logits {tuple(teacher.shape)} != student logits {tuple(student_logits.shape)}")
            if self.top_k is not None:
                teacher = topk_logprobs(teacher, min(self.top_k, V))
        if isinstance(teacher, TopKLogProbs):
            if not self.supports_topk:
                raise ValueError(f"divergence {self.name!r} needs dense teacher logits, not TopKLogProbs")
            k = teacher.values.shape[-1]
            t_logits, t_values, t_indices = None, teacher.values.reshape(-1, k), teacher.indices.reshape(-1, k)
        else:
            t_logits, t_values, t_indices = teacher.reshape(-1, V), None, None
        out = _ChunkedDivergence.apply(self, student_logits.reshape(-1, V), t_logits, t_values, t_indices, rows)
        return out if rows is not None else out.reshape(student_logits.shape[:-1])

    def _log_softmax(self, x: torch.Tensor, name: str, ws: Workspace) -> torch.Tensor:
        """log_softmax(x / tau) in ``ws.dtype`` into buffer ``name`` (bf16 is upcast before any op)."""
        if self.tau != 1:
            x = ws("z", x.shape).copy_(x).div_(self.tau)
        return torch.log_softmax(x, -1, dtype=ws.dtype, out=ws(name, x.shape))

    def _log_probs(self, ws, s, t_logits, t_values, t_indices):
        """``(logq, logp)`` for one chunk of rows; over the teacher's support if restricted."""
        if t_values is None:
            logp = self._log_softmax(t_logits, "logp", ws).clamp_(min=LOG_ZERO)  # teacher logits may be -inf
            return self._log_softmax(s, "logq", ws), logp
        logp_k = torch.log_softmax(t_values.to(ws.dtype) / self.tau, dim=-1)
        if self.restrict_to_support:
            return torch.log_softmax(s.gather(1, t_indices).to(ws.dtype) / self.tau, dim=-1), logp_k
        logp = ws("logp", s.shape).fill_(LOG_ZERO).scatter_(1, t_indices, logp_k)
        return self._log_softmax(s, "logq", ws), logp


class _ChunkedDivergence(torch.autograd.Function):
    """Per-row divergence values over chunks of rows; backward recomputes softmaxes per chunk.

    ``rows`` (or None for all rows) selects the rows of the 2-D inputs to evaluate; unselected rows
    get zero gradient and are never read, so masking copies no (N x V) tensor.
    """

    @staticmethod
    def forward(ctx, div, s2d, t_logits, t_values, t_indices, rows):
        n = s2d.shape[0] if rows is None else rows.numel()
        teacher = t_logits if t_logits is not None else t_values
        dtype = torch.promote_types(torch.promote_types(s2d.dtype, teacher.dtype), torch.float32)
        ws = Workspace(dtype, s2d.device)  # fp32, or fp64 for gradcheck
        out = torch.empty(n, dtype=dtype, device=s2d.device)
        aux_chunks = []
        for c0 in range(0, n, div.chunk_size):
            c1 = min(c0 + div.chunk_size, n)
            logq, logp = div._log_probs(ws, *_chunk(ws, s2d, t_logits, t_values, t_indices, rows, c0, c1))
            val, aux = div.values(logq, logp, ws)
            out[c0:c1] = val.clamp_(min=0) * div.scale  # >= 0 in exact arithmetic; clamp rounding
            if aux is not None:
                aux_chunks.append(aux)
        ctx.div, ctx.dtype = div, dtype
        ctx.save_for_backward(s2d, t_logits, t_values, t_indices, rows, torch.cat(aux_chunks) if aux_chunks else None)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        s2d, t_logits, t_values, t_indices, rows, aux = ctx.saved_tensors
        div, ws = ctx.div, Workspace(ctx.dtype, s2d.device)
        n = grad_out.numel()
        grad = (torch.zeros_like if rows is not None else torch.empty_like)(s2d)
        factor = grad_out.to(ws.dtype) * (div.scale / div.tau)
        for c0 in range(0, n, div.chunk_size):
            c1 = min(c0 + div.chunk_size, n)
            s, tl, tv, ti = _chunk(ws, s2d, t_logits, t_values, t_indices, rows, c0, c1)
            logq, logp = div._log_probs(ws, s, tl, tv, ti)
            g = div.grad(logq, logp, None if aux is None else aux[c0:c1], ws).mul_(factor[c0:c1, None])
            if tv is not None and div.restrict_to_support:
                g = torch.zeros(s.shape, dtype=g.dtype, device=g.device).scatter_(1, ti, g)
            if rows is None:
                grad[c0:c1] = g
            else:
                grad.index_copy_(0, rows[c0:c1], g.to(grad.dtype))
        return None, grad, None, None, None, None


def _chunk(ws, s2d, t_logits, t_values, t_indices, rows, c0, c1):
    """Rows ``c0:c1`` of the selection: views when all rows are selected, else gathered into ``ws``."""
    if rows is None:
        return tuple(None if x is None else x[c0:c1] for x in (s2d, t_logits, t_values, t_indices))
    r = rows[c0:c1]
    return tuple(None if x is None else torch.index_select(x, 0, r, out=ws(f"rows{i}", (len(r), x.shape[1]), x.dtype))
                 for i, x in enumerate((s2d, t_logits, t_values, t_indices)))
