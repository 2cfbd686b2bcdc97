"""The Tinker wire: a second front door to the same trainer, for code written against the official
``tinker`` SDK (and the ``tinker-cookbook`` recipes). Routes under ``/api/v1``; sessions, engines,
artifacts, audit and privacy are TenSafe's own (see routes.py)."""

SUPPORTED_SDK_VERSIONS = ("0.38.0",)  # the versions the suite runs; the vendored schema is 0.38.0's
PREFIX = "/api/v1"  # where the Tinker wire is served; its callers authenticate by X-API-Key (service/tinker/keys.py)
