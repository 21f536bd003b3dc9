"""A minimal llama-server look-alike that answers as fast as Python's asyncio can.

For measuring what a proxy costs, the upstream must cost (nearly) nothing and never wait:
`/completion` streams `n_predict` SSE token events, each written on its own, or answers a small
JSON object when `"stream"` is false; `/slots`, `/props` and `/health` say every slot is idle so
an agent can register it. It also records, for the scale scenario, the gap between the end of
each response and the start of the next request (`GET /bench/gaps`).

    python -m bench.fast_upstream PORT [SLOTS] [HOLD_MS]
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time

N_PREDICT = re.compile(rb'"n_predict"\s*:\s*(\d+)')
STREAM_FALSE = re.compile(rb'"stream"\s*:\s*false')
EVENT = b'data: {"content":" tok","stop":false}\n\n'
FINAL = b'data: {"content":"","stop":true}\n\n'
SMALL_JSON = b'{"content":" tok","stop":true,"tokens_predicted":1}'


class Upstream:
    def __init__(self, slots: int, hold: float) -> None:
        self.slots = slots
        self.hold = hold
        self.last_end: float | None = None
        self.gaps: list[float] = []

    def slots_body(self) -> bytes:
        return json.dumps(
            [
                {"id": i, "n_ctx": 4096, "speculative": False, "is_processing": False}
                for i in range(self.slots)
            ]
        ).encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                arrived = time.perf_counter()
                line, _, rest = head.partition(b"\r\n")
                _method, path, _ = line.split(b" ", 2)
                length = 0
                for header in rest.split(b"\r\n"):
                    if header[:15].lower() == b"content-length:":
                        length = int(header[15:])
                body = await reader.readexactly(length) if length else b""
                if path.startswith(b"/completion"):
                    if self.last_end is not None:
                        self.gaps.append(arrived - self.last_end)
                    await self.completion(body, writer)
                    self.last_end = time.perf_counter()
                elif path.startswith(b"/slots"):
                    self.respond(writer, self.slots_body())
                elif path.startswith(b"/props"):
                    props = {"total_slots": self.slots, "model_path": "fast", "model_alias": "fast"}
                    self.respond(writer, json.dumps(props).encode())
                elif path.startswith(b"/bench/gaps"):
                    self.respond(writer, json.dumps(self.gaps).encode())
                else:
                    self.respond(writer, b'{"status":"ok"}')
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def respond(self, writer: asyncio.StreamWriter, body: bytes) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )

    async def completion(self, body: bytes, writer: asyncio.StreamWriter) -> None:
        if self.hold:
            await asyncio.sleep(self.hold)
        if STREAM_FALSE.search(body):
            self.respond(writer, SMALL_JSON)
            return
        found = N_PREDICT.search(body)
        n = int(found.group(1)) if found else 16
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (len(EVENT), EVENT)
        for index in range(n):
            writer.write(chunk)
            if index % 8 == 7:
                await writer.drain()
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(FINAL), FINAL))


async def main(port: int, slots: int, hold: float) -> None:
    upstream = Upstream(slots, hold)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    args = sys.argv[1:]
    uvloop.run(
        main(
            int(args[0]),
            int(args[1]) if len(args) > 1 else 256,
            float(args[2]) / 1000 if len(args) > 2 else 0.0,
        )
    )
