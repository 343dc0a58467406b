"""Fusing probabilistic embeddings (docs/methods.md §3.11) and scoring them.

A set of K images (a template, or an image and its horizontal flip) with unit embeddings mu_k and variances
sigma2_k becomes one: weights w_k proportional to (1 / sigma2_k)^(1/T), normalised to sum 1;
mu_T = normalise(sum_k w_k mu_k), sigma2_T = sum_k w_k sigma2_k. A per-dimension sigma2 weighs every
dimension on its own. T -> infinity gives the plain mean, T -> 0 keeps the most certain image.
Pairs are compared by cosine or by the mutual likelihood score (MLS).
"""

from __future__ import annotations

import numpy as np
import torch

from evaluation.verification import l2_normalize
from losses.probface import mutual_likelihood_score


def fusion_weights(sigma2: np.ndarray, temperature: float = 1.0, axis: int = 0) -> np.ndarray:
    """w proportional to (1/sigma2)^(1/T) along ``axis``, summing to 1 (computed in log space)."""
    if temperature <= 0:
        raise ValueError(f"fusion temperature must be positive, got {temperature}")
    sigma2 = np.asarray(sigma2, dtype=np.float64)
    if np.any(~(sigma2 > 0)):
        raise ValueError("fusion needs positive, finite variances sigma2")
    logits = -np.log(sigma2) / temperature
    logits -= logits.max(axis=axis, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(axis=axis, keepdims=True)


def fuse(mu: np.ndarray, sigma2: np.ndarray, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Fuse along the first axis: ``mu`` (K, ..., D) unit vectors, ``sigma2`` (K, ..., 1) or (K, ..., D)
    -> (mu_T (..., D) unit, sigma2_T (..., 1 or D))."""
    mu, sigma2 = np.asarray(mu, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu.shape[:-1] != sigma2.shape[:-1] or sigma2.shape[-1] not in (1, mu.shape[-1]):
        raise ValueError(f"sigma2 of shape {sigma2.shape} does not fit embeddings of shape {mu.shape}")
    w = fusion_weights(sigma2, temperature, axis=0)
    mu_t = (w * mu).sum(0)
    mu_t = mu_t / np.maximum(np.linalg.norm(mu_t, axis=-1, keepdims=True), 1e-12)
    return mu_t.astype(np.float32), (w * sigma2).sum(0).astype(np.float32)


def fuse_templates(
    mu: np.ndarray, sigma2: np.ndarray, templates: np.ndarray, temperature: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fuse the images of each template id: ``mu`` (N, D), ``sigma2`` (N, S), ``templates`` (N,) ids ->
    (sorted unique ids, mu_T (M, D), sigma2_T (M, S))."""
    templates = np.asarray(templates)
    if len(templates) != len(mu) or len(mu) != len(sigma2):
        raise ValueError(f"{len(mu)} embeddings, {len(sigma2)} variances and {len(templates)} template ids")
    ids, inverse = np.unique(templates, return_inverse=True)
    out_mu = np.empty((len(ids), mu.shape[1]), dtype=np.float32)
    out_s = np.empty((len(ids), sigma2.shape[1]), dtype=np.float32)
    order = np.argsort(inverse, kind="stable")
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    for t, members in enumerate(np.split(order, bounds)):
        out_mu[t], out_s[t] = fuse(mu[members], sigma2[members], temperature)
    return ids, out_mu, out_s


def image_weights(sigma2: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(1 / sigma2)^(1/T) per image (N,), a per-dimension sigma2 counting by its mean, scaled so the largest
    is 1: the fusion weights before their normalisation within a template, for evaluators that pool
    weighted image features (``validation_ijb``)."""
    if temperature <= 0:
        raise ValueError(f"fusion temperature must be positive, got {temperature}")
    logits = -np.log(scalar_sigma2(sigma2)) / temperature
    return np.exp(logits - logits.max())


def scalar_sigma2(sigma2: np.ndarray) -> np.ndarray:
    """One variance per image (N,): the scalar sigma2, or the mean over dimensions of a per-dimension one."""
    return np.asarray(sigma2, dtype=np.float64).reshape(len(sigma2), -1).mean(1)


def cosine_scores(mu1: np.ndarray, mu2: np.ndarray) -> np.ndarray:
    return np.sum(l2_normalize(mu1) * l2_normalize(mu2), axis=1)


def mls_scores(mu1: np.ndarray, sigma2_1: np.ndarray, mu2: np.ndarray, sigma2_2: np.ndarray) -> np.ndarray:
    """Row-wise mutual likelihood scores (higher = more likely the same person) of the embeddings made unit,
    by ``losses.probface.mutual_likelihood_score`` in float64."""
    mu1, mu2 = l2_normalize(np.asarray(mu1, np.float64)), l2_normalize(np.asarray(mu2, np.float64))
    rows = [torch.from_numpy(np.asarray(a, dtype=np.float64)) for a in (mu1, mu2, sigma2_1, sigma2_2)]
    return mutual_likelihood_score(*rows).numpy()
