"""`bagel serve` exposed: body limits while the body arrives, queued memory, remote-image fetching (SSRF), API keys,
clients that hang up, options the server cannot honour, client mistakes that must not be 500s, start-up checks.

Networking stays on 127.0.0.1: name resolution is simulated by monkeypatching `socket.getaddrinfo` (names outside the
test's table only resolve as numeric addresses, never through DNS)."""

import base64
import errno
import http.server
import io
import ipaddress
import json
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest


openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from diffusers_bagel.serving import (  # noqa: E402
    ServerConfig,
    ServerLimits,
    check_port,
    check_timing,
    create_app,
    is_public_address,
    resolve_api_key,
)
from diffusers_bagel.serving import outputs as outputs_module  # noqa: E402
from diffusers_bagel.serving import remote as remote_module  # noqa: E402


CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-bagel-digits"
MODEL = "tiny-bagel-digits"
STEPS = {"num_inference_steps": 16}
QUESTION = "Which digit is this?"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(condition, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class _Server:
    """uvicorn serving an app in a daemon thread on a free loopback port."""

    def __init__(self, app):
        self.app = app
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        _wait_until(lambda: self.server.started, 30, "uvicorn to start")
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def worker(self):
        return self.app.state.worker

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)


class _Gate:
    """Wraps a server's `BatchWorker.execute`: records the jobs it runs and their results, and holds the first call
    in `hold(jobs)` (until `release` is set, by default); later calls pass."""

    def __init__(self, worker, hold=None):
        self.original = worker.execute
        self.hold = hold or (lambda jobs: self.release.wait(60))
        self.entered = threading.Event()
        self.release = threading.Event()
        self.ran, self.results = [], []
        worker.execute = self

    def __call__(self, jobs):
        if not self.entered.is_set():
            self.entered.set()
            self.hold(jobs)
        self.ran.extend(jobs)
        results = self.original(jobs)
        self.results.append(results)
        return results


@pytest.fixture
def serve(digits_pipe):
    """Starts servers on the digits pipeline (`serve(**config)`); all are stopped after the test."""
    running = []

    def start(**config):
        server = _Server(create_app(digits_pipe, ServerConfig(model_name=MODEL, **config)))
        running.append(server)
        return server

    yield start
    for server in running:
        server.stop()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _digit(server, seed=0, prompt="a handwritten digit seven", **extra) -> bytes:
    response = httpx.post(f"{server.url}/v1/images/generations", timeout=300,
                          json={"prompt": prompt, "size": "64x64", "seed": seed, **STEPS, **extra})  # fmt: skip
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["data"][0]["b64_json"])


