"""`salamandra-vl serve`'s application, started for real (uvicorn on a free port) and spoken to with the
official openai client: answers equal `model.chat` on the same inputs, streaming equals
non-streaming, concurrent clients are batched and each gets its own answer (greedy, and sampled
with a seed: the same text alone or batched), bad requests get OpenAI-shaped errors and the server
goes on answering."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn
from openai import OpenAI
from PIL import Image

from multimodal.model import VisionLanguageModel
from multimodal.serving.app import create_app
from multimodal.serving.requests import ImagePolicy
from tests.multimodal.tiny import build_tiny_vlm

KEY = "test-key"


def data_url(color, size=(40, 30), fmt="PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def image_of(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    build_tiny_vlm(tokenizer).save_pretrained(root / "tiny")
    model = VisionLanguageModel.from_pretrained(root / "tiny")
    app = create_app(model, "tiny", max_batch=8, api_key=KEY, policy=ImagePolicy(max_bytes=60_000), wait_ms=20)
    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    for _ in range(200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    yield model, app, f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(timeout=10)


def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(url: str, text: str, color, **options):
    content = [{"type": "image_url", "image_url": {"url": data_url(color)}}, {"type": "text", "text": text}]
    return client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                               **{"max_tokens": 8, "temperature": 0, **options})


def expected(model, text: str, color, **options) -> str:
    messages = [{"role": "user", "content": f"<image>\n{text}"}]
    return str(model.chat(messages, images=[image_of(data_url(color))], **{"max_new_tokens": 8, **options}))


def test_an_answer_equals_model_chat_and_lists_the_model(server):
    model, _, url = server
    answer = ask(url, "Describe the image.", (200, 20, 20))
    assert answer.choices[0].message.content == expected(model, "Describe the image.", (200, 20, 20))
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.model == "tiny"
    assert answer.usage.completion_tokens > 0 and answer.usage.prompt_tokens > 16
    assert [m.id for m in client(url).models.list().data] == ["tiny"]


def test_streaming_equals_the_plain_answer(server):
    _, _, url = server
    plain = ask(url, "What is in the picture?", (20, 200, 20)).choices[0]
    chunks = list(ask(url, "What is in the picture?", (20, 200, 20), stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.message.content
    assert chunks[-1].choices[0].finish_reason == plain.finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "stream": True, "max_tokens": 3, "temperature": 0,
                            "messages": [{"role": "user", "content": "hello"}]}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_concurrent_clients_are_batched_and_each_gets_its_own_answer(server):
    model, app, url = server
    requests = [(f"Describe the image {i}.", (13 * i % 256, 200 - 9 * i, 40 + 11 * i)) for i in range(16)]
    before = app.state.scheduler.batches
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda r: ask(url, *r).choices[0].message.content, requests))
    assert answers == [expected(model, *r) for r in requests]
    assert app.state.scheduler.batches - before < 16  # some requests shared a batch


def test_a_seeded_sample_is_the_same_alone_or_batched(server):
    _, _, url = server
    sampled = {"temperature": 1.0, "top_p": 0.95, "seed": 7, "max_tokens": 12}
    alone = ask(url, "Describe the image.", (9, 99, 199), **sampled).choices[0].message.content
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(ask, url, f"Other request {i}.", (i * 40, 0, 0), temperature=1.0, seed=i)
                   for i in range(5)]
        batched = ask(url, "Describe the image.", (9, 99, 199), **sampled).choices[0].message.content
        [f.result() for f in futures]
    assert batched == alone


def error_of(url: str, body, key: str | None = KEY, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        response = httpx.post(f"{url}/v1/chat/completions", content=raw, headers=headers, timeout=60)
    else:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    return response.status_code, response.json()["error"]["message"]


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server):
    model, _, url = server

    def with_image(image_url: str) -> dict:
        return {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "hi"}]}]}

    noise = Image.effect_noise((300, 300), 100).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    big = f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"
    cases = [
        (with_image("data:image/png;base64,@@not base64@@"), 400, "invalid base64"),
        (with_image("data:image/png;base64," + base64.b64encode(b"plain text, not an image").decode()), 400,
         "not a readable image"),
        (with_image(big), 413, "over the limit"),
        (with_image("file:///etc/hostname"), 400, "allow-local-images"),
        (with_image("https://example.com/cat.png"), 400, "allow-remote-images"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 2000}]}, 400, "context"),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
        ({"model": "tiny", "messages": []}, 422, "non-empty"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n=1"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, 400, "temperature"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "<image> two markers <image>"}]}, 400, "image"),
    ]
    for body, status, message in cases:
        got_status, got_message = error_of(url, body)
        assert (got_status, message.lower() in got_message.lower()) == (status, True), (body, got_status, got_message)
    assert error_of(url, cases[-2][0], key=None)[0] == 401
    assert error_of(url, cases[-2][0], key="wrong")[0] == 401
    assert error_of(url, None, raw=b"{not json")[0] == 422
    # Still serving, with the same answers.
    answer = ask(url, "Describe the image.", (200, 20, 20)).choices[0].message.content
    assert answer == expected(model, "Describe the image.", (200, 20, 20))


def test_stop_strings_end_the_answer_before_them(server):
    model, _, url = server
    full = ask(url, "Describe the image.", (50, 60, 70), max_tokens=12).choices[0].message.content
    if len(full) < 4:
        pytest.skip("the tiny model's answer is too short to cut")  # pragma: no cover
    stop = full[2:4]
    cut = ask(url, "Describe the image.", (50, 60, 70), max_tokens=12, stop=[stop]).choices[0]
    assert cut.message.content == full[:full.index(stop)] and cut.finish_reason == "stop"


def test_the_serve_command_relaunches_with_its_own_options_and_serves(server, monkeypatch, tmp_path):
    """`salamandra-vl serve` restarts itself with passive OpenMP threads (they would spin on the cores
    the HTTP side needs), passing on exactly its options, then runs uvicorn on the checkpoint."""
    import multimodal.cli as cli

    model, _, _ = server
    model.save_pretrained(tmp_path / "m")
    relaunched, served = [], []
    monkeypatch.setattr(cli, "relaunch_with_passive_openmp", relaunched.append)
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: served.append((app, host, port)))
    assert cli.main(["serve", "--checkpoint", str(tmp_path / "m"), "--port", "9123", "--allow-local-images",
                     "--api-key", "k"]) == 0
    assert relaunched == [["serve", "--allow-local-images", "--checkpoint", str(tmp_path / "m"), "--host", "127.0.0.1",
                           "--port", "9123", "--max-batch", "8", "--max-image-bytes", str(20 * 2**20),
                           "--api-key", "k"]]
    assert served[0][1:] == ("127.0.0.1", 9123)
