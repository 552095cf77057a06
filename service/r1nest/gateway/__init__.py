"""The gateway: the one process users talk to (auth, credits, OpenAI-compatible proxy)."""
