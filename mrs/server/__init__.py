"""The HTTP server: Ollama, OpenAI and model-rs routes (see shared/API.md)."""
