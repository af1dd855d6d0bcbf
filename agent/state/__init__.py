"""Reconciling what the agent serves with what it should serve."""
