"""dmengine: an OMA DM 1.2 (SyncML DM) server with the DMWSI web-services interface."""

__version__ = "0.1.0"
