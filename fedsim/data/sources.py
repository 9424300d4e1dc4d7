"""Offline data sources: scikit-learn digits, FedProx Synthetic(α, β), a Gaussian mixture,
and the federated quadratic task. Each is seeded from (seed, source name) only."""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch

from ..config import Ge, Gt, Range
from ..registry import DATA_SOURCES
from ..rng import numpy_rng
from .base import SourceContext, SourceData


def split_train_test(n: int, test_fraction: float, rng: np.random.Generator, labels: np.ndarray | None = None):
    """Returns (train_idx, test_idx): a seeded split, stratified by label when labels are given."""
    if test_fraction <= 0:
        return np.arange(n), np.arange(0)
    if labels is None:
        perm = rng.permutation(n)
        k = int(round(n * test_fraction))
        return np.sort(perm[k:]), np.sort(perm[:k])
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * test_fraction))
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@DATA_SOURCES.register("digits")
def digits(ctx: SourceContext) -> SourceData:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes), scaled to [0, 1].

    Inputs are shaped [1, 8, 8]; a seeded, class-stratified `data.test_fraction` is the test set.
    """
    images, target = digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(target, dtype=torch.int64)
    tr, te = split_train_test(len(y), ctx.test_fraction, numpy_rng(ctx.seed, "digits/split"), target)
    return SourceData(x[tr], y[tr], x[te], y[te], num_classes=10)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Returns scikit-learn's digits as (images [1797, 8, 8] float64, targets [1797] int64),
    the arrays of `sklearn.datasets.load_digits`, read from the file scikit-learn ships
    without importing it (its import takes ~1 s, a fifth of the quickstart); scikit-learn's
    own loader where the file is not found."""
    spec = importlib.util.find_spec("sklearn")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(folders[0]) / "datasets" / "data" / "digits.csv.gz" if folders else None
    if path is None or not path.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target.astype(np.int64)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


@DATA_SOURCES.register("gaussian_mixture")
def gaussian_mixture(
    ctx: SourceContext,
    num_samples: Annotated[int, Ge(2)] = 6400,
    dim: Annotated[int, Ge(1)] = 60,
    num_classes: Annotated[int, Ge(2)] = 10,
    separation: Annotated[float, Gt(0)] = 1.0,
) -> SourceData:
    """Isotropic Gaussian classes: x = μ_y + N(0, I), class means μ_c ~ N(0, separation²·I).

    Args:
        num_samples: Total samples (train + test).
        dim: Feature dimension.
        num_classes: Number of classes.
        separation: Standard deviation of the class means (larger = easier).
    """
    rng = numpy_rng(ctx.seed, "gaussian_mixture")
    means = rng.normal(0.0, separation, size=(num_classes, dim))
    y = rng.integers(0, num_classes, size=num_samples)
    x = means[y] + rng.normal(size=(num_samples, dim))
    tr, te = split_train_test(num_samples, ctx.test_fraction, numpy_rng(ctx.seed, "gaussian_mixture/split"), y)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)
    return SourceData(xt[tr], yt[tr], xt[te], yt[te], num_classes=num_classes)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@DATA_SOURCES.register("synthetic")
