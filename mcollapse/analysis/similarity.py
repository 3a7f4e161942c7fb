"""Cross-modal cosine similarity of representations, per pair of items (pure numpy).

Items carry a pooled vector and a (variable) number of token vectors. A pair of items (i, j) is
compared either through their pooled vectors (`pooled`) or through the token x token cosine
matrix between them, reduced by `mean`, `median`, `max` or `min`. Over items, `all` pairing
averages every pair (i, j) -- the implicit-alignment work's number -- and `matched` only i = j.
"""

from __future__ import annotations

import numpy as np

TOKEN_REDUCTIONS = ("mean", "median", "max", "min")
POOLINGS = ("pooled", *TOKEN_REDUCTIONS)
PAIRINGS = ("all", "matched")
EPS = 1e-12


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, m) cosines between the rows of a (n, d) and b (m, d)."""
    return unit(a) @ unit(b).T


def _padded(tokens: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(t) for t in tokens)
    dim = tokens[0].shape[1]
    out = np.zeros((len(tokens), width, dim))
    mask = np.zeros((len(tokens), width), dtype=bool)
    for n, t in enumerate(tokens):
        out[n, : len(t)] = unit(t)
        mask[n, : len(t)] = True
    return out, mask


def token_pair_matrices(a_tokens: list[np.ndarray], b_tokens: list[np.ndarray],
                        reductions=TOKEN_REDUCTIONS, chunk: int = 8) -> dict[str, np.ndarray]:
    """For every pair (i, j): the token x token cosine matrix of a_tokens[i] and b_tokens[j],
    reduced over both token axes; {reduction: (Na, Nb)}. Each item needs at least one token."""
    a, a_mask = _padded(a_tokens)
    b, b_mask = _padded(b_tokens)
    out = {r: np.empty((len(a_tokens), len(b_tokens))) for r in reductions}
    for start in range(0, len(a), chunk):
        cos = np.einsum("ind,jmd->ijnm", a[start: start + chunk], b)  # (c, Nb, na, nb)
        valid = a_mask[start: start + chunk, None, :, None] & b_mask[None, :, None, :]
        flat_cos = cos.reshape(cos.shape[0], cos.shape[1], -1)
        flat_valid = valid.reshape(flat_cos.shape)
        for r in reductions:
            if r == "mean":
                value = (flat_cos * flat_valid).sum(-1) / flat_valid.sum(-1)
            elif r == "max":
                value = np.where(flat_valid, flat_cos, -np.inf).max(-1)
            elif r == "min":
                value = np.where(flat_valid, flat_cos, np.inf).min(-1)
            elif r == "median":
                value = np.nanmedian(np.where(flat_valid, flat_cos, np.nan), axis=-1)
            else:
                raise ValueError(f"unknown token reduction '{r}' ({', '.join(TOKEN_REDUCTIONS)})")
            out[r][start: start + chunk] = value
    return out


def pair_summary(matrix: np.ndarray, pairing: str, same_items: bool = False) -> tuple[float, float, int]:
    """(mean, std, number of pairs) of a pair matrix: `all` every pair (without i = i when the two
    sides are the same items, whose cosine is trivially 1), `matched` the diagonal."""
    matrix = np.asarray(matrix)
    if pairing == "matched":
        values = np.diagonal(matrix)
    elif pairing == "all":
        values = matrix[~np.eye(*matrix.shape, dtype=bool)] if same_items else matrix.ravel()
    else:
        raise ValueError(f"unknown pairing '{pairing}' ({', '.join(PAIRINGS)})")
    if values.size == 0:
        return float("nan"), float("nan"), 0
    return float(values.mean()), float(values.std()), int(values.size)


def halves(n: int) -> tuple[slice, slice]:
    """First and second half of n items (equal sizes; an odd last item is left out)."""
    h = n // 2
    return slice(0, h), slice(h, 2 * h)


def matched_step_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of the same item (or token) in two settings, e.g. layer l and l+k."""
    return np.sum(unit(a) * unit(b), axis=-1)


def token_step_cosine(a_tokens: list[np.ndarray], b_tokens: list[np.ndarray], reduction: str) -> np.ndarray:
    """Per item: the diagonal of its token x token cosine matrix between two layers (each token
    against itself), reduced over tokens."""
    reducer = {"mean": np.mean, "median": np.median, "max": np.max, "min": np.min}[reduction]
    return np.array([reducer(matched_step_cosine(a, b)) for a, b in zip(a_tokens, b_tokens)])


def norms(pooled: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
    """Mean norm of the pooled vectors, and the median and max norm over all tokens."""
    token_norms = np.linalg.norm(np.asarray(tokens, dtype=np.float64), axis=-1)
    return {"pooled_norm": float(np.linalg.norm(pooled, axis=-1).mean()),
            "token_norm_median": float(np.median(token_norms)), "token_norm_max": float(token_norms.max())}


def uniform_noise_like(tokens: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Uniform noise of each array's shape and scale: U(-1, 1) per coordinate, every token rescaled to
    the norm of the token it replaces (zero mean, so it shares no direction with anything)."""
    out = []
    for t in tokens:
        t = np.asarray(t, dtype=np.float64)
        noise = rng.uniform(-1.0, 1.0, size=t.shape)
        scale = np.linalg.norm(t, axis=-1, keepdims=True) / np.maximum(np.linalg.norm(noise, axis=-1, keepdims=True),
                                                                       EPS)
        out.append(noise * scale)
    return out


def ima_curve(p_layer0: np.ndarray, t_by_layer: np.ndarray, pairing: str = "all") -> np.ndarray:
    """IMA(l) = cos(P at layer 0, T at layer l) for every l: p_layer0 (N, d), t_by_layer (N, L+1, d)."""
    return np.array([pair_summary(cosine_matrix(p_layer0, t_by_layer[:, layer]), pairing)[0]
                     for layer in range(t_by_layer.shape[1])])
