"""Generalized mutual information of the decoder (paper Eq. 3) and the Theorem 2 bound (Eq. 4).

Eq. 3 defines, with l(c, z, y) = log q(y | z, c) the decoder's log-score,

    GMI_P(q) = E_{(C,Z,Y)~P} [ l(C, Z, Y) - log E_{Z'} exp l(C, Z', Y) ].

The paper writes Z' ~ P(. | C, Y). Read literally that makes GMI <= 0 for every decoder (for a
fixed (c, y) the first term is E[l(Z)] and the second log E[exp l(Z)] over the same law, and
Jensen's inequality orders them), so it cannot be the rate of Theorem 1. The mismatched-decoding
GMI it cites (Merhav et al. 1994; Scarlett et al. 2020) draws the competitor independently of the
message, Z' ~ P(Z | C): the true target y is held fixed and scored against representations of
*other* samples that share the prompt. That is what is estimated here:

    per sample i:  l_i = l(c, z_i, y_i),  alternatives  l_ij = l(c, z'_j, y_i), j = 1..m,

with z'_j i.i.d. from the same prompt's other samples. Two estimators of the inner expectation:

* ``contrastive`` (default): g_i = s l_i - log( (exp(s l_i) + sum_j exp(s l_ij)) / (m + 1) ),
  the InfoNCE form with the true representation among the m + 1 candidates. Each term lies in
  (-inf, log(m + 1)], so a decoder that ignores z gives exactly 0 and a perfect one log(m + 1).
  It converges to Eq. 3 as m grows; for finite m it is pulled toward 0 (an underestimate while
  the GMI is positive, and it can overestimate a negative GMI), so compare conditions at equal m.
* ``plugin``: g_i = s l_i - log( sum_j exp(s l_ij) / m ), the Monte Carlo average over the
  alternatives alone: not capped, biased upward for small m (Jensen on the log of a mean).

s is the tilt of the GMI's sup over s >= 0; Eq. 3 is s = 1. With s = 1 the GMI can be negative
for a badly mismatched decoder (s = 0 always gives 0). Scores may be floored at log(eta), the
paper's clipping of l at eta = 1/|V|. The confidence interval is a percentile bootstrap over
samples, which treats the per-sample terms as independent; when alternatives are shared between
samples (all rows of one score matrix) that ignores their weak dependence.

Theorem 2: |GMI_PM(q) - GMI_PT(q)| <= (1 + exp(L_log D)) L_log E_{(C,Y)}[W1(P_M(Z|C,Y), P_T(Z|C,Y))].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp

ESTIMATORS = ("contrastive", "plugin")
_BOOT_CHUNK = 256  # bootstrap resamples drawn at once; bounds memory at 256 * n indices


@dataclass(frozen=True)
class GMIResult:
    """A GMI estimate in nats with its bootstrap interval and the per-sample terms behind it."""

    gmi: float
    ci_low: float
    ci_high: float
    se: float
    n: int
    n_alternatives: int
    estimator: str
    s: float
    cap: float  # largest value the estimator can take: log(m + 1) for contrastive, inf for plugin
    ci: float
    per_sample: np.ndarray = field(repr=False, compare=False)

    def as_dict(self) -> dict[str, float | int | str]:
        """Scalar fields for results tables (per-sample terms left out)."""
        return {
            "gmi": self.gmi,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "se": self.se,
            "n": self.n,
            "n_alternatives": self.n_alternatives,
            "estimator": self.estimator,
            "s": self.s,
            "cap": self.cap,
            "ci": self.ci,
        }


@dataclass(frozen=True)
class GMIGap:
    """GMI_text - GMI_modal, the information the modal input loses, with a bootstrap interval."""

    gap: float
    ci_low: float
    ci_high: float
    paired: bool
    text_gmi: float
    modal_gmi: float
    ci: float

    def as_dict(self) -> dict[str, float | bool]:
        return {
            "gap": self.gap,
            "abs_gap": abs(self.gap),
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "paired": self.paired,
            "text_gmi": self.text_gmi,
            "modal_gmi": self.modal_gmi,
            "ci": self.ci,
        }


def split_score_matrix(score_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Split S[i, j] = l(c, z_j, y_i) into true scores (diagonal) and the others as alternatives.

    This is the all-pairs layout of one prompt's samples: row i scores sample i's target against
    every sample's representation, so each sample gets the other n - 1 as alternatives.
    """
    S = np.asarray(score_matrix, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1] or S.shape[0] < 2:
        raise ValueError(f"score matrix must be square with at least 2 rows, got shape {S.shape}")
    n = S.shape[0]
    off = ~np.eye(n, dtype=bool)
    return np.diag(S).copy(), S[off].reshape(n, n - 1)


