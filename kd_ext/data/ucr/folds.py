"""Class-stratified ``k``-fold assignment for cross-validation over a training file."""

from collections.abc import Sequence

import numpy as np


def stratified_folds(labels: Sequence[int], num_folds: int, seed: int = 0) -> np.ndarray:
    """Fold number of each sample: each class is shuffled (seeded) and dealt round-robin over the folds.

    Args:
        labels: Class of each sample.
        num_folds: Number of folds.
        seed: Shuffling seed.

    Returns:
        np.ndarray: Fold of each sample, in ``[0, num_folds)``.
    """
    labels = np.asarray(labels)
    folds = np.empty(len(labels), dtype=int)
    rng = np.random.default_rng(seed)
    offset = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        folds[members] = (np.arange(len(members)) + offset) % num_folds
        offset += len(members)
    return folds