def _chat_body(url: str, max_tokens: int = 8, **extra) -> dict:
    return {"model": MODEL, "max_tokens": max_tokens, **extra, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]}  # fmt: skip


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _assert_error(response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"] and "/work/" not in error["message"] and "/tmp" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def _still_serving(server) -> None:
    assert Image.open(io.BytesIO(_digit(server))).size == (64, 64)


# -- raw HTTP on loopback (chunked bodies, clients that hang up) ------------------------------------------------------


def _connect(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=60)


def _head(path: str, content_type: str, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n{extra}"
            "Transfer-Encoding: chunked\r\n\r\n").encode()  # fmt: skip


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Status, headers and body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    for _ in range(10000):
        if b"\r\n\r\n" in data:
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    length = int(headers.get("content-length", 0))
    for _ in range(10000):
        if len(body) >= length:
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body[:length]


# -- 1. body size -------------------------------------------------------------------------------------------------------


def test_a_chunked_body_past_the_limit_is_refused_while_it_arrives(serve):
    limit = 32 * 1024
    server = serve(limits=ServerLimits(max_body_bytes=limit))
    piece = b"x" * 4096
    cases = [("/v1/chat/completions", "application/json", b'{"messages": "' + piece),
             ("/v1/images/generations", "application/json", b'{"prompt": "' + piece),
             ("/v1/images/edits", "multipart/form-data; boundary=XyZ",
              b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
              b"Content-Type: image/png\r\n\r\n" + piece)]  # fmt: skip
    for path, content_type, start in cases:
        with _connect(server) as sock:
            sock.sendall(_head(path, content_type) + _chunk(start))
            sent = len(start)
            while sent <= limit:  # just past the limit, then nothing: the body never ends (no last chunk)
                sock.sendall(_chunk(piece))
                sent += len(piece)
            status, headers, body = _read_response(sock)
        assert status == 413, (path, body)
        assert headers.get("connection") == "close"  # nothing more of that body is read
        error = json.loads(body)["error"]
        assert error["code"] == "too_large" and str(limit) in error["message"]

    with _connect(server) as sock:  # a declared length past the limit is refused before any byte of the body
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000000\r\n\r\n")  # fmt: skip
        status, _, body = _read_response(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"

    with _connect(server) as sock:  # a chunked body within the limit is read whole, as before
        body = json.dumps({"prompt": "a handwritten digit seven", "size": "64x64", "seed": 0, **STEPS}).encode()
        sock.sendall(_head("/v1/images/generations", "application/json") + _chunk(body[:10]) + _chunk(body[10:])
                     + b"0\r\n\r\n")  # fmt: skip
        status, _, answer = _read_response(sock)
    assert status == 200 and json.loads(answer)["data"][0]["b64_json"]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'bagel_requests_total{endpoint="/v1/images/edits",status="413"} 1' in metrics
    _still_serving(server)


# -- 2. memory held by queued requests ---------------------------------------------------------------------------------


def _large_png(side: int, seed: int) -> bytes:
    """A `side` x `side` PNG that compresses well (gradients and a few blocks), as scans and screenshots do."""
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, -ramp) / 2 + 128,
                       np.full((side, side), 40.0 * seed)], axis=-1)  # fmt: skip
    pixels[side // 4 : side // 2, side // 4 : side // 2] = 255
    return _png_bytes(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))


def test_queued_requests_hold_compressed_bytes_within_a_byte_budget(serve):
    side = 2048
    pngs = [_large_png(side, seed) for seed in range(3)]
    prompt = "change the digit to three"
    budget = len(pngs[0]) + len(pngs[1]) + 2 * len(prompt) + 1000  # two of these requests, not three
    server = serve(max_batch_size=1, max_queue_bytes=budget)
    gate = _Gate(server.worker)

    def edit(png):
        files = {"image": ("big.png", png, "image/png")}
        return httpx.post(f"{server.url}/v1/images/edits", files=files, timeout=300,
                          data={"prompt": prompt, "seed": "0", "size": "64x64", **{k: str(v) for k, v in STEPS.items()}})

    with ThreadPoolExecutor(4) as pool:
        blocker = pool.submit(_digit, server)
        _wait_until(gate.entered.is_set, what="the worker to start the first job")
        queued = [pool.submit(edit, png) for png in pngs[:2]]
        _wait_until(lambda: server.worker.depth() == 2, what="two queued edits")
        held = server.worker.queued_bytes()
        decoded = 2 * side * side * 3  # what two decoded RGB images would hold
        assert held == len(pngs[0]) + len(pngs[1]) + 2 * len(prompt)  # compressed bytes + prompts, accounted
        assert held < decoded / 20, (held, decoded)
        assert f"bagel_queue_bytes {held}" in httpx.get(f"{server.url}/metrics").text
        assert httpx.get(f"{server.url}/health").json()["queue_bytes"] == held

        refused = edit(pngs[2])  # the third would pass the budget
        error = _assert_error(refused, 429, code="queue_full")
        assert "bytes" in error["message"]
        gate.release.set()
        assert blocker.result(300)
        for future in queued:
            answer = future.result(300)
            assert answer.status_code == 200, answer.text
            assert Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"]))).size == (64, 64)
    assert server.worker.queued_bytes() == 0
    edits = [job for job in gate.ran if job.kind == "edit"]
    assert len(edits) == 2 and all(image.nbytes < 10**6 for job in edits for image in job.payload.images)
    _still_serving(server)


