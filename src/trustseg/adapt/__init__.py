"""Test-time adaptation: entropy minimisation on normalisation layers (TENT) and its reliability-guided
variants, with a guard that resets a collapsing model; evaluated through the shared evaluation loop."""
