"""The TenSafe trainer: FastAPI operation queue, training engine, DP-SGD, encrypted artifacts, audit."""
