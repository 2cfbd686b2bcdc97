"""The command line: tensafe serve, the admin commands, the demo."""