def _scrambled_pixels(png: bytes) -> bytes:
    """`png` with its compressed pixel data scrambled, every chunk checksum still right: the header and the format's
    integrity check pass, only decoding fails."""
    out, position = bytearray(png[:8]), 8
    while position < len(png):
        length, kind = struct.unpack(">I4s", png[position : position + 8])
        body = png[position + 8 : position + 8 + length]
        body = bytes(byte ^ 0x5A for byte in body) if kind == b"IDAT" else body
        out += struct.pack(">I4s", len(body), kind) + body + struct.pack(">I", zlib.crc32(kind + body))
        position += 12 + length
    return bytes(out)


def test_broken_images_are_refused_and_fail_alone_in_a_batch(serve):
    server = serve(max_batch_size=8, batch_wait=0.5)
    png = _digit(server)
    cut = png[: len(png) // 2]  # the header reads, the checksums do not: refused at admission
    response = httpx.post(f"{server.url}/v1/chat/completions", json=_chat_body(_data_url(cut)), timeout=300)
    _assert_error(response, 400, param="messages[0].content[0].image_url", code="invalid_image")

    gate = _Gate(server.worker)
    form = {"prompt": "change the digit to three", "seed": "0", "size": "64x64", "num_inference_steps": "16"}

    def edit(image):
        return httpx.post(f"{server.url}/v1/images/edits", data=form, files={"image": ("a.png", image, "image/png")},
                          timeout=300)  # fmt: skip

    with ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(_digit, server)
        _wait_until(gate.entered.is_set, what="the worker to start the first job")
        good, bad = pool.submit(edit, png), pool.submit(edit, _scrambled_pixels(png))
        _wait_until(lambda: server.worker.depth() == 2, what="two queued edits")
        gate.release.set()
        blocker.result(300)
        assert good.result(300).status_code == 200, good.result().text
        _assert_error(bad.result(300), 400, param="image", code="invalid_image")  # decoded in the worker: fails
    edits = [job for job in gate.ran if job.kind == "edit"]
    assert len(edits) == 2 and {job.batch_size for job in edits} == {2}  # one batch; only the broken one failed
    _still_serving(server)


# -- 3. remote images (SSRF) -------------------------------------------------------------------------------------------


class _ImageHost(http.server.BaseHTTPRequestHandler):
    """A small HTTP server on 127.0.0.1: /seven.png, a redirect to a private name, a redirect loop, an oversize body,
    a body that trickles (a byte every 0.1 s, for 10 s), a 404. Every request is recorded (path, Host header)."""

    png = b""
    hits: list = []

    def do_GET(self):
        self.hits.append((self.path, self.headers.get("Host")))
        if self.path == "/seven.png":
            self._answer(200, self.png, "image/png")
        elif self.path == "/to-intranet":
            self._redirect("http://intranet.example/seven.png")
        elif self.path == "/loop":
            self._redirect("/loop")
        elif self.path == "/big":
            self._answer(200, b"\x89PNG" + b"0" * 300_000, "image/png")
        elif self.path == "/slow":
            self._trickle()
        else:
            self._answer(404, b"secret internal page", "text/plain")

    def _answer(self, status, body, kind):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _trickle(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", "200")
        self.end_headers()
        try:
            for _ in range(100):
                self.wfile.write(b"0")
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:  # the server under test gave up and closed the connection
            pass

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def image_host(serve):
    seven = _digit(serve())
    _ImageHost.png, _ImageHost.hits = seven, []
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHost)
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    yield host.server_address[1]
    host.shutdown()
    host.server_close()


@pytest.fixture
def names(monkeypatch):
    """Simulated name resolution: the table's names resolve to its addresses; any other name resolves only as a
    numeric address (AI_NUMERICHOST: never DNS). Returns the table and the list of names looked up."""
    real = socket.getaddrinfo
    table = {"intranet.example": ["10.0.0.5"], "metadata.example": ["169.254.169.254"],
             "mixed.example": ["93.184.216.34", "192.168.1.7"], "public.example": ["127.0.0.1"]}  # fmt: skip
    looked_up = []

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        looked_up.append(host)
        if host in table:
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                    for a in table[host]]  # fmt: skip
        return real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return table, looked_up


