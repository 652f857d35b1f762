"""The embedded in-process runner: simulation, checkpoints, reports."""
