"""Membership inference against a support set: from the support alone, can an attacker tell whether a
candidate image was among the training images the support was made from?

Two standard threshold attacks, each summarised by its ROC AUC over members (a seeded sample of the
training images, the pool KIP drew its targets from) against non-members (a seeded sample of the
validation split, real images never used as targets):

* loss: KRR fitted on the support predicts the candidate; a smaller squared error against its
  one-hot label (centred, as KIP's targets) says "member" (Yeom et al., CSF 2018);
* distance: a smaller L2 distance, in the preprocessed space, from the candidate to its nearest
  support image says "member".

0.5 means the attack cannot tell members from non-members; 1.0 means it always can. The same attacks
on a random real subset of the same size are the yardstick: its images are training images
themselves, so the distance attack finds those members at distance 0.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.distill import krr
from pipeline.evaluate import privacy, scoring
from pipeline.kernels.functions import KernelFn


def auc(member_scores: np.ndarray, non_member_scores: np.ndarray) -> float:
    """P(a random member scores above a random non-member), ties counted half: the ROC AUC of the
    threshold attack on these scores (Mann-Whitney U over n_m * n_n, from average ranks)."""
    members = np.asarray(member_scores, np.float64).ravel()
    others = np.asarray(non_member_scores, np.float64).ravel()
    if not len(members) or not len(others):
        raise ValueError("auc needs at least one member and one non-member score")
    both = np.concatenate([members, others])
    order = np.argsort(both, kind="stable")
    ranks = np.empty(len(both))
    sorted_values = both[order]
    start = 0
    while start < len(both):  # average ranks over ties (1-based)
        end = start
        while end + 1 < len(both) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u = ranks[: len(members)].sum() - len(members) * (len(members) + 1) / 2
    return float(u / (len(members) * len(others)))


def attack_scores(kernel_fn: KernelFn, images: np.ndarray, labels: np.ndarray, candidates: np.ndarray,
                  candidate_classes: np.ndarray, num_classes: int, reg: float) -> dict[str, np.ndarray]:
    """Each attack's membership score per candidate (higher: more likely a member)."""
    predictions = scoring.krr_predictions(kernel_fn, images, labels, candidates, reg)
    targets = krr.centered_one_hot(np.asarray(candidate_classes), num_classes)
    loss = np.sum((predictions - targets) ** 2, axis=1)
    distance, _ = privacy.nearest_train(candidates, images)
    return {"loss": -loss, "distance": -distance}


def report(kernel_fn: KernelFn, images: np.ndarray, labels: np.ndarray, x_train: np.ndarray, y_train: np.ndarray,
           x_heldout: np.ndarray, y_heldout: np.ndarray, num_classes: int, reg: float, seed: int,
           sample: int = 2000) -> dict[str, Any]:
    """Both attacks' AUC on `sample` members against as many non-members (fewer if the held-out split
    is smaller), drawn with `seed`: the same draw for every support of a cell, so they compare."""
    rng = np.random.default_rng([seed, 11])
    count = min(sample, len(x_train), len(x_heldout))
    members = rng.choice(len(x_train), size=count, replace=False)
    others = rng.choice(len(x_heldout), size=count, replace=False)
    candidates = np.concatenate([x_train[members], x_heldout[others]])
    classes = np.concatenate([y_train[members], y_heldout[others]])
    scores = attack_scores(kernel_fn, images, labels, candidates, classes, num_classes, reg)
    return {"members": int(count), "non_members": int(count),
            **{f"{name}_auc": auc(values[:count], values[count:]) for name, values in scores.items()}}