def test_is_public_address():
    refused = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
               "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "fec0::1", "ff02::1",
               "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:a00:1::", "64:ff9b::a00:1", "2001:db8::1"]  # fmt: skip
    for address in refused:
        assert not is_public_address(ipaddress.ip_address(address)), address
    for address in ["8.8.8.8", "93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8"]:
        assert is_public_address(ipaddress.ip_address(address)), address


def test_remote_images_refuse_non_public_addresses_with_one_generic_error(serve, image_host, names):
    server = serve(allow_remote_images=True)
    port = image_host
    urls = [f"http://127.0.0.1:{port}/seven.png", f"http://[::1]:{port}/seven.png",
            f"http://[::ffff:127.0.0.1]:{port}/seven.png", f"http://intranet.example:{port}/seven.png",
            "http://metadata.example/latest/meta-data/", f"http://mixed.example:{port}/seven.png",
            f"http://0.0.0.0:{port}/seven.png", "http://127.0.0.1:1/closed-port.png",
            "http://no-such-host.invalid/seven.png", f"ftp://127.0.0.1:{port}/seven.png"]  # fmt: skip
    messages = set()
    for url in urls:
        response = httpx.post(f"{server.url}/v1/chat/completions", json=_chat_body(url), timeout=60)
        error = _assert_error(response, 400, param="messages[0].content[0].image_url")
        assert str(port) not in error["message"] and "404" not in error["message"]
        messages.add((error["message"], error["code"]))
    # Only http(s) URLs reach the fetcher: ftp is refused by shape; every fetched URL fails the same way.
    assert len(messages - {m for m in messages if "must be a base64 data URL" in m[0]}) == 1
    assert _ImageHost.hits == []  # nothing on loopback was ever contacted
    assert "intranet.example" in names[1] and "mixed.example" in names[1]
    answer = httpx.post(f"{server.url}/v1/chat/completions", json=_chat_body(_data_url(_ImageHost.png)), timeout=300)
    assert "seven" in answer.json()["choices"][0]["message"]["content"].lower()  # still serving


def test_remote_images_follow_redirects_checking_each_address(serve, image_host, names, monkeypatch):
    # 127.0.0.1 stands for a public host here (names["public.example"]); every other address keeps the real policy.
    monkeypatch.setattr(remote_module, "_address_allowed",
                        lambda address: str(address) == "127.0.0.1" or is_public_address(address))  # fmt: skip
    limits = ServerLimits(max_image_bytes=200_000, max_redirects=3, remote_image_timeout=1.0)
    server = serve(allow_remote_images=True, limits=limits)
    port = image_host
    base = f"http://public.example:{port}"

    answer = httpx.post(f"{server.url}/v1/chat/completions", json=_chat_body(f"{base}/seven.png"), timeout=300)
    assert answer.status_code == 200, answer.text
    assert "seven" in answer.json()["choices"][0]["message"]["content"].lower()
    assert _ImageHost.hits == [("/seven.png", f"public.example:{port}")]  # the checked address, the name as Host

    generic = set()
    for path in ("/to-intranet", "/loop", "/big", "/slow", "/missing"):
        _ImageHost.hits.clear()
        names[1].clear()
        started = time.monotonic()
        response = httpx.post(f"{server.url}/v1/chat/completions", json=_chat_body(base + path), timeout=60)
        assert time.monotonic() - started < 6  # the download's time is capped (1 s here), not the trickle's 10 s
        error = _assert_error(response, 400, param="messages[0].content[0].image_url", code="invalid_image_url")
        assert "secret" not in error["message"] and "302" not in error["message"]
        generic.add(error["message"])
        if path == "/to-intranet":
            assert "intranet.example" in names[1]  # the redirect's host was checked, and refused
        if path == "/loop":
            assert len(_ImageHost.hits) == limits.max_redirects + 1
    assert len(generic) == 1  # a refused redirect, a loop, an oversize or slow body and a 404 look the same
    _still_serving(server)


