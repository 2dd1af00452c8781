"""Rollout videos with overlays. Knows nothing about policies or runs (the review page of a run
directory is runners/review.py)."""
