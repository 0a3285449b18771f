"""Robustness: adversarial attacks (FGSM, PGD, APGD-CE/DLR, APGD-T, FAB, Square, AutoAttack) and their losses,
DiffPure and (denoised) randomized smoothing.

Conventions: a classifier is ``logits_fn(x (B, H, W, C) in [0, 1]) -> logits (B, K)``, a pure function; labels
are (B,) int; norms 'Linf' and 'L2'; every attack keeps its output in the eps-ball around x and in [0, 1], is
batched and jittable (static iteration counts), and takes explicit ``jax.random`` keys.

- :mod:`jaxdiff.robust.losses`      per-sample CE, margin, DLR, targeted DLR, TRADES' KL;
- :mod:`jaxdiff.robust.pgd`         ``pgd.pgd``, ``pgd.fgsm`` and the shared geometry (projection, ascent
  direction, random starts);
- :mod:`jaxdiff.robust.apgd`        ``apgd.apgd`` (APGD-CE / APGD-DLR), ``apgd.apgd_targeted`` (APGD-T), the
  step-size rule as pure functions;
- :mod:`jaxdiff.robust.fab`         ``fab.fab``: FAB (FAB-T by default), minimum-norm attack by hyperplane projections;
- :mod:`jaxdiff.robust.square`      ``square.square``: Square Attack, score-based random search (Linf, L2);
- :mod:`jaxdiff.robust.autoattack`  ``autoattack.autoattack``: attacks in sequence on the still-robust points;
- :mod:`jaxdiff.robust.smoothing`   randomized smoothing (Cohen et al.): ``sample_counts``, ``predict``, ``certify``,
  ``certified_accuracy``; denoised smoothing's base ``denoised_classifier`` / ``one_shot_denoise`` (Carlini et al.);
- :mod:`jaxdiff.robust.diffpure`    DiffPure purification (``diffpure``, ``purified_classifier``) and
  ``eot_logits_fn`` for attacking it with EOT.

The submodules are imported here, not their functions: the attack functions share the submodules' names
(``pgd.pgd``), and re-exporting them would shadow the modules.
"""
from jaxdiff.robust import apgd, autoattack, diffpure, fab, losses, pgd, smoothing, square

__all__ = ['apgd', 'autoattack', 'diffpure', 'fab', 'losses', 'pgd', 'smoothing', 'square']