# -- 4. API key ------------------------------------------------------------------------------------------------------------


def test_an_empty_api_key_is_refused_before_anything_loads():
    for key in ("", "   ", "\t"):
        with pytest.raises(ValueError, match="--api_key is empty"):
            resolve_api_key(key, environ={})
        with pytest.raises(ValueError, match="BAGEL_API_KEY is empty"):
            resolve_api_key(None, environ={"BAGEL_API_KEY": key})
        with pytest.raises(ValueError, match="api_key"):
            ServerConfig(api_key=key)
    with pytest.raises(ValueError, match="whitespace"):
        resolve_api_key(" key ", environ={})
    assert resolve_api_key(None, environ={}) is None
    assert resolve_api_key(None, environ={"BAGEL_API_KEY": "from-env"}) == "from-env"
    assert resolve_api_key("from-option", environ={"BAGEL_API_KEY": ""}) == "from-option"


# -- 5. clients that hang up, requests that time out ---------------------------------------------------------------------


def _post_raw(server, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = _connect(server)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)  # fmt: skip
    return sock


def test_a_queued_request_whose_client_hung_up_is_dropped_unrun(serve):
    server = serve(max_batch_size=1)
    gate = _Gate(server.worker)
    metrics = server.app.state.metrics
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(_digit, server, 1)
        _wait_until(gate.entered.is_set, what="the worker to start the first job")
        sock = _post_raw(server, "/v1/images/generations",
                         {"prompt": "a handwritten digit two", "size": "64x64", "seed": 2, **STEPS})
        _wait_until(lambda: server.worker.depth() == 1, what="the second request to queue")
        sock.close()  # the client hangs up while its request waits
        _wait_until(lambda: server.worker._queue and server.worker._queue[0].cancelled, what="the job to be cancelled")
        gate.release.set()
        assert blocker.result(300)
    _wait_until(lambda: metrics.dropped("generate", "disconnected") == 1, what="the drop to be counted")
    assert [job.payload.seed for job in gate.ran] == [1]  # the hung-up request never ran
    assert server.worker.queued_bytes() == 0
    assert 'bagel_jobs_dropped_total{kind="generate",reason="disconnected"} 1' in httpx.get(f"{server.url}/metrics").text
    _still_serving(server)


def test_a_queued_request_past_its_timeout_is_dropped_unrun(serve):
    server = serve(max_batch_size=1, request_timeout=1.0)
    gate = _Gate(server.worker)
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(httpx.post, f"{server.url}/v1/images/generations", timeout=300,
                              json={"prompt": "a handwritten digit one", "size": "64x64", "seed": 1, **STEPS})
        _wait_until(gate.entered.is_set, what="the worker to start the first job")
        late = httpx.post(f"{server.url}/v1/images/generations", timeout=60,
                          json={"prompt": "a handwritten digit two", "size": "64x64", "seed": 2, **STEPS})
        _assert_error(late, 504, code="timeout")
        gate.release.set()
        blocker.result(300)  # itself past the timeout: 504 too, but it ran
    _wait_until(lambda: server.app.state.metrics.dropped("generate", "timeout") == 1, what="the drop to be counted")
    assert [job.payload.seed for job in gate.ran] == [1]


