"""Training settings the learned methods share (BiaSTF's, which STFDCNN takes too, so that both
get the same budget rule)."""

from __future__ import annotations

from typing import Any

#: training settings of every preset but "tiny": validation on held-out dates (the initial,
#: zero-correction networks compete), early stopping, augmentation
TRAINING: dict[str, Any] = {
    "validate_initial": True,
    "eval_every": 100,
    "eval_batches": 8,
    "patience": 5,
    "augment": True,
    "checkpoint_every": 500,
    "max_minutes": 3.0,
    "ema_decay": 0.99,
}


