"""The model registry: artifacts, the TUF repository that signs them, and its keys.

``registration`` registers uploads (store, row, TUF target), yanks them and sets their
cards; ``store`` keeps the bytes (``sha256/<first2>/<sha256>``); ``targets`` describes
a registered artifact as a TUF target; ``repository`` signs targets, snapshot and
timestamp metadata with keys from ``keys``; ``select`` picks the artifact a desired
model means.
"""