def test_a_running_image_call_stops_once_its_client_is_gone(serve, digits_pipe):
    server = serve(max_batch_size=1)
    gate = _Gate(server.worker, hold=lambda jobs: _wait_until(lambda: jobs[0].cancelled, what="the client to leave"))
    sock = _post_raw(server, "/v1/images/generations",
                     {"prompt": "a handwritten digit two", "size": "64x64", "seed": 2, "num_inference_steps": 50})
    _wait_until(gate.entered.is_set, what="the worker to take the job")
    sock.close()
    _wait_until(lambda: gate.results, what="the call to end")
    assert digits_pipe.interrupt  # left its denoising loop at the first step: nobody waited for the image
    _still_serving(server)


def test_a_streamed_chat_stops_generating_when_the_client_goes_away(serve):
    server = serve()
    seven = _data_url(_digit(server))
    full = httpx.post(f"{server.url}/v1/chat/completions", json=_chat_body(seven, max_tokens=16), timeout=300).json()
    assert full["usage"]["completion_tokens"] > 1

    gate = _Gate(server.worker, hold=lambda jobs: _wait_until(lambda: jobs[0].cancelled, what="the client to leave"))
    sock = _post_raw(server, "/v1/chat/completions", _chat_body(seven, max_tokens=16, stream=True))
    received = b""
    for _ in range(1000):  # the stream has started: headers and the first (role) chunk
        received += sock.recv(65536)
        if b"chat.completion.chunk" in received:
            break
    assert b"chat.completion.chunk" in received
    _wait_until(gate.entered.is_set, what="the worker to take the job")
    sock.close()
    _wait_until(lambda: gate.results, what="generate to end")
    (result,) = gate.results[0]
    assert result["usage"]["completion_tokens"] == 1  # stopped at the first token once the client had gone
    assert server.worker.depth() == 0
    answer = httpx.post(f"{server.url}/v1/chat/completions", json=_chat_body(seven, max_tokens=16), timeout=300)
    assert answer.json()["choices"][0]["message"]["content"] == full["choices"][0]["message"]["content"]


# -- 6. options accepted and ignored -------------------------------------------------------------------------------------


def test_output_format_is_produced_or_refused(serve, tmp_path):
    server = serve(image_dir=tmp_path)
    request = {"prompt": "a handwritten digit seven", "size": "64x64", "seed": 0, **STEPS}
    png = _digit(server)
    assert png == _digit(server, output_format="png")  # the default, unchanged
    for name, pil_name in (("jpeg", "JPEG"), ("webp", "WEBP")):
        answer = httpx.post(f"{server.url}/v1/images/generations", json={**request, "output_format": name,
                                                                         "output_compression": 80}, timeout=300)
        assert answer.status_code == 200 and answer.json()["output_format"] == name
        image = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
        assert image.format == pil_name and image.size == (64, 64)
    url = httpx.post(f"{server.url}/v1/images/generations", timeout=300,
                     json={**request, "output_format": "webp", "response_format": "url"}).json()["data"][0]["url"]
    served = httpx.get(url)
    assert served.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(served.content)).format == "WEBP"

    for fields, param in (({"output_format": "gif"}, "output_format"), ({"output_format": 7}, "output_format"),
                          ({"output_compression": 50}, "output_compression"),
                          ({"output_format": "jpeg", "output_compression": 101}, "output_compression"),
                          ({"background": "transparent"}, "background")):  # fmt: skip
        response = httpx.post(f"{server.url}/v1/images/generations", json={**request, **fields}, timeout=60)
        error = _assert_error(response, 400, param=param)
        if param == "output_format":
            assert "['jpeg', 'png', 'webp']" in error["message"]
    edit = httpx.post(f"{server.url}/v1/images/edits", files={"image": ("seven.png", png, "image/png")}, timeout=60,
                      data={"prompt": "change the digit to three", "output_format": "tiff"})
    _assert_error(edit, 400, param="output_format")
    _still_serving(server)


