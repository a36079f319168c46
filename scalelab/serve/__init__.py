"""Serving: the OpenAI-compatible HTTP server and the user memory behind it."""
