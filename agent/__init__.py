"""The edgefleet on-device agent: serves local models behind an OpenAI-compatible API."""
