"""Uncertainty-guided synthetic data ("Preserve the Hard, Regenerate the Rest", Röhrich et al. 2026):
keep the pixels a model finds hard, regenerate the rest, and label only what was kept."""
