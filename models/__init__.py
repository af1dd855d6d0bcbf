"""The contract the agent and the fleet controller share, and nothing else."""
