"""Firmware images: recipes, reproducible builds, signed manifests with SBOMs (docs/images.md)."""

__all__: list[str] = []
