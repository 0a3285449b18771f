"""Evaluators as importable functions: the eval/ CLIs parse flags, call them and print; training callbacks can
call them too.

- :mod:`~jaxdiff.evaluation.fid`             FID / FD, Inception Score, precision/recall of image sets;
- :mod:`~jaxdiff.evaluation.safety`          what the safety comparison's tasks share (methods, targets, solvers);
- :mod:`~jaxdiff.evaluation.safety_mixture`  the comparison on labelled 2-D mixtures with exact denoisers;
- :mod:`~jaxdiff.evaluation.safety_digits`   the comparison on a digits model;
- :mod:`~jaxdiff.evaluation.fairness`        attribute switching's rate and BER on mixtures and digits;
- :mod:`~jaxdiff.evaluation.robustness`      clean / PGD / AutoAttack accuracy (optionally behind DiffPure) and
  certified accuracy of denoised smoothing; :mod:`~jaxdiff.evaluation.robustness_data` loads what they evaluate;
- :mod:`~jaxdiff.evaluation.watermark`       codec decoding under perturbations and weight noise, trigger fidelity;
- :mod:`~jaxdiff.evaluation.report`          the HTML run report (:mod:`~jaxdiff.evaluation.html`: its blocks).
"""
