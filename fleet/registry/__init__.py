"""The model registry: a content-addressed artifact store and the targets it describes.

``store`` keeps the bytes (``sha256/<first2>/<sha256>``); ``targets`` turns a
registered artifact into the description a TUF repository will sign. Signing itself
(TUF metadata, keys, delegations) comes later and plugs in at ``targets``.
"""
