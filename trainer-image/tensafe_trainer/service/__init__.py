"""The service layer both doors share: door checks, principals, operations."""