def test_a_batch_wait_longer_than_the_timeout_is_refused():
    with pytest.raises(ValueError, match="--batch_wait_ms .*--request_timeout"):
        ServerConfig(batch_wait=2.0, request_timeout=1.0)
    with pytest.raises(ValueError, match="--batch_wait_ms"):
        check_timing(600.0, 600.0)
    with pytest.raises(ValueError, match="--batch_wait_ms"):
        check_timing(600.0, -0.001)
    with pytest.raises(ValueError, match="--request_timeout"):
        check_timing(float("inf"), 0.01)
    for name in ("max_batch_size", "max_queue", "max_queue_bytes"):
        with pytest.raises(ValueError, match=name):
            ServerConfig(**{name: 0})
    check_timing(600.0, 0.01)


# -- 7. client mistakes are 400s, a full disk is a 507 -----------------------------------------------------------------


def test_client_mistakes_get_400_naming_the_field(serve):
    server = serve()
    hi = '"messages": [{"role": "user", "content": "hi"}]'
    big = "1" + "0" * 400
    cases = [
        ("/v1/images/generations", '{"prompt": "x", "n": ' + big + "}", "n"),
        ("/v1/images/generations", '{"prompt": "x", "n": ' + "9" * 5000 + "}", "n"),  # past Python's digit limit
        ("/v1/images/generations", '{"prompt": "x", "seed": ' + big + "}", "seed"),
        ("/v1/images/generations", '{"prompt": "x", "timestep_shift": ' + big + "}", "timestep_shift"),
        ("/v1/images/generations", '{"prompt": "x", "cfg_interval": [0, ' + big + "]}", "cfg_interval"),
        ("/v1/images/generations", '{"prompt": "x", "num_inference_steps": 1e309}', "num_inference_steps"),
        ("/v1/images/generations", '{"prompt": "x", "response_format": {}}', "response_format"),
        ("/v1/chat/completions", "{" + hi + ', "max_tokens": 1e309}', "max_tokens"),
        ("/v1/chat/completions", "{" + hi + ', "max_tokens": ' + big + "}", "max_tokens"),
        ("/v1/chat/completions", "{" + hi + ', "temperature": ' + big + "}", "temperature"),
        ("/v1/chat/completions", "{" + hi + ', "top_p": -' + big + "}", "top_p"),
        ("/v1/chat/completions", "{" + hi + ', "stream": true, "stream_options": 5}', "stream_options"),
        ("/v1/chat/completions", "{" + hi + ', "model": ' + "[" * 500 + "]" * 500 + "}", "model"),
        ("/v1/chat/completions", '{"messages": [{"role": ' + "[" * 500 + "]" * 500 + ', "content": "hi"}]}',
         "messages[0].role"),
        ("/v1/chat/completions", "[" * 100000 + "]" * 100000, None),  # nested past the recursion limit
        ("/v1/chat/completions", '{"messages": ' + "[" * 100000 + "]" * 100000 + "}", None),
    ]  # fmt: skip
    for path, body, param in cases:
        response = httpx.post(f"{server.url}{path}", content=body, headers={"Content-Type": "application/json"},
                              timeout=60)  # fmt: skip
        error = _assert_error(response, 400, param=param)
        if param is not None:
            assert f"`{param}" in error["message"] and len(error["message"]) < 300, error
        else:
            assert "nested too deeply" in error["message"]
    form = httpx.post(f"{server.url}/v1/images/edits", timeout=60, data={"prompt": "x", "cfg_interval": "[" * 20000},
                      files={"image": ("a.png", _png_bytes(Image.new("RGB", (64, 64))), "image/png")})
    _assert_error(form, 400, param="cfg_interval")
    assert 'status="500"' not in httpx.get(f"{server.url}/metrics").text
    _still_serving(server)


