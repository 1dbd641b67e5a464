"""`kiln serve`: engines behind an OpenAI-compatible HTTP API, on uvicorn or as a Ray Serve deployment."""
from kiln.serve.app import ServeOptions, build_app, load_api_keys

__all__ = ["ServeOptions", "build_app", "load_api_keys"]