def _bootstrap_means(values: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    n = len(values)
    out = np.empty(n_boot)
    for start in range(0, n_boot, _BOOT_CHUNK):
        size = min(_BOOT_CHUNK, n_boot - start)
        out[start : start + size] = values[rng.integers(n, size=(size, n))].mean(1)
    return out


def _interval(boot: np.ndarray, ci: float) -> tuple[float, float]:
    tail = (1.0 - ci) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail])
    return float(low), float(high)


def _check_ci(ci: float, n_boot: int) -> None:
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")


def gmi_from_scores(
    true_scores,
    alt_scores,
    *,
    estimator: str = "contrastive",
    s: float = 1.0,
    log_floor: float | None = None,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> GMIResult:
    """Estimate Eq. 3 from log-scores of the true pairing and of m alternatives per sample.

    ``true_scores[i]`` = log q(y_i | z_i, c); ``alt_scores[i, j]`` = log q(y_i | z'_j, c), the same
    target and prompt with the representation of another sample of that prompt. ``log_floor``
    clips every score from below (the paper's l >= log(1/|V|)); scores must be finite after it.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not (math.isfinite(s) and s >= 0):
        raise ValueError(f"s must be a finite non-negative tilt, got {s}")
    _check_ci(ci, n_boot)
    true = np.asarray(true_scores, dtype=np.float64)
    alt = np.asarray(alt_scores, dtype=np.float64)
    if true.ndim != 1 or true.size == 0:
        raise ValueError(f"true_scores must be a non-empty 1-D array, got shape {true.shape}")
    if alt.ndim != 2 or alt.shape[0] != true.size or alt.shape[1] < 1:
        raise ValueError(f"alt_scores must have shape ({true.size}, m >= 1), got {alt.shape}")
    if log_floor is not None:
        true = np.maximum(true, log_floor)
        alt = np.maximum(alt, log_floor)
    if not (np.all(np.isfinite(true)) and np.all(np.isfinite(alt))):
        raise ValueError("scores must be finite (set log_floor to clip log-probabilities of 0)")

    n, m = alt.shape
    t, a = s * true, s * alt
    if estimator == "contrastive":
        pool = np.concatenate([t[:, None], a], axis=1)
        terms = t - (logsumexp(pool, axis=1) - math.log(m + 1))
        cap = math.log(m + 1)
    else:
        terms = t - (logsumexp(a, axis=1) - math.log(m))
        cap = math.inf

    estimate = float(terms.mean())
    if n > 1:
        se = float(terms.std(ddof=1) / math.sqrt(n))
        low, high = _interval(_bootstrap_means(terms, n_boot, np.random.default_rng(seed)), ci)
    else:
        se, low, high = math.nan, math.nan, math.nan
    return GMIResult(
        gmi=estimate,
        ci_low=low,
        ci_high=high,
        se=se,
        n=n,
        n_alternatives=m,
        estimator=estimator,
        s=float(s),
        cap=cap,
        ci=ci,
        per_sample=terms,
    )


def gmi_gap(
    modal: GMIResult,
    text: GMIResult,
    *,
    paired: bool = False,
    n_boot: int = 2000,
    ci: float = 0.95,
    seed: int = 0,
) -> GMIGap:
    """GMI_text - GMI_modal with a bootstrap interval: the left-hand side of Theorem 2, signed.

    Use ``paired=True`` when row i of both estimates is the same (c, y) item presented as text and
    as the modality (Assumption 1's shared prompts and targets): resampling items jointly removes
    their shared difficulty from the interval. Both estimates must use the same estimator and
    tilt, and for the contrastive one the same m, since its cap log(m + 1) would otherwise differ.
    """
    _check_ci(ci, n_boot)
    if modal.estimator != text.estimator or modal.s != text.s:
        raise ValueError("modal and text GMI must use the same estimator and s")
    if modal.estimator == "contrastive" and modal.n_alternatives != text.n_alternatives:
        raise ValueError(
            "contrastive GMI estimates with different numbers of alternatives "
            f"({modal.n_alternatives} vs {text.n_alternatives}) have different caps; use equal m"
        )
    rng = np.random.default_rng(seed)
    gap = text.gmi - modal.gmi
    if paired:
        if modal.n != text.n:
            raise ValueError(f"paired gap needs the same items on both sides, got n={modal.n} and n={text.n}")
        diffs = text.per_sample - modal.per_sample
        boot = _bootstrap_means(diffs, n_boot, rng) if modal.n > 1 else None
    elif modal.n > 1 and text.n > 1:
        boot = _bootstrap_means(text.per_sample, n_boot, rng) - _bootstrap_means(modal.per_sample, n_boot, rng)
    else:
        boot = None
    low, high = _interval(boot, ci) if boot is not None else (math.nan, math.nan)
    return GMIGap(
        gap=float(gap),
        ci_low=low,
        ci_high=high,
        paired=paired,
        text_gmi=text.gmi,
        modal_gmi=modal.gmi,
        ci=ci,
    )


def conditional_w1_to_points(modal, text) -> float:
    """E_y W1(P_M(Z | y), delta_{z_T(y)}) when the text z is a function of y: row i of ``modal`` is
    a modal point of y_i and row i of ``text`` is z_T(y_i), so each W1 to a point mass is the mean
    distance to it, and with one modal point per y the expectation is mean_i ||m_i - t_i||."""
    modal, text = np.asarray(modal, dtype=np.float64), np.asarray(text, dtype=np.float64)
    if modal.ndim != 2 or modal.shape != text.shape or len(modal) == 0:
        raise ValueError(f"modal and text must pair row by row, got shapes {modal.shape} and {text.shape}")
    return float(np.linalg.norm(modal - text, axis=1).mean())


@dataclass(frozen=True)
class Theorem2Bound:
    """Right-hand side of Eq. 4 and its parts.

    direct_term = L W1 bounds the change of the true-pair score (proof Step 1, Eq. 7);
    competition_term = exp(L D) L W1 bounds the change of the log-partition over alternatives
    (Step 2, Eq. 10); rhs is their sum (Step 3, Eq. 11). log_rhs stays finite when L D is too
    large for exp (the paper's ambient L D reaches ~150; float64 overflows past ~709).
    """

    rhs: float
    log_rhs: float
    prefactor: float
    direct_term: float
    competition_term: float
    lipschitz: float
    diameter: float
    w1: float

    def holds_for(self, gap: float) -> bool:
        """Whether a measured GMI difference satisfies the bound."""
        return abs(gap) <= self.rhs

    def as_dict(self) -> dict[str, float]:
        return {
            "rhs": self.rhs,
            "log_rhs": self.log_rhs,
            "prefactor": self.prefactor,
            "direct_term": self.direct_term,
            "competition_term": self.competition_term,
            "L_log": self.lipschitz,
            "D": self.diameter,
            "W1": self.w1,
            "L_x_D": self.lipschitz * self.diameter,
            "L_x_W1": self.lipschitz * self.w1,
        }


def theorem2_rhs(*, lipschitz: float, w1: float, diameter: float) -> Theorem2Bound:
    """(1 + exp(L_log D)) L_log E_{(C,Y)}[W1], the bound of Theorem 2 (Eq. 4) on |GMI_M - GMI_T|.

    lipschitz: L_log, a Lipschitz constant of z -> log q(y | z, c) valid for every (c, y) on the
        typical-state region (Assumption 2), e.g. a high quantile or the max of gradient norms.
    w1: E over (C, Y) of the Wasserstein-1 distance between the modal and text conditionals
        P_M(Z | C, Y) and P_T(Z | C, Y), in the same norm as the Lipschitz constant.
    diameter: D, the diameter of a region holding both laws' representations (Assumption 3), or
        by the support-restricted corollary of §A.3 the diameter D_S of any common support, for
        which D_eff is the participation-ratio estimate.
    """
    values = {"lipschitz": lipschitz, "w1": w1, "diameter": diameter}
    for name, value in values.items():
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite non-negative number, got {value}")
    L, W1, D = float(lipschitz), float(w1), float(diameter)
    exponent = L * D
    prefactor = math.inf if exponent > 709.0 else 1.0 + math.exp(exponent)
    direct = L * W1
    if direct == 0.0:
        competition, rhs, log_rhs = 0.0, 0.0, -math.inf
    else:
        competition = math.inf if exponent > 709.0 else math.exp(exponent) * direct
        rhs = prefactor * direct
        log_rhs = float(np.logaddexp(0.0, exponent)) + math.log(L) + math.log(W1)
    return Theorem2Bound(
        rhs=rhs,
        log_rhs=log_rhs,
        prefactor=prefactor,
        direct_term=direct,
        competition_term=competition,
        lipschitz=L,
        diameter=D,
        w1=W1,
    )
