"""The OpenAI-compatible HTTP layer: routes, request schemas, validation, SSE rendering, errors, auth,
settings, the CLI and the Prometheus metrics it publishes."""
