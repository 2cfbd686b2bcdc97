"""The training engine: models, losses, optimizer, sampling, the engine process."""
