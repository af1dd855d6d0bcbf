"""The model registry: artifacts, the TUF repository that signs them, and its keys.

``registration`` registers uploads (store, row, TUF target), yanks them and sets their
cards; ``store`` hashes and checks the bytes, which a ``blobs`` backend keeps: a
folder (``folder``, the default) or an S3 bucket (``s3``), as ``backends`` picks;
``targets`` describes a registered artifact as a TUF target; ``repository`` signs
targets, snapshot and timestamp metadata with keys from ``keys``; ``select`` picks the
artifact a desired model means.
"""
