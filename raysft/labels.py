"""What a trained token is, defined once: the loss, the loop's token counts and the data statistics all use it.

A row holds token ids, their labels (the id itself, or IGNORE_INDEX where the token is not trained), and
position ids that restart at 0 at the start of every packed example. The model at position t predicts the
token at t + 1, so the loss runs over the *next-token targets* ``labels[..., 1:]``. Such a target is trained
when its label is not IGNORE_INDEX and it does not start an example: position 0 of a row has nothing before
it to predict it from, and the first token of a packed example would be predicted from the end of the
example before it.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np

IGNORE_INDEX = -100
"""Label of a token that is not trained (the value torch's cross-entropy ignores by default)."""

ArrayT = TypeVar("ArrayT")  # np.ndarray or torch.Tensor: the mask comes back as the same kind


def trained_targets(labels: ArrayT, position_ids: ArrayT) -> ArrayT:
    """Boolean mask over the next-token targets ``labels[..., 1:]``: True where the target is trained.

    Works on numpy arrays and torch tensors alike, for one row (``[T]``) or a batch (``[B, T]``); the
    mask is one shorter than the rows along the last axis.

    Example:
        >>> labels = np.array([5, 6, IGNORE_INDEX, 8, 9, 10])
        >>> trained_targets(labels, np.array([0, 1, 2, 0, 1, 2])).tolist()  # 8 starts an example
        [True, False, False, True, True]
    """
    return (labels[..., 1:] != IGNORE_INDEX) & (position_ids[..., 1:] != 0)


def count_trained(labels: Any, position_ids: Any | None = None) -> int:
    """How many of a row's tokens contribute to the loss (:func:`trained_targets`, summed).

    Without `position_ids` the labels are one example (positions 0, 1, 2, ...), so only position 0 is
    left out beyond the IGNORE_INDEX labels. Takes lists, numpy arrays or CPU tensors.

    Example:
        >>> count_trained([5, 6, IGNORE_INDEX, 7])
        2
        >>> count_trained([5, 6, 7, 8], position_ids=[0, 1, 0, 1])
        2
    """
    labels = np.asarray(labels)
    positions = np.arange(labels.shape[-1]) if position_ids is None else np.asarray(position_ids)
    return int(trained_targets(labels, positions).sum())
