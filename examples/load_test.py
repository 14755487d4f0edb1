"""
Load test of `bagel serve`: 1, 4 and 16 concurrent clients send seeded text-to-image requests (or chat requests with
--endpoint chat) and the requests/s and latency p50/p90/p99 are printed, for a server without batching
(`--max_batch_size 1`) and with it (the default 8).

    python examples/load_test.py                                 # starts both servers in-process on the digits BAGEL
    python examples/load_test.py --checkpoint CONVERTED_DIR --size 512x512 --steps 20
    python examples/load_test.py --url http://127.0.0.1:8000 --api_key KEY   # a running `bagel serve`

With --url the server's own --max_batch_size applies and one table is printed. Needs the serve extra
(pip install bagel-hf[serve]).
"""

import argparse
import asyncio
import base64
import io
import socket
import threading
import time
from pathlib import Path

import httpx


ROOT = Path(__file__).resolve().parent.parent
DIGITS_CHECKPOINT = ROOT / "checkpoints" / "tiny-bagel-digits"
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def percentile(values: list[float], q: float) -> float:
    """The `q` quantile (0..1) of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class InProcessServer:
    """`bagel serve` in a background thread of this process, on a free loopback port."""

    def __init__(self, pipe, **config):
        import uvicorn

        from diffusers_bagel.serving import ServerConfig, create_app

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        app = create_app(pipe, ServerConfig(model_name="bagel", **config))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(60)


def _digit_data_url() -> str:
    """A small white-on-black test image for chat requests."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64))
    ImageDraw.Draw(image).line([(20, 12), (44, 12), (28, 52)], fill="white", width=5)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def run_clients(url: str, clients: int, per_client: int, args) -> tuple[float, list[float], int]:
    """`clients` concurrent loops of `per_client` requests each; returns (wall seconds, latencies, failures)."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    latencies, failures = [], 0
    image_url = _digit_data_url()

    async def one_client(client_index: int, http: httpx.AsyncClient):
        nonlocal failures
        for request_index in range(per_client):
            seed = client_index * per_client + request_index
            if args.endpoint == "chat":
                path = "/v1/chat/completions"
                body = {"model": args.model, "max_tokens": 8, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": "Which digit is this?"}]}]}  # fmt: skip
            else:
                path = "/v1/images/generations"
                body = {"prompt": f"a handwritten digit {DIGITS[seed % 10]}", "size": args.size, "seed": seed,
                        "num_inference_steps": args.steps}  # fmt: skip
            started = time.perf_counter()
            response = await http.post(url + path, json=body, headers=headers)
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                failures += 1

    async with httpx.AsyncClient(timeout=args.timeout, limits=httpx.Limits(max_connections=clients + 4)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(one_client(index, http) for index in range(clients)))
        return time.perf_counter() - started, latencies, failures


def report(title: str, url: str, args) -> None:
    """Prints one table: a row per concurrency level."""
    print(f"\n{title}")
    print(f"{'clients':>8} {'requests':>9} {'failed':>7} {'req/s':>8} {'p50 s':>8} {'p90 s':>8} {'p99 s':>8}")
    asyncio.run(run_clients(url, 1, 1, args))  # warm-up
    for clients in args.clients:
        wall, latencies, failures = asyncio.run(run_clients(url, clients, args.requests_per_client, args))
        print(f"{clients:>8} {len(latencies):>9} {failures:>7} {len(latencies) / wall:>8.2f} "
              f"{percentile(latencies, 0.5):>8.3f} {percentile(latencies, 0.9):>8.3f} "
              f"{percentile(latencies, 0.99):>8.3f}")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="A running server; default: start servers in-process.")
    parser.add_argument("--checkpoint", type=Path, default=DIGITS_CHECKPOINT, help="In-process: the converted folder.")
    parser.add_argument("--api_key", default=None, help="Bearer token of a running server.")
    parser.add_argument("--model", default="bagel", help="`model` field of chat requests (the server's model id).")
    parser.add_argument("--endpoint", choices=["images", "chat"], default="images", help="What the clients ask.")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="Concurrency levels.")
    parser.add_argument("--requests_per_client", type=int, default=4, help="Requests each client sends per level.")
    parser.add_argument("--size", default="64x64", help="Image size of generation requests.")
    parser.add_argument("--steps", type=int, default=16, help="num_inference_steps of generation requests.")
    parser.add_argument("--max_batch_size", type=int, default=8, help="In-process: the batching server's setting.")
    parser.add_argument("--timeout", type=float, default=600.0, help="Client timeout per request, seconds.")
    args = parser.parse_args()
    if min(args.clients) < 1 or args.requests_per_client < 1 or args.steps < 1:
        parser.error("--clients, --requests_per_client and --steps must be positive")

    if args.url is not None:
        report(f"{args.endpoint} requests against {args.url}", args.url.rstrip("/"), args)
        return

    from diffusers_bagel import BagelPipeline

    pipe = BagelPipeline.from_pretrained(args.checkpoint)
    for title, batch in (("without batching (--max_batch_size 1)", 1),
                         (f"with batching (--max_batch_size {args.max_batch_size})", args.max_batch_size)):  # fmt: skip
        server = InProcessServer(pipe, max_batch_size=batch, max_queue=max(64, 2 * max(args.clients)))
        try:
            report(f"{args.endpoint} requests, {title}, {args.checkpoint.name}", server.url, args)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
