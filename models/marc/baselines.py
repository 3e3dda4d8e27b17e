"""Compression baselines at a given width d, and row-wise int8 quantisation on top of any of them.

Notation: N entities, D input width, d output width. Every baseline works on the per-dimension standardised
states (the same standardisation the MARC compressor applies), so the methods differ only in the projection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from llmfeat.reprs import SCALE_BYTES, dequantise_int8, quantise_int8

Projection = Callable[[np.ndarray], np.ndarray]  # (N, D) -> (N, d)


@dataclass(frozen=True)
class Standardiser:
    mean: np.ndarray  # (D,)
    std: np.ndarray  # (D,)

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardiser:
        return cls(x.mean(0), x.std(0) + 1e-6)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)


def pca(x_fit: np.ndarray, d: int) -> Projection:
    """Principal components of the standardised fit matrix (N, D); keeps the top d."""
    s = Standardiser.fit(x_fit)
    z = s(x_fit)
    _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
    w = vt[:d].T.astype(np.float32)  # (D, d)
    return lambda x: s(x) @ w


def random_projection(x_fit: np.ndarray, d: int, seed: int = 0) -> Projection:
    """Gaussian random projection (D, d) / sqrt(d) of the standardised states."""
    s = Standardiser.fit(x_fit)
    w = np.random.default_rng(seed).standard_normal((x_fit.shape[1], d)).astype(np.float32) / np.sqrt(d)
    return lambda x: s(x) @ w


def truncation(x_fit: np.ndarray, d: int) -> Projection:
    """The first d dimensions of the standardised states."""
    s = Standardiser.fit(x_fit)
    return lambda x: s(x)[:, :d]


def identity(x_fit: np.ndarray) -> Projection:
    """The uncompressed layer (standardised): the quality reference."""
    s = Standardiser.fit(x_fit)
    return s


BASELINES: dict[str, Callable[[np.ndarray, int], Projection]] = {
    "pca": pca,
    "random_projection": random_projection,
    "truncation": truncation,
}


def as_dtype(z: np.ndarray, dtype: str) -> np.ndarray:
    """What a consumer reads back after storing z as `dtype` (float32, float16 or int8 + scale)."""
    if dtype == "float32":
        return z.astype(np.float32)
    if dtype == "float16":
        return z.astype(np.float16).astype(np.float32)
    if dtype == "int8":
        return dequantise_int8(*quantise_int8(z))
    raise ValueError(f"unknown dtype {dtype!r}; expected float32, float16 or int8")


def bytes_per_vector(d: int, dtype: str) -> int:
    return {"float32": 4 * d, "float16": 2 * d, "int8": d + SCALE_BYTES}[dtype]
