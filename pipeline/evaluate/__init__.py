"""Evaluation: KRR scores against the strongest simple baselines, finite networks trained on a support, transfer, privacy distances and plots."""
