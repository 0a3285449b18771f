"""classifier/fashion_mnist_features: the Fashion-MNIST feature classifier of the metrics
(``fashion_mnist_classifier`` of jaxdiff.metrics.feature_classifier), about 90% held-out accuracy.

A SmallCNN on Debian's Fashion-MNIST train split (60k), the registry entry's recipe written out (Adam 3e-3
cosine-decayed to 0, batch 128, 2 epochs); seed 0 gives bitwise the weights load_or_train caches, and this config
is the cache's config.json. About 2 minutes on 2 CPU cores:
    python train.py --config configs/classifier/fashion_mnist_features.py --workdir runs/fashion_mnist_features
"""
from jaxdiff.config import locked
from jaxdiff.tasks.feature_classifier import classifier_config


def get_config():
    return locked(classifier_config('fashion_mnist_classifier'))
