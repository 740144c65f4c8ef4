"""The OpenAI-compatible HTTP API (FastAPI): `POST /v1/chat/completions` (non-streamed, or server-sent
events exactly as OpenAI sends them), `GET /v1/models`, `GET /health`. Every error is OpenAI-shaped
(`{"error": {"message", "type", "param", "code"}}`) with its status; a failure inside the model is a
500 for that request only, and the server goes on.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from multimodal import generation
from multimodal.serving.requests import APIError, ImagePolicy, parse_chat_request
from multimodal.serving.scheduler import BatchScheduler, Job


def create_app(model, model_id: str, max_batch: int = 8, api_key: str | None = None,
               policy: ImagePolicy = ImagePolicy(), wait_ms: float = 5.0, max_body_bytes: int = 64 * 2**20) -> FastAPI:
    app = FastAPI(title="salamandra-vl", docs_url=None, redoc_url=None)
    scheduler = BatchScheduler(model, max_batch=max_batch, wait_ms=wait_ms)
    app.state.scheduler = scheduler
    created = int(time.time())

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not given:
            raise APIError(401, "missing API key: send it as 'Authorization: Bearer KEY'", type="invalid_api_key")
        if not secrets.compare_digest(given, api_key):
            raise APIError(401, "incorrect API key", type="invalid_api_key")

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse(APIError(500, f"{type(error).__name__}: {error}", type="server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "salamandra-vision"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        raw = await request.body()
        if len(raw) > max_body_bytes:
            raise APIError(413, f"the request has {len(raw)} bytes, over the limit of {max_body_bytes}")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise APIError(422, f"the body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise APIError(422, "the request body must be a JSON object")
        if body.get("model") not in (None, model_id):
            raise APIError(404, f"the model {body.get('model')!r} does not exist; this server has {model_id!r}",
                           param="model", code="model_not_found")
        # Images are decoded and preprocessed off the event loop: other requests keep flowing.
        job, prompt_tokens, stream = await asyncio.to_thread(prepare, body, asyncio.get_running_loop())
        scheduler.submit(job)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if stream:
            return StreamingResponse(events(job, completion_id, request), media_type="text/event-stream")
        return await complete(job, completion_id, prompt_tokens, request)

    def prepare(body: dict[str, Any], loop: asyncio.AbstractEventLoop) -> tuple[Job, int, bool]:
        chat = parse_chat_request(body, policy)
        try:
            config = generation.GenerationConfig(max_new_tokens=chat.max_tokens, temperature=chat.temperature,
                                                 top_p=chat.top_p if chat.top_p > 0 else 1e-9, seed=chat.seed)
            prompt, pixels, _ = model._chat_inputs(chat.messages, chat.images, config.max_new_tokens)
        except ValueError as error:  # markers that do not match the images, a prompt that fills the context
            code = "context_length_exceeded" if "context" in str(error) else None
            raise APIError(400, str(error), param="messages", code=code) from None
        return Job(prompt, pixels, config, chat.stop, loop, stream=chat.stream), len(prompt), chat.stream

    async def next_event(job: Job, request: Request) -> tuple[Any, ...]:
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled = True
                    raise asyncio.CancelledError from None

    async def complete(job: Job, completion_id: str, prompt_tokens: int, request: Request) -> JSONResponse:
        pieces: list[str] = []
        while True:
            event = await next_event(job, request)
            if event[0] == "delta":
                pieces.append(event[1])
            elif event[0] == "error":
                raise APIError(500, event[1], type="server_error")
            else:
                _, finish_reason, completion_tokens = event
                break
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    async def events(job: Job, completion_id: str, request: Request) -> AsyncIterator[str]:
        stamp = int(time.time())

        def chunk(delta: dict[str, str], finish_reason: str | None = None) -> str:
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": stamp, "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                event = await next_event(job, request)
                if event[0] == "delta":
                    if event[1]:
                        yield chunk({"content": event[1]})
                elif event[0] == "error":
                    yield f"data: {json.dumps(APIError(500, event[1], type='server_error').body())}\n\n"
                    break
                else:
                    yield chunk({}, event[1])
                    break
            yield "data: [DONE]\n\n"
        finally:  # the client went away mid-stream (or we are done): the row leaves the batch
            job.cancelled = True

    return app
