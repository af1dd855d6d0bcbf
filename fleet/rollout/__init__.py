"""Staged rollouts: a pure plan (stages, gates, abort rules) and the locked reconcile loop."""
