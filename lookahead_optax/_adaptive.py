r"""The paper's adaptive slow step: alpha from a local quadratic model at each sync.

On a quadratic :math:`L(x) = \tfrac12 x^\top A x - b^\top x` the best point on
the segment from the slow weights :math:`\phi` towards the fast weights
:math:`\theta_k` is :math:`\phi + \alpha^* d`, :math:`d = \theta_k - \phi`, with

.. math::
    \alpha^* = 1 - \frac{g_k^\top d}{d^\top A d}, \qquad g_k = \nabla L(\theta_k)

(set the derivative of :math:`L(\phi + \alpha d)` in :math:`\alpha` to zero).
:func:`adaptive_alpha` replaces :math:`A` by a diagonal estimate :math:`\hat A`
and clips the result to ``[alpha_min, 1]``.

The gradient given at the sync call is evaluated at :math:`\theta_{k-1}`, not
at :math:`\theta_k`: the sync call's own inner step is what produces
:math:`\theta_k`. We extrapolate with the same curvature model,
:math:`g_k \approx g + \hat A \odot u` (``u`` the inner update of the sync
call), which is exact on a quadratic with diagonal :math:`A = \hat A` and needs
no extra gradient evaluation.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array

_CURVATURE_NAMES = ("ema", "adam")


class AdaptiveAlphaState(NamedTuple):
    """State of an adaptive alpha, kept in ``LookaheadState.adaptive``.

    Attributes:
      grad_sq: With ``curvature="ema"``, the exponential moving average of the
        squared gradients (one params-sized buffer, float32 or wider); ``None``
        otherwise.
      count: Number of update calls, for the EMA's bias correction.
      alpha: The alpha chosen at the latest sync (1.0 before the first): log it.
    """

    grad_sq: optax.Params
    count: Array  # type: ignore[assignment]  # a field, as in optax's states
    alpha: Array


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _wide(x: Array) -> Array:
    """At least float32: the sums below must not be done in bf16."""
    with jax.numpy_dtype_promotion("standard"):  # picks the dtype only; the cast is explicit
        wide = jnp.promote_types(x.dtype, jnp.float32)
    return x.astype(wide)


def _adam_moments(inner_state: optax.OptState) -> list[Any]:
    """The states in ``inner_state`` with ``count`` and ``nu`` fields (Adam and its kin)."""
    found = []

    def visit(node):
        fields = getattr(node, "_fields", ())
        if "nu" in fields and "count" in fields:
            found.append(node)
            return True
        return False

    jax.tree.leaves(inner_state, is_leaf=visit)
    return found


def closed_form_alpha(
    grads: optax.Updates,
    inner_updates: optax.Updates,
    params: optax.Params,
    slow: optax.Params,
    curvature: optax.Params,
    alpha_min: float | Array,
) -> Array:
    r"""``clip(1 - g_k.d / (d.A d), alpha_min, 1)``, ``g_k = g + A u``, ``d = params + u - slow``.

    Args:
      grads: Gradients at the params before the sync call's inner step.
      inner_updates: The inner optimizer's update ``u`` of the sync call.
      params: The params before that step, :math:`\theta_{k-1}`.
      slow: The slow weights :math:`\phi`.
      curvature: A diagonal curvature, a pytree like params.
      alpha_min: Lower clip.

    Returns:
      A float32 (or wider) scalar. It is 1 where ``d.A d`` is not positive (no
      movement, or no curvature to fit a parabola to).

    Examples:
      >>> import jax.numpy as jnp
      >>> from lookahead_optax._adaptive import closed_form_alpha
      >>> # L = x^2 (A = 2), phi = 1, theta_{k-1} = -0.5, u = -0.25: theta_k = -0.75
      >>> a = closed_form_alpha(jnp.array(-1.0), jnp.array(-0.25), jnp.array(-0.5),
      ...                       jnp.array(1.0), jnp.array(2.0), 0.1)
      >>> # alpha = 4/7, and the new slow weight is 0, the minimum
      >>> print(f"{a:.4f} {1 + a * (-0.75 - 1.0):.4f}")
      0.5714 0.0000
    """

    def gradient_along_d(g, u, p, s, a):
        g, u, p, s, a = _wide(g), _wide(u), _wide(p), _wide(s), _wide(a)
        g_k = g + a * u  # exact on a quadratic with this diagonal curvature
        return jnp.sum(g_k * (p + u - s))

    def curvature_along_d(u, p, s, a):
        d = _wide(p) + _wide(u) - _wide(s)
        return jnp.sum(_wide(a) * d * d)

    numerator = sum(
        jax.tree.leaves(
            jax.tree.map(gradient_along_d, grads, inner_updates, params, slow, curvature)
        )
    )
    denominator = sum(
        jax.tree.leaves(jax.tree.map(curvature_along_d, inner_updates, params, slow, curvature))
    )
    positive = denominator > 0
    alpha = jnp.where(positive, 1.0 - numerator / jnp.where(positive, denominator, 1.0), 1.0)
    return jnp.clip(alpha, alpha_min, 1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class AdaptiveAlpha:
    """An adaptive slow step for :func:`lookahead_optax.lookahead`; see :func:`adaptive_alpha`."""

    alpha_min: float
    curvature: str | Callable[[optax.Params], optax.Params] | optax.Params
    decay: float
    b2: float

    def init(self, params: optax.Params, inner_state: optax.OptState) -> AdaptiveAlphaState:
        grad_sq = None
        if isinstance(self.curvature, str) and self.curvature == "ema":
            grad_sq = jax.tree.map(lambda p: jnp.zeros_like(_wide(p)), params)
        elif isinstance(self.curvature, str):  # "adam": fail now, not at the first sync
            self._adam_curvature(inner_state, params)
        return AdaptiveAlphaState(
            grad_sq=grad_sq, count=jnp.zeros([], jnp.int32), alpha=jnp.ones([], jnp.float32)
        )

    def _adam_curvature(self, inner_state: optax.OptState, params: optax.Params):
        moments = _adam_moments(inner_state)
        if len(moments) != 1:
            raise ValueError(
                'adaptive_alpha(curvature="adam") needs exactly one Adam-like state (with '
                f"count and nu) in the inner optimizer's state, found {len(moments)}; use "
                'curvature="ema" or pass the curvature'
            )
        (moment,) = moments
        nu_structure: Any = jax.tree.structure(moment.nu, is_leaf=_is_masked)
        if nu_structure != jax.tree.structure(params, is_leaf=_is_masked):
            raise ValueError(
                'adaptive_alpha(curvature="adam") needs an Adam state over all the params '
                f"lookahead sees; its nu has structure {nu_structure}"
            )
        correction = 1.0 - self.b2 ** moment.count.astype(jnp.float32)
        return jax.tree.map(lambda v: _wide(v) / correction, moment.nu)

    def step(
        self,
        sync: Array,
        grads: optax.Updates,
        inner_updates: optax.Updates,
        params: optax.Params,
        slow: optax.Params,
        inner_state: optax.OptState,
        state: AdaptiveAlphaState,
    ) -> tuple[Array, AdaptiveAlphaState]:
        """This call's alpha (used only when ``sync``) and the next state.

        ``inner_state`` is the inner optimizer's state after this call's step.
        """
        count = optax.safe_increment(state.count)
        grad_sq = state.grad_sq
        if grad_sq is not None:
            grad_sq = jax.tree.map(
                lambda v, g: self.decay * v + (1.0 - self.decay) * jnp.square(_wide(g)),
                grad_sq,
                grads,
            )

        def curvature():
            if callable(self.curvature):
                return self.curvature(params)
            if isinstance(self.curvature, str) and self.curvature == "adam":
                return self._adam_curvature(inner_state, params)
            if isinstance(self.curvature, str):  # "ema", bias-corrected like Adam's
                correction = 1.0 - self.decay ** count.astype(jnp.float32)
                return jax.tree.map(lambda v: v / correction, grad_sq)
            return self.curvature

        def fit():
            return closed_form_alpha(
                grads, inner_updates, params, slow, curvature(), self.alpha_min
            ).astype(jnp.float32)

        # The reductions run on sync calls only.
        alpha = jax.lax.cond(sync, fit, lambda: state.alpha)
        return alpha, AdaptiveAlphaState(grad_sq=grad_sq, count=count, alpha=alpha)


def adaptive_alpha(
    alpha_min: float = 0.1,
    *,
    curvature: str | Callable[[optax.Params], optax.Params] | optax.Params = "ema",
    decay: float = 0.99,
    b2: float = 0.999,
) -> AdaptiveAlpha:
    r"""The paper's adaptive slow step, for ``lookahead(..., alpha=adaptive_alpha())``.

    At every sync, with :math:`d = \theta_k - \phi` and a diagonal curvature
    estimate :math:`\hat A`,

    .. math::
        \alpha = \mathrm{clip}\Big(1 - \frac{g_k^\top d}{d^\top \hat A d},
        \ \alpha_{\min},\ 1\Big), \qquad g_k = g + \hat A \odot u,

    the minimiser of the quadratic model along the segment from :math:`\phi`
    to :math:`\theta_k`. ``g`` is the gradient given to the sync call (taken at
    :math:`\theta_{k-1}`) and ``u`` that call's inner update; :math:`g + \hat A u`
    is the model's gradient at :math:`\theta_k`, exact on a quadratic whose
    diagonal curvature is :math:`\hat A`. When lookahead sits inside
    ``optax.chain``, ``g`` is what reaches it (e.g. clipped gradients).

    Curvature estimates:

    - ``"ema"`` (default): a bias-corrected EMA of the squared gradients (the
      empirical Fisher diagonal, as in the paper), kept in the state: one extra
      params-sized float32 buffer and one multiply-add per element per step.
    - ``"adam"``: the inner Adam's bias-corrected second moment
      ``nu / (1 - b2**count)``, found in the inner state: no extra memory.
      ``b2`` must be the inner Adam's.
    - a pytree like params (a known diagonal curvature), or a callable
      ``curvature(params) -> pytree`` evaluated at the params given to the sync
      call.

    Squared minibatch gradients estimate the Fisher, not the Hessian, and their
    scale depends on the batch size and the gradient noise: an estimate that
    is too small pushes alpha to the clip bounds. In our measurements (README)
    it did not reliably beat a fixed alpha of 0.5.

    Args:
      alpha_min: Lower clip, in (0, 1].
      curvature: ``"ema"``, ``"adam"``, a pytree, or a callable of params.
      decay: EMA decay for ``curvature="ema"``, in [0, 1).
      b2: The inner Adam's ``b2``, for ``curvature="adam"``'s bias correction.

    Returns:
      An :class:`AdaptiveAlpha` to pass as ``alpha``. The alpha chosen at the
      latest sync is in ``opt_state.adaptive.alpha``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import lookahead_optax as lo
      >>> a = jnp.array([1.0, 10.0])  # L = 0.5 * sum(a * w**2)
      >>> tx = lo.lookahead(optax.sgd(0.19), k=3, alpha=lo.adaptive_alpha(curvature=a))
      >>> params = jnp.array([1.0, 1.0])
      >>> opt_state = tx.init(params)
      >>> for _ in range(3):  # theta_3 = (0.81**3, (-0.9)**3) = (0.531, -0.729)
      ...     updates, opt_state = tx.update(a * params, opt_state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> # the exact line search along d = theta_3 - phi: 1 - 12.3554 / 30.1144
      >>> print(f"{opt_state.adaptive.alpha:.4f}")
      0.5897
    """
    if (
        not isinstance(alpha_min, numbers.Real)
        or isinstance(alpha_min, (bool, np.bool_))
        or not 0.0 < alpha_min <= 1.0
    ):
        raise ValueError(f"alpha_min must be a float in (0, 1], got {alpha_min!r}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be a float in [0, 1), got {decay!r}")
    if not 0.0 <= b2 < 1.0:
        raise ValueError(f"b2 must be a float in [0, 1), got {b2!r}")
    if isinstance(curvature, str) and curvature not in _CURVATURE_NAMES:
        raise ValueError(
            f"curvature must be one of {_CURVATURE_NAMES}, a pytree like params or a callable "
            f"of params, got {curvature!r}"
        )
    return AdaptiveAlpha(alpha_min=float(alpha_min), curvature=curvature, decay=decay, b2=b2)
