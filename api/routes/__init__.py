"""Thin blueprints: parse, call serving logic, map the result to HTTP."""
