"""The training stage: a bundle's training and the evaluation of a run folder (`pipeline`), and patient k-fold
cross-validation with out-of-fold predictions (`cv`)."""
