"""The two doors: /v1 (tg_tinker) and /api/v1 (the Tinker wire), behind one Gate."""
