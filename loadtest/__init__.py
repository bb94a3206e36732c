"""Load generation and benchmarks against an inferq (or any OpenAI-compatible) server."""
