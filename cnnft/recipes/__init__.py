"""One module per user job: each reads top to bottom from config to result."""
