"""The engine every command shares: the evaluation loop, predictors, checkpoints, run directories,
devices and processes, progress bars."""
