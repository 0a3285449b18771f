"""classifier/digits_features: the digits feature classifier of the metrics (``digits_classifier`` of
jaxdiff.metrics.feature_classifier), whose features give the Fréchet distances of README's demo.

A SmallCNN on the 1078 training digits, the registry entry's recipe written out (Adam 3e-3 cosine-decayed to 0,
batch 64, 20 epochs); seed 0 gives bitwise the weights load_or_train caches, and this config is the cache's
config.json. About 15 s on 2 CPU cores:
    python train.py --config configs/classifier/digits_features.py --workdir runs/digits_features
"""
from jaxdiff.config import locked
from jaxdiff.tasks.feature_classifier import classifier_config


def get_config():
    return locked(classifier_config('digits_classifier'))
