"""The leanserve HTTP service: OpenAI-compatible API, engine loop, scheduler, sampling and metrics."""
