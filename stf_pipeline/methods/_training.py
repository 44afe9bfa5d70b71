"""Training settings the learned methods share (BiaSTF's, which STFDCNN takes too, so that both
get the same budget rule)."""

from __future__ import annotations

from typing import Any

#: training settings of every preset but "tiny": validation on held-out dates (the initial,
#: zero-correction networks compete), early stopping, augmentation, and a cap of 600 steps per
#: stage over which the cosine schedule decays (longer training fitted the training dates and
#: did worse on the targets: ``docs/methods/biastf.md``)
TRAINING: dict[str, Any] = {
    "steps": 600,
    "validate_initial": True,
    "eval_every": 100,
    "eval_batches": 8,
    "patience": 5,
    "augment": True,
    "checkpoint_every": 500,
    "max_minutes": 3.0,
    "ema_decay": 0.99,
}


