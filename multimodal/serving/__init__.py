"""`salamandra-vl serve`: an OpenAI-compatible chat server with images, streaming and batching.

- requests.py   OpenAI request -> messages, images, settings; OpenAI-shaped errors (APIError)
- scheduler.py  batching concurrent requests into the KV-cached generator, per-row settings
- app.py        the FastAPI application (chat completions, models, health)
"""
