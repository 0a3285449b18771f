"""robust/cifar10: TRADES adversarial training of a WRN-28-10 (Swish) on CIFAR-10 + 1M EDM-generated images, the
recipe of Wang et al. 2023 ("Better Diffusion Models Further Improve Adversarial Training"), as the README command
of wzekai99/DM-Improves-AT (1M generated, 400 epochs, batch 512, lr 0.2, beta 5, 70% generated, ls 0.1).

Generated data: sample a class-conditional CIFAR-10 EDM (sample.py, Heun 20 steps, e.g. 5M seeds), keep the top
20% per class with jaxdiff.sampling.filter.filter_folder, and point data.generated at the result:
    python train.py --config configs/robust/cifar10.py --workdir runs/robust_cifar10 \
        --config.data.generated=runs/cifar10_samples/top20
Real data: TFDS cifar10 prepared as array_record (tfds.data_source); the first 1024 training images are held out
for best-checkpoint selection by PGD-40 (CW loss) of the EMA model, once per epoch.
Epoch, as the reference: ceil(50,000 / 512) = 98 steps, counted on the whole real training set (the held-out 1024
included) whatever the amount of generated data (its dataset_size is set before the generated data are appended and
the validation slice is cut); 400 epochs = 39,200 steps (~20M examples seen). The one-cycle lr peaks in epoch 10
(pct_start 0.025 of 400 epochs: steps 882-979) and the EMA starts averaging at update 980 (0.025 * 400 * 98).
"""
from jaxdiff.tasks.adversarial import adversarial_config, locked


def get_config():
    c = adversarial_config()        # every field with its comment; the defaults are this recipe
    c.seed = 1                      # reference --seed 1
    c.checkpoint_every = 980        # every 10 epochs (the reference's state-last.pt)
    c.data.generated = 'runs/cifar10_samples/top20'  # 1M filtered EDM samples (override with your folder)
    return locked(c)
