"""TenSafe's own door: ``/v1``."""
