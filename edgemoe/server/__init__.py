"""The HTTP service: OpenAI-style completions over a UNIX socket, continuous batching, one engine thread."""
