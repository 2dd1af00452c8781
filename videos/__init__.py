"""Rollout videos with overlays, and the failure review page. Knows nothing about policies."""
