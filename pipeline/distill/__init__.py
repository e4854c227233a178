"""Distillation: the one KIP engine (kip), its augmentation, and kernel ridge regression (fit, predict, Label Solve)."""
