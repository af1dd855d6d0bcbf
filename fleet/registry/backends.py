"""Which :class:`~fleet.registry.blobs.Blobs` the settings name: a folder or a bucket."""

from __future__ import annotations

from fleet.config import FleetSettings
from fleet.errors import ConfigError
from fleet.registry.blobs import Blobs
from fleet.registry.folder import FolderBlobs

__all__ = ["blobs_for"]


def blobs_for(settings: FleetSettings) -> Blobs:
    """The backend of ``settings.artifact_backend``; ``ConfigError`` if it lacks a setting."""
    if settings.artifact_backend == "file":
        return FolderBlobs(settings.resolved_artifact_dir)
    if not settings.artifact_s3_bucket:
        raise ConfigError(
            "artifact_backend is s3 but no bucket is set: set artifact_s3_bucket "
            "(EDGEFLEET_FLEET_ARTIFACT_S3_BUCKET), or artifact_backend=file"
        )
    from fleet.registry.s3 import S3Blobs, S3Layout, shared_client  # boto3 only when used

    client = shared_client(settings.artifact_s3_endpoint_url, settings.artifact_s3_region)
    return S3Blobs(client, S3Layout(settings.artifact_s3_bucket, settings.artifact_s3_prefix))
