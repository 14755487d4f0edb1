"""`bagel serve`: the OpenAI-compatible server on the shipped digits BAGEL, driven by the official `openai` client
against uvicorn running in a background thread."""

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest


openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from diffusers_bagel.serving import ServerConfig, create_app  # noqa: E402


CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-bagel-digits"
MODEL = "tiny-bagel-digits"
KEY = "test-key"
STEPS = {"num_inference_steps": 16}  # as examples/quickstart.py draws the digits


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    """uvicorn serving an app in a daemon thread on a free loopback port."""

    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(digits_pipe):
    running = _Server(create_app(digits_pipe, ServerConfig(model_name=MODEL, api_key=KEY, max_batch_size=8)))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300)


def _png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _ask(client, image, question="Which digit is this?", stream=False):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(image)}},
                                             {"type": "text", "text": question}]}]  # fmt: skip
    if not stream:
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stream=True,
                                          stream_options={"include_usage": True})  # fmt: skip


def _generate(client, prompt="a handwritten digit seven", seed=0, **extra):
    result = client.images.generate(model=MODEL, prompt=prompt, size="64x64", extra_body={"seed": seed, **STEPS, **extra})
    return _png(result.data[0].b64_json)


def _assert_openai_error(error, status):
    assert error.status_code == status
    body = error.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in body["error"]["message"] and "/work/" not in body["error"]["message"]


def test_models_health_and_metrics(client, server):
    assert [model.id for model in client.models.list()] == [MODEL]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'bagel_requests_total{endpoint="/v1/models",status="200"}' in metrics
    assert "# TYPE bagel_request_latency_seconds summary" in metrics


def test_generate_read_and_edit(client):
    seven = _generate(client)
    assert seven.size == (64, 64)

    answer = _ask(client, seven)
    text = answer.choices[0].message.content
    assert "seven" in text.lower()
    assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
    assert answer.choices[0].finish_reason in ("stop", "length")

    chunks = list(_ask(client, seven, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens

    buffer = io.BytesIO()
    seven.save(buffer, format="PNG")
    edited = client.images.edit(
        model=MODEL, image=("seven.png", buffer.getvalue(), "image/png"), prompt="change the digit to three",
        extra_body={"seed": 0, **STEPS},
    )  # fmt: skip
    three = _png(edited.data[0].b64_json)
    assert three.size == (64, 64)
    assert "three" in _ask(client, three).choices[0].message.content.lower()


def test_stop_and_thinking_fields(client):
    seven = _generate(client)
    full = _ask(client, seven).choices[0].message.content
    word = full.strip().split()[0]
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(seven)}},
                                             {"type": "text", "text": "Which digit is this?"}]}]  # fmt: skip
    stopped = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, stop=[word])
    assert stopped.choices[0].message.content == full[: full.find(word)]
    assert stopped.choices[0].finish_reason == "stop"
    thought = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_body={"think": True})
    assert thought.usage.prompt_tokens > stopped.usage.prompt_tokens  # the reasoning system prompt was added


def test_concurrent_seeded_requests_batch_and_match_sequential(client, server):
    prompts = [f"a handwritten digit {name}" for name in ("zero", "one", "two", "three", "four", "five", "six", "seven")]
    sequential = [np.asarray(_generate(client, prompt, seed=index)) for index, prompt in enumerate(prompts)]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda args: np.asarray(_generate(client, args[1], seed=args[0])), enumerate(prompts)))
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    largest = max(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith('bagel_batch_size{kind="generate",quantile="0.99"}'))  # fmt: skip
    assert largest > 1, "the concurrent requests were not batched"
    for alone, batched in zip(sequential, concurrent):
        assert np.array_equal(alone, batched)  # bit for bit (see test_pipeline's batch test)


