"""What the trainer keeps: encrypted artifacts, the audit chain, paths and key stores."""