def synthetic(
    ctx: SourceContext,
    alpha: Annotated[float, Ge(0)] = 1.0,
    beta: Annotated[float, Ge(0)] = 1.0,
    iid: bool = False,
    dim: Annotated[int, Ge(1)] = 60,
    num_classes: Annotated[int, Ge(2)] = 10,
    max_samples_per_user: Annotated[Optional[int], Ge(2)] = None,
) -> SourceData:
    """FedProx Synthetic(α, β) (Li et al., MLSys 2020), the generator of litian96/FedProx.

    Per user k: n_k = ⌊LogNormal(4, 2)⌋ + 50; u_k ~ N(0, α²); B_k ~ N(0, β²);
    v_k ~ N(B_k, 1)^d; W_k ~ N(u_k, 1)^{d×C}; b_k ~ N(u_k, 1)^C; x ~ N(v_k, diag(j^−1.2));
    y = argmax softmax(x W_k + b_k). Each user's data is shuffled and split 90/10
    train/test; the natural partition is one user per client (`data.num_clients` users).
    With `iid`, one global W, b ~ N(0, 1) and v_k = 0 (generate_iid.py).

    Args:
        alpha: α, the standard deviation of the users' model means (model heterogeneity).
        beta: β, the standard deviation of the users' feature means (feature heterogeneity).
        iid: Use the Synthetic-IID generator instead.
        dim: Feature dimension d (60 in the paper).
        num_classes: Number of classes C (10 in the paper).
        max_samples_per_user: Cap on n_k (the log-normal law is heavy-tailed); None keeps the paper's law.
    """
    users = ctx.population("synthetic")
    rng = numpy_rng(ctx.seed, "synthetic")
    sizes = rng.lognormal(4, 2, users).astype(int) + 50
    if max_samples_per_user:
        sizes = np.minimum(sizes, max_samples_per_user)
    cov_diag = np.array([(j + 1) ** (-1.2) for j in range(dim)])
    if iid:
        w_global = rng.normal(0, 1, (dim, num_classes))
        b_global = rng.normal(0, 1, num_classes)
    mean_w = rng.normal(0, alpha, users)
    b_shift = rng.normal(0, beta, users)
    xs_tr, ys_tr, xs_te, ys_te, groups = [], [], [], [], []
    offset = 0
    for k in range(users):
        mean_x = np.zeros(dim) if iid else rng.normal(b_shift[k], 1, dim)
        if iid:
            w, b = w_global, b_global
        else:
            w = rng.normal(mean_w[k], 1, (dim, num_classes))
            b = rng.normal(mean_w[k], 1, num_classes)
        x = rng.normal(mean_x, np.sqrt(cov_diag), (sizes[k], dim))
        y = np.argmax(_softmax(x @ w + b), axis=1)
        perm = rng.permutation(sizes[k])
        n_train = int(0.9 * sizes[k])
        tr, te = perm[:n_train], perm[n_train:]
        xs_tr.append(x[tr]); ys_tr.append(y[tr]); xs_te.append(x[te]); ys_te.append(y[te])  # noqa: E702
        groups.append(np.arange(offset, offset + n_train))
        offset += n_train
    cat = lambda parts, dt: torch.tensor(np.concatenate(parts), dtype=dt)  # noqa: E731
    return SourceData(
        cat(xs_tr, torch.float32), cat(ys_tr, torch.int64), cat(xs_te, torch.float32), cat(ys_te, torch.int64),
        num_classes=num_classes, groups=groups,
    )


@DATA_SOURCES.register("quadratic")
def quadratic(
    ctx: SourceContext,
    dim: Annotated[int, Ge(1)] = 10,
    curvature_min: Annotated[float, Gt(0)] = 0.5,
    curvature_max: Annotated[float, Gt(0)] = 5.0,
    center_std: Annotated[float, Ge(0)] = 3.0,
    samples_per_client: Annotated[int, Ge(1)] = 1,
    noise_std: Annotated[float, Ge(0)] = 0.0,
) -> SourceData:
    """The federated quadratic task: client i has f_i(x) = ½ a_i ‖x − b_i‖².

    a_i ~ U[curvature_min, curvature_max], b_i ~ N(0, center_std²·I). Client i holds
    `samples_per_client` samples b_ij = b_i + noise_std·ξ (x rows; y = a_i), so mini-batches
    give stochastic gradients and full batches exact ones. The global objective weights
    clients by samples (equal here); its optimum x* = Σ a_i b̄_i / Σ a_i is in `info`.
    Use with `model: vector` (the model is the parameter vector itself).

    Args:
        dim: Dimension d of x.
        curvature_min: Lower bound of the curvatures a_i.
        curvature_max: Upper bound of the curvatures a_i.
        center_std: Standard deviation of the client optima b_i.
        samples_per_client: Samples per client (1 = deterministic gradients).
        noise_std: Spread of a client's samples around b_i.
    """
    if curvature_max < curvature_min:
        raise ValueError(f"curvature_max ({curvature_max}) must be >= curvature_min ({curvature_min})")
    n = ctx.population("quadratic")
    rng = numpy_rng(ctx.seed, "quadratic")
    a = rng.uniform(curvature_min, curvature_max, n)
    b = rng.normal(0.0, center_std, (n, dim))
    x = np.repeat(b, samples_per_client, axis=0) + noise_std * rng.normal(size=(n * samples_per_client, dim))
    y = np.repeat(a, samples_per_client)
    groups = [np.arange(i * samples_per_client, (i + 1) * samples_per_client) for i in range(n)]
    b_bar = x.reshape(n, samples_per_client, dim).mean(axis=1)
    optimum = (a[:, None] * b_bar).sum(0) / a.sum()
    xt = torch.tensor(x, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)
    return SourceData(
        xt, yt, xt, yt, num_classes=None, task="quadratic", groups=groups,
        info={"curvature": a, "centers": b_bar, "optimum": optimum},
    )
