"""What :func:`jacquant.transform` installs and a training loop calls: the quantizer modules and the op, the
refresh of B and its estimators, B on the optimizer, the non-finite guard, diagnostics, checkpoints, regional
compilation and distributed training."""
