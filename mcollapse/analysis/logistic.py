"""Batched L2-regularised logistic regression, solved by an L-BFGS that runs many problems at once.

The objective is scikit-learn's ``LogisticRegression(C=C)`` (lbfgs solver, scikit-learn >= 1.8)::

    mean_i  -log softmax(W x_i + b)[y_i]  +  ||W||^2 / (2 * C * n_train)

with the intercept unpenalised, the symmetric multinomial model for more than two classes and
the binomial one (class 0 pinned at logit 0) for two. Each problem keeps its own curvature
history, step length and stopping state, so batching changes the speed and never the result.
The solve runs in float32 as far as float32 carries and is finished and verified in float64, so
`converged` always refers to the exact objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_HISTORY_SIZE = 10           # curvature pairs kept per problem (scipy's L-BFGS-B default)
_MAX_LINE_SEARCH_STEPS = 40  # backtracking steps before a float64 problem is declared stuck
_ROUGH_LINE_SEARCH_STEPS = 10  # in float32, hand a stuck problem to float64 sooner
_ROUGH_PATIENCE = 20         # float32 steps without 10 % gradient progress before handing over
_ARMIJO_C1 = 1e-4            # sufficient-decrease constant of the line search
DTYPE = torch.float64


@dataclass
class LogisticFit:
    """A batch of fitted logistic regressions; index 0 of every tensor is the problem."""

    weights: torch.Tensor        # (B, d, K); the pinned class-0 column of binary problems is 0
    intercepts: torch.Tensor     # (B, K)
    class_present: torch.Tensor  # (B, K) classes seen in training; others are never predicted
    converged: torch.Tensor      # (B,) max-abs gradient reached tol
    n_iter: torch.Tensor         # (B,) accepted L-BFGS steps
    grad_max: torch.Tensor       # (B,) final max-abs gradient of the objective

    def decision_function(self, X: torch.Tensor) -> torch.Tensor:
        """Logits (B, n, K); absent classes get -inf so argmax and softmax ignore them."""
        offset = _absent_class_offset(self.class_present, self.weights.dtype)
        X = X.to(self.weights.dtype)
        return torch.baddbmm((self.intercepts + offset)[:, None, :], X, self.weights)

    def predict_proba(self, X: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.decision_function(X), dim=-1)

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        return self.decision_function(X).argmax(dim=-1)


def fit_logistic_regression(
    X: torch.Tensor,
    y: torch.Tensor,
    n_classes: int,
    C: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> LogisticFit:
    """Fit B independent problems X[b] (n, d) -> y[b] (n,) with scikit-learn's objective.

    X is used as given (standardize it first). Classes missing from a problem's labels get no
    weights and are never predicted, as when scikit-learn only sees the classes present; when
    exactly two are present the lower one is pinned at logit 0, as in its binomial model.
    """
    if X.ndim != 3 or y.shape != X.shape[:2]:
        raise ValueError(
            f"expected X (B, n, d) and y (B, n), got {tuple(X.shape)} and {tuple(y.shape)}"
        )
    n_problems, n_samples, n_features = X.shape
    X = X.to(DTYPE)
    y = y.to(device=X.device, dtype=torch.long)
    device = X.device
    present = torch.nn.functional.one_hot(y, n_classes).sum(dim=1)[:, None, :] > 0
    objective = StackedLogisticObjective(
        X=X,
        y=y,
        sample_weight=torch.full((1, n_samples), 1.0 / n_samples, dtype=DTYPE, device=device),
        shift=torch.zeros(n_problems, 1, n_features, dtype=DTYPE, device=device),
        scale=torch.ones(n_problems, 1, n_features, dtype=DTYPE, device=device),
        l2_strength=torch.full((n_problems, 1), 1.0 / (C * n_samples), dtype=DTYPE, device=device),
        class_present=present,
    )
    theta, converged, n_iter, grad_max = minimise(objective, max_iter, tol)
    params = theta.view(n_problems, n_features + 1, n_classes)
    intercepts = _centred_intercepts(params[:, n_features], objective.free_columns[:, 0])
    return LogisticFit(
        params[:, :n_features].contiguous(), intercepts, present[:, 0], converged, n_iter, grad_max
    )


def _absent_class_offset(class_present: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=class_present.device)
    return torch.where(class_present, zero, torch.full_like(zero, -math.inf))


def _free_columns(class_present: torch.Tensor) -> torch.Tensor:
    """Class columns with trainable parameters: present classes, minus the binomial's pinned one."""
    free = class_present.clone()
    binary = class_present.sum(dim=-1) == 2
    lower_present = class_present.to(torch.int8).argmax(dim=-1)
    pinned = torch.nn.functional.one_hot(lower_present, class_present.shape[-1]).bool()
    return free & ~(pinned & binary[..., None])