def test_the_pipelines_refusals_name_the_field_before_queueing(serve):
    """The bounds are the pipeline's: the server passes on what the client set, and the pipeline's own checks refuse a
    bad value before the request is queued, as a 400 naming the field with the pipeline's message."""
    server = serve()
    gate = _Gate(server.worker)
    gate.release.set()
    request = {"prompt": "a handwritten digit seven", "seed": 0, **STEPS}
    cases = [
        ({"size": "72x64"}, "size", "must be divisible by"),
        ({"size": "1024x1024"}, "size", "exceeds the model's largest image side"),
        ({"cfg_text_scale": 0.5}, "cfg_text_scale", "`cfg_text_scale` must be a number in [1.0"),
        ({"cfg_interval": [0.9, 0.1]}, "cfg_interval", "`cfg_interval` must be (start, end)"),
        ({"cfg_renorm_type": "local"}, "cfg_renorm_type", "`cfg_renorm_type` must be one of"),
        ({"timestep_shift": 0}, "timestep_shift", "`timestep_shift` must be a number in"),
        ({"num_inference_steps": 0}, "num_inference_steps", "`num_inference_steps` must be a positive integer"),
        ({"prompt": "   "}, "prompt", "A prompt is empty"),
        ({"think": True, "think_do_sample": True, "think_temperature": 0}, "think_temperature", "`think_temperature`"),
    ]  # fmt: skip
    for fields, param, message in cases:
        response = httpx.post(f"{server.url}/v1/images/generations", json={**request, **fields}, timeout=60)
        error = _assert_error(response, 400, param=param, code="invalid_value")
        assert message in error["message"], error
    assert gate.ran == []  # none was queued
    _still_serving(server)


def test_a_full_image_folder_answers_507_without_a_path(serve, tmp_path, monkeypatch):
    server = serve(image_dir=tmp_path / "served")
    request = {"prompt": "a handwritten digit seven", "size": "64x64", "seed": 0, "response_format": "url", **STEPS}
    real_write = outputs_module.write_image_file

    def full_disk(path, data):
        with open(path, "xb") as file:  # a partial file, as a real full disk leaves one
            file.write(data[:10])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(outputs_module, "write_image_file", full_disk)
    response = httpx.post(f"{server.url}/v1/images/generations", json=request, timeout=300)
    error = _assert_error(response, 507, code="image_storage_full")
    assert error["type"] == "server_error" and "folder is full" in error["message"]
    assert str(tmp_path) not in response.text and "No space left" not in response.text
    assert list((tmp_path / "served").iterdir()) == []  # the partial file is gone

    def read_only(path, data):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(outputs_module, "write_image_file", read_only)
    response = httpx.post(f"{server.url}/v1/images/generations", json=request, timeout=300)
    _assert_error(response, 503, code="image_storage_unavailable")
    assert str(tmp_path) not in response.text

    _still_serving(server)  # b64_json still works with the folder full
    monkeypatch.setattr(outputs_module, "write_image_file", real_write)
    url = httpx.post(f"{server.url}/v1/images/generations", json=request, timeout=300).json()["data"][0]["url"]
    assert httpx.get(url).status_code == 200


# -- 8. start-up checks before the model loads ---------------------------------------------------------------------------


def test_a_port_out_of_range_or_in_use_is_refused(monkeypatch):
    for port in (0, 65536, 70000, -1):
        with pytest.raises(ValueError, match=r"--port must be an integer in \[1, 65535\]"):
            check_port("127.0.0.1", port)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=f"--port {port} on --host 127.0.0.1 is already in use"):
            check_port("127.0.0.1", port)
    free = _free_port()
    check_port("127.0.0.1", free)
    with socket.socket() as again:  # released: the server can bind it
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", free))

    def no_such_host(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    with pytest.raises(ValueError, match="--host 'no-such-host.invalid' does not resolve"):
        check_port("no-such-host.invalid", free)
