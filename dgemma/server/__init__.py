"""The OpenAI-compatible HTTP server (`dgemma serve`)."""
