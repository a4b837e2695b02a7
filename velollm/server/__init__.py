"""``velollm serve``: an OpenAI-compatible HTTP server over the model pool.

Kept import-light: the CLI plugin (:mod:`velollm.server.plugin`) is loaded on every command,
while FastAPI and uvicorn are imported only when a server is built (:mod:`velollm.server.app`).
"""
