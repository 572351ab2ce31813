"""One file per layer family: its per-sample gradients, norm formulas and clipped sum."""
