"""Load generation against an inferq (or any OpenAI-compatible) server: ``inferq loadtest``."""
