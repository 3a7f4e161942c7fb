"""Logit-lens statistics on log-probabilities over the vocabulary (pure torch).

Rows of `logp` are log-distributions over V tokens (natural log). Entropy is -sum p ln p (nats),
KL(p||q) = sum p (ln p - ln q); a distribution pooled over tokens or items is the mean of their
probabilities (a mixture), not the softmax of a mean logit.
"""

from __future__ import annotations

from collections import Counter

import torch


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double() if logits.dtype == torch.float16 else logits, dim=-1)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """-sum p ln p over the last axis (0 log 0 = 0)."""
    p = logp.exp()
    return -(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum(-1)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis, row by row (0 where p is 0)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def mixture(logp: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Log of the mean probability along `dim` (the pooled distribution of several rows)."""
    return torch.logsumexp(logp, dim=dim) - torch.log(torch.tensor(float(logp.shape[dim]), dtype=logp.dtype))


def top_ids(logp: torch.Tensor, k: int) -> torch.Tensor:
    """The k most probable token ids of each row (rows x k)."""
    return torch.topk(logp, k, dim=-1).indices


def count_ids(ids: torch.Tensor, counter: Counter | None = None) -> Counter:
    counter = Counter() if counter is None else counter
    counter.update(int(i) for i in ids.flatten().tolist())
    return counter
