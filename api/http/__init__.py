"""App-level HTTP plumbing shared by every feature: errors, SSE framing, OpenAPI, JSON and body
limits, request deadlines, gunicorn hooks, metrics, and the helpers thin blueprints answer with."""
