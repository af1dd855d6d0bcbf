"""The edgefleet fleet controller (its core arrives with the fleet-link issue)."""
