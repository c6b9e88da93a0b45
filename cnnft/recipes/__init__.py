"""One module per user job: each reads top to bottom and returns a typed result."""