def _centred_intercepts(intercepts: torch.Tensor, free_columns: torch.Tensor) -> torch.Tensor:
    """Shift multinomial intercepts to mean zero over the free classes, as scikit-learn's are.

    The multinomial intercept is defined only up to a shared shift (scikit-learn's solver starts
    at zero and never adds one); binomial intercepts are identified and returned unchanged.
    """
    free = free_columns.to(intercepts.dtype)
    multinomial = (free_columns.sum(dim=-1) > 1)[..., None]
    centre = (intercepts * free).sum(dim=-1, keepdim=True) / free.sum(dim=-1, keepdim=True)
    return torch.where(multinomial, (intercepts - centre) * free, intercepts)


class StackedLogisticObjective:
    """Logistic objectives of G feature matrices x S sample weightings; problem p = g * S + s.

    Problem (g, s) is  sum_i w_si * CE(y_gi, softmax(((X_gi - shift_gs) / scale_gs) W + b))
    + l2_gs / 2 * ||W||^2. Its parameters are flattened from a (d + 1, K) view: rows 0..d-1 are
    weights, row d the intercepts. Gradients of pinned or absent class columns are zeroed, so
    L-BFGS never moves them off zero.
    """

    def __init__(self, X, y, sample_weight, shift, scale, l2_strength, class_present):
        self.X, self.y = X, y                      # (G, n, d), (G, n)
        self.sample_weight = sample_weight         # (S, n)
        self.shift, self.scale = shift, scale      # (G, S, d)
        self.l2_strength = l2_strength             # (G, S)
        self.class_present = class_present         # (G, S, K)
        self.free_columns = _free_columns(class_present)
        self.logit_offset = _absent_class_offset(class_present, X.dtype)
        self.onehot = torch.nn.functional.one_hot(y, class_present.shape[-1]).to(X.dtype)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        n_groups, n_samples, n_features = self.X.shape
        return n_groups, self.sample_weight.shape[0], n_samples, n_features, self.onehot.shape[-1]

    @property
    def n_problems(self) -> int:
        return self.X.shape[0] * self.sample_weight.shape[0]

    def to(self, dtype: torch.dtype) -> StackedLogisticObjective:
        return StackedLogisticObjective(
            X=self.X.to(dtype), y=self.y, sample_weight=self.sample_weight.to(dtype),
            shift=self.shift.to(dtype), scale=self.scale.to(dtype),
            l2_strength=self.l2_strength.to(dtype), class_present=self.class_present,
        )

    def initial_parameters(self) -> torch.Tensor:
        n_groups, n_seeds, _, n_features, n_classes = self.shape
        n_params = (n_features + 1) * n_classes
        return self.X.new_zeros(n_groups * n_seeds, n_params)

    def _split(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_groups, n_seeds, _, n_features, n_classes = self.shape
        params = theta.view(n_groups, n_seeds, n_features + 1, n_classes)
        return params[:, :, :n_features], params[:, :, n_features]

    def logits(self, theta: torch.Tensor) -> torch.Tensor:
        """Logits (G, n, S, K) of every row under every problem's parameters."""
        weights, intercepts = self._split(theta)
        return self._logits(weights, intercepts)

    def _logits(self, weights: torch.Tensor, intercepts: torch.Tensor) -> torch.Tensor:
        n_groups, n_seeds, n_samples, n_features, n_classes = self.shape
        raw_weights = weights / self.scale[..., None]
        raw_intercepts = (
            intercepts - torch.einsum("gsd,gsdk->gsk", self.shift, raw_weights) + self.logit_offset
        )
        stacked = raw_weights.permute(0, 2, 1, 3).reshape(n_groups, n_features, n_seeds * n_classes)
        logits = torch.bmm(self.X, stacked).view(n_groups, n_samples, n_seeds, n_classes)
        return logits + raw_intercepts[:, None]

    def __call__(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_groups, n_seeds, n_samples, n_features, n_classes = self.shape
        weights, intercepts = self._split(theta)
        log_probs = torch.log_softmax(self._logits(weights, intercepts), dim=-1)
        row_weight = self.sample_weight.T  # (n, S)

        picked = log_probs.gather(3, self.y[:, :, None, None].expand(-1, -1, n_seeds, 1))[..., 0]
        # Rows outside a split may belong to a class it never saw (log-prob -inf, weight 0).
        picked = torch.where(row_weight > 0, picked, torch.zeros_like(picked))
        nll = -(picked * row_weight).sum(dim=1)

        residual = (log_probs.exp() - self.onehot[:, :, None, :]) * row_weight[None, :, :, None]
        column_sums = residual.sum(dim=1)  # (G, S, K)
        projected = torch.bmm(residual.view(n_groups, n_samples, -1).transpose(1, 2), self.X)
        projected = projected.view(n_groups, n_seeds, n_classes, n_features).transpose(2, 3)
        centred = projected - self.shift[..., None] * column_sums[:, :, None, :]
        grad_weights = centred / self.scale[..., None] + self.l2_strength[..., None, None] * weights
        grad = torch.cat([grad_weights, column_sums[:, :, None, :]], dim=2)
        grad = grad * self.free_columns[:, :, None, :]

        loss = nll + 0.5 * self.l2_strength * weights.square().sum(dim=(2, 3))
        return loss.reshape(-1), grad.reshape(n_groups * n_seeds, -1)

    def restrict(self, problems: torch.Tensor) -> tuple[StackedLogisticObjective, torch.Tensor]:
        """The smallest sub-batch (whole groups x whole seeds) covering the masked problems.

        Returns it with the indices of its problems in this batch; it may include unmasked ones.
        """
        n_groups, n_seeds = self.shape[:2]
        mask = problems.view(n_groups, n_seeds)
        groups = mask.any(dim=1).nonzero().squeeze(1)
        seeds = mask.any(dim=0).nonzero().squeeze(1)
        kept = (groups[:, None] * n_seeds + seeds[None, :]).reshape(-1)
        if len(groups) == n_groups and len(seeds) == n_seeds:
            return self, kept

        def pick(tensor):
            return tensor[groups][:, seeds]

        sub = StackedLogisticObjective(
            X=self.X if len(groups) == n_groups else self.X[groups],
            y=self.y[groups],
            sample_weight=self.sample_weight[seeds],
            shift=pick(self.shift),
            scale=pick(self.scale),
            l2_strength=pick(self.l2_strength),
            class_present=pick(self.class_present),
        )
        return sub, kept


def minimise(
    objective: StackedLogisticObjective, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve in float32 as far as float32 goes, then finish and verify in float64.

    float32 halves memory traffic and, on CPUs and most GPUs, runs the products several times
    faster; it usually gets to the gradient tolerance (or close) in the same number of steps. The
    float64 stage re-checks the tolerance on the exact objective, continues where needed and alone
    decides `converged`; both stages share the max_iter budget.
    """
    budget = torch.full(
        (objective.n_problems,), max_iter, dtype=torch.long, device=objective.X.device
    )
    rough = objective.to(torch.float32)
    theta, _, rough_iter, _, scale = _batched_lbfgs(
        rough, rough.initial_parameters(), budget, tol,
        line_search_steps=_ROUGH_LINE_SEARCH_STEPS, patience=_ROUGH_PATIENCE,
    )
    del rough
    exact = objective.X.dtype
    theta, converged, exact_iter, grad_max, _ = _batched_lbfgs(
        objective, theta.to(exact), budget - rough_iter, tol, initial_scale=scale.to(exact),
    )
    return theta, converged, rough_iter + exact_iter, grad_max


def _batched_lbfgs(
    objective: StackedLogisticObjective,
    theta: torch.Tensor,
    budget: torch.Tensor,
    tol: float,
    *,
    initial_scale: torch.Tensor | None = None,
    line_search_steps: int = _MAX_LINE_SEARCH_STEPS,
    patience: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise a batch of independent smooth convex objectives with L-BFGS, vectorised.

    Every problem has its own curvature pairs, initial Hessian scale and backtracking Armijo step
    (unit step first, quadratic interpolation). A problem stops when its max-abs gradient is at
    most tol (converged); otherwise, reported as not converged, after budget[p] steps, when
    line_search_steps backtracks find no lower objective, or (with patience) when the gradient
    has not shrunk by 10 % for that many steps. Stopped problems are frozen, and the batch shrinks
    to the groups and seeds that still have running problems.
    Returns theta, converged, n_iter, grad_max and the last inverse-Hessian scale per problem.
    """
    n_problems, n_params = theta.shape
    device, dtype = theta.device, theta.dtype
    eps = torch.finfo(dtype).eps
    loss, grad = objective(theta)
    # Slot-major curvature pairs, so each slot is one contiguous (P, n_params) block.
    steps_s = torch.zeros(_HISTORY_SIZE, n_problems, n_params, dtype=dtype, device=device)
    steps_y = torch.zeros_like(steps_s)
    inverse_sy = torch.zeros(_HISTORY_SIZE, n_problems, dtype=dtype, device=device)
    if initial_scale is None:
        # A first step of length 1 along -grad, as scipy's L-BFGS-B takes.
        initial_scale = 1.0 / grad.norm(dim=1).clamp_min(torch.finfo(dtype).tiny)
    hessian_scale = initial_scale.clone()
    n_stored, next_slot = 0, 0

    final_theta = theta.clone()
    final_converged = torch.zeros(n_problems, dtype=torch.bool, device=device)
    final_iter = torch.zeros(n_problems, dtype=torch.long, device=device)
    final_grad = torch.zeros(n_problems, dtype=dtype, device=device)
    final_scale = hessian_scale.clone()

    original = torch.arange(n_problems, device=device)
    frozen = torch.zeros(n_problems, dtype=torch.bool, device=device)
    stuck = torch.zeros_like(frozen)
    best_grad = torch.full((n_problems,), math.inf, dtype=dtype, device=device)
    best_at = torch.zeros(n_problems, dtype=torch.long, device=device)
    for iteration in range(int(budget.max()) + 1):
        grad_max = grad.abs().amax(dim=1)
        improved = grad_max < 0.9 * best_grad
        best_grad = torch.where(improved, grad_max, best_grad)
        best_at = torch.where(improved, iteration, best_at)
        if patience is not None:
            stuck = stuck | (iteration - best_at >= patience)
        converged = grad_max <= tol
        finishing = ~frozen & (converged | stuck | (iteration >= budget[original]))
        if finishing.any():
            done = finishing.nonzero().squeeze(1)
            where = original[done]
            final_theta[where], final_converged[where] = theta[done], converged[done]
            final_iter[where], final_grad[where] = iteration, grad_max[done]
            final_scale[where] = hessian_scale[done]
            frozen = frozen | finishing
            if frozen.all():
                break
            sub, kept = objective.restrict(~frozen)
            if len(kept) < len(frozen):
                objective, original, frozen = sub, original[kept], frozen[kept]
                theta, loss, grad = theta[kept], loss[kept], grad[kept]
                steps_s, steps_y = steps_s[:, kept], steps_y[:, kept]
                inverse_sy = inverse_sy[:, kept]
                hessian_scale = hessian_scale[kept]
                best_grad, best_at = best_grad[kept], best_at[kept]
        running = ~frozen

        order = [(next_slot - 1 - back) % _HISTORY_SIZE for back in range(n_stored)]
        direction = -_two_loop(grad, steps_s, steps_y, inverse_sy, hessian_scale, order)
        slope = (grad * direction).sum(dim=1)
        not_descent = running & ~(slope < 0)
        if not_descent.any():
            # Rounding broke the quasi-Newton direction: forget this problem's history.
            inverse_sy[:, not_descent] = 0.0
            direction[not_descent] = -hessian_scale[not_descent, None] * grad[not_descent]
        direction[frozen] = 0.0
        slope = (grad * direction).sum(dim=1)

        step = torch.ones_like(loss)
        new_theta = theta + direction
        new_loss, new_grad = objective(new_theta)
        # A loss change within rounding noise counts as no increase, so the last digits of the
        # gradient can still be driven down instead of the search stalling on float noise (in
        # float32, patience ends the stage once that stops paying off).
        noise = 4 * eps * loss.abs()
        accepted = frozen | (new_loss <= loss + _ARMIJO_C1 * step * slope + noise)
        for _ in range(line_search_steps):
            if accepted.all():
                break
            retry = ~accepted
            tried = step[retry]
            rise = new_loss[retry] - loss[retry] - slope[retry] * tried
            minimiser = -slope[retry] * tried.square() / (2 * rise)
            step[retry] = torch.where(
                torch.isfinite(minimiser), minimiser.clamp(0.1 * tried, 0.5 * tried), 0.5 * tried
            )
            new_theta[retry] = theta[retry] + step[retry][:, None] * direction[retry]
            sub, kept = objective.restrict(retry)
            sub_loss, sub_grad = sub(new_theta[kept])
            update = retry[kept]
            new_loss[kept[update]], new_grad[kept[update]] = sub_loss[update], sub_grad[update]
            accepted = accepted | (new_loss <= loss + _ARMIJO_C1 * step * slope + noise)
        stuck = ~accepted
        new_theta[stuck], new_loss[stuck], new_grad[stuck] = theta[stuck], loss[stuck], grad[stuck]

        s, y = new_theta - theta, new_grad - grad
        sy, yy, ss = (s * y).sum(dim=1), (y * y).sum(dim=1), (s * s).sum(dim=1)
        usable = running & (sy > 1e-10 * (ss * yy).sqrt())
        steps_s[next_slot] = s
        steps_y[next_slot] = y
        inverse_sy[next_slot] = torch.where(usable, 1.0 / sy, torch.zeros_like(sy))
        hessian_scale = torch.where(usable, sy / yy, hessian_scale)
        next_slot = (next_slot + 1) % _HISTORY_SIZE
        n_stored = min(n_stored + 1, _HISTORY_SIZE)
        theta, loss, grad = new_theta, new_loss, new_grad

    return final_theta, final_converged, final_iter, final_grad, final_scale


def _two_loop(
    grad: torch.Tensor,
    steps_s: torch.Tensor,
    steps_y: torch.Tensor,
    inverse_sy: torch.Tensor,
    hessian_scale: torch.Tensor,
    order: list[int],
) -> torch.Tensor:
    """Inverse-Hessian approximation times grad; pairs with inverse_sy = 0 drop out exactly."""
    q = grad.clone()
    alphas = []
    for slot in order:  # newest first
        alpha = inverse_sy[slot] * torch.linalg.vecdot(steps_s[slot], q)
        q.sub_(alpha[:, None] * steps_y[slot])
        alphas.append(alpha)
    r = q.mul_(hessian_scale[:, None])
    for slot, alpha in zip(reversed(order), reversed(alphas)):
        beta = inverse_sy[slot] * torch.linalg.vecdot(steps_y[slot], r)
        r.add_((alpha - beta)[:, None] * steps_s[slot])
    return r