def test_concurrent_chat_requests_batch_and_answer_as_alone(client, server):
    digits = ("seven", "three", "one", "zero")
    images = [_generate(client, f"a handwritten digit {name}", seed=index) for index, name in enumerate(digits)]
    settings = [{"max_tokens": 8}, {"max_tokens": 1}, {"max_tokens": 8, "stop": ["e"]}, {"max_tokens": 5}]

    def ask(index):
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _data_url(images[index])}},
            {"type": "text", "text": "Which digit is this?" if index != 3 else "Which digit is it? Answer in one word."}]}]
        answer = client.chat.completions.create(model=MODEL, messages=messages, **settings[index])
        return answer.choices[0].message.content, answer.choices[0].finish_reason, answer.usage.model_dump()

    alone = [ask(index) for index in range(4)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(ask, range(4)))
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    largest = max(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith('bagel_batch_size{kind="chat",quantile="0.99"}'))  # fmt: skip
    assert largest > 1, "the concurrent chat requests were not batched"
    assert together == alone
    assert "seven" in alone[0][0].lower() and alone[0][1] == "stop"
    assert alone[1][1] == "length" and alone[1][2]["completion_tokens"] == 1
    assert "e" not in alone[2][0] and alone[2][1] == "stop"


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, server):
    seven = _generate(client)
    cases = [
        lambda: client.images.generate(model=MODEL, prompt="", size="64x64"),
        lambda: client.images.generate(model=MODEL, prompt="a handwritten digit one", size="65x64"),
        lambda: client.images.generate(model=MODEL, prompt="a handwritten digit one", size="big"),
        lambda: client.images.generate(model=MODEL, prompt="a handwritten digit one", n=100),
        lambda: client.images.generate(model=MODEL, prompt="a handwritten digit one", extra_body={"num_inference_steps": 10**6}),
        lambda: client.images.generate(model=MODEL, prompt="x", response_format="url"),  # no --image_dir
        lambda: client.images.edit(model=MODEL, image=("bad.png", b"not an image", "image/png"), prompt="change it"),
        lambda: client.chat.completions.create(model=MODEL, messages=[]),
        lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/seven.png"}},
            {"type": "text", "text": "Which digit is this?"}]}]),
        lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "Which digit is this?"}]}]),
        lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=0),
        lambda: client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]),
    ]  # fmt: skip
    for case in cases:
        with pytest.raises(openai.APIStatusError) as caught:
            case()
        assert 400 <= caught.value.status_code < 500, caught.value.response.text
        _assert_openai_error(caught.value, caught.value.status_code)
        assert _generate(client).size == (64, 64)  # still serving

    intruder = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        intruder.models.list()
    _assert_openai_error(caught.value, 401)
    assert np.array_equal(np.asarray(_generate(client)), np.asarray(seven))


def test_url_response_format_serves_the_file(digits_pipe, tmp_path):
    running = _Server(create_app(digits_pipe, ServerConfig(model_name=MODEL, image_dir=tmp_path)))
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=300)
        result = client.images.generate(model=MODEL, prompt="a handwritten digit two", size="64x64",
                                        response_format="url", extra_body={"seed": 1, **STEPS})  # fmt: skip
        fetched = httpx.get(result.data[0].url)
        assert fetched.status_code == 200 and Image.open(io.BytesIO(fetched.content)).size == (64, 64)
        assert httpx.get(f"{running.url}/v1/files/images/..%2F..%2Fetc%2Fpasswd").status_code == 404
    finally:
        running.stop()


def test_full_queue_answers_429(digits_pipe):
    running = _Server(create_app(digits_pipe, ServerConfig(model_name=MODEL, max_queue=1, max_batch_size=1)))
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=300)

        def attempt(index):
            try:
                _generate(client, seed=index, num_inference_steps=30)
                return 200
            except openai.RateLimitError as error:
                _assert_openai_error(error, 429)
                return 429

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(attempt, range(8)))
        assert 429 in statuses and 200 in statuses
        assert _generate(client).size == (64, 64)  # serving again once the queue drained
    finally:
        running.stop()


def test_request_timeout_answers_504(digits_pipe):
    running = _Server(create_app(digits_pipe, ServerConfig(model_name=MODEL, request_timeout=0.05)))
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=300)
        with pytest.raises(openai.APIStatusError) as caught:
            _generate(client, num_inference_steps=100)
        _assert_openai_error(caught.value, 504)
    finally:
        running.stop()


def test_a_failing_batch_runs_each_job_alone():
    from diffusers_bagel.serving import BatchWorker, Job, ServerMetrics

    def execute(jobs):
        if any(job.payload == "poison" for job in jobs):
            raise ValueError("poisoned batch")
        return [job.payload.upper() for job in jobs]

    worker = BatchWorker(execute, max_batch_size=8, max_queue=8, metrics=ServerMetrics(), batch_wait=0.2)
    jobs = [Job(kind="generate", key="same", weight=1, payload=payload) for payload in ("a", "poison", "b")]
    futures = [worker.submit(job) for job in jobs]
    assert futures[0].result(10) == "A" and futures[2].result(10) == "B"
    with pytest.raises(ValueError, match="poisoned"):
        futures[1].result(10)
    worker.close()
