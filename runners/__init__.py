"""Rollouts with action-chunk replanning, evaluation, sweeps and serving. The only place Hydra is seen."""
