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
from jaxdiff.robust.trainer import adversarial_config, locked


def get_config():
    c = adversarial_config()        # every field with its comment; the defaults are this recipe
    c.seed = 1                      # reference --seed 1
    c.method = 'trades'             # TRADES
    c.beta = 5.0                    # --beta 5.0
    c.label_smoothing = 0.1         # --ls 0.1
    c.norm = 'Linf'                 # linf-pgd
    c.eps = 8 / 255                 # --attack-eps 8/255
    c.attack_step = 2 / 255         # --attack-step 2/255
    c.attack_steps = 10             # --attack-iter 10
    c.batch_size = 512              # --batch-size 512 (358 generated + 154 real)
    c.generated_fraction = 0.7      # --unsup-fraction 0.7
    c.epochs = 400                  # --num-adv-epochs 400 of ceil(50,000 / 512) = 98 steps: 39,200 steps
    c.checkpoint_every = 980        # every 10 epochs (the reference's state-last.pt)
    c.log_every = 100               # progress line every 100 steps
    c.data.real.source = 'tfds'     # TFDS array_record
    c.data.real.tfds_name = 'cifar10'  # CIFAR-10 train split (50,000)
    c.data.generated = 'runs/cifar10_samples/top20'  # 1M filtered EDM samples (override with your folder)
    c.data.crop_padding = 4         # 'base' augmentation: RandomCrop(32, padding=4)
    c.data.hflip = True             # and RandomHorizontalFlip
    c.model.arch = 'wrn'            # wrn-28-10-swish
    c.model.depth = 28              # WRN-28
    c.model.width = 10              # -10
    c.model.activation = 'swish'    # Swish
    c.model.dataset_stats = 'cifar10'  # the DeepMind WRN standardises with CIFAR-10 mean/std
    c.optim.lr = 0.2                # --lr 0.2
    c.optim.weight_decay = 5e-4     # --weight-decay 5e-4
    c.optim.pct_start = 0.025       # cosinew: OneCycleLR pct_start 0.025, stepped per epoch
    c.ema.decay = 0.995             # --tau 0.995
    c.eval.size = 1024              # the reference's validation slice
    c.eval.attack_steps = 40        # 4 * attack_iter
    return locked(c)
