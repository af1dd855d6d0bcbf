"""The on-device HTTP API: OpenAI-compatible, Open Inference Protocol, health and metrics."""
