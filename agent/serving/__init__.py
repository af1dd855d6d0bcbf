"""Scheduling, caching and model lifecycles between the API and the runtimes."""
