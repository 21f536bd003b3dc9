"""What a proxied request needs from the fleet, read from its path and its whole body.

The proxy reads the body before it asks for a slot (a slot is never held while a body is still
arriving) and hands the result of `read_needs` to the fleet core with the slot request. This
module is pure: bytes in, a small frozen value out, or `BadRequest` with a message for the
client. The body itself goes upstream unchanged.
"""

from __future__ import annotations

from typing import Any

import msgspec

from rower.balancer.affinity import BLOCK_BYTES, Chain, chain, conversation_head
from rower.balancer.paths import INFERENCE_PATHS, is_slots_endpoint, normalize

_decode = msgspec.json.decode


class RequestNeeds(msgspec.Struct, frozen=True):
    """What routing knows about one request.

    Attributes:
        path: the normalized path (`/v1/chat/completions`).
        takes_slot: whether it runs on a llama-server slot (and so may wait for one).
        streaming: whether the client asked for a server-sent event stream.
        model: the `model` the body names, if any.
        prefix: the affinity key (`affinity.chain`); empty when the prompt is too short or the
            path reuses no prompt.
        shared_blocks: how many of `prefix`'s blocks are the part conversations often share
            (tools and system prompt).
        head_bytes: the length of the conversation head the key was made from (with the
            answer's prompt tokens, it tells how many bytes a token is).
    """

    path: str
    takes_slot: bool
    streaming: bool = False
    model: str | None = None
    prefix: Chain = ()
    shared_blocks: int = 0
    head_bytes: int = 0

    @property
    def is_slots_endpoint(self) -> bool:
        """Whether the request reaches llama-server's `/slots`."""
        return is_slots_endpoint(self.path)


class BadRequest(Exception):
    """The body cannot be what the path expects; the message tells the client what to send."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def read_needs(path: str, body: bytes, query_model: str | None = None) -> RequestNeeds:
    """What a request to `path` (as received, not yet normalized) with `body` needs.

    `query_model` is the `?model=` of the URL, which GET paths take (`/props?model=X`).

    Raises:
        BadRequest: an inference request whose body is not a JSON object.
    """
    normal = normalize(path)
    if normal not in INFERENCE_PATHS:
        return RequestNeeds(normal, takes_slot=False, model=query_model or _model_of(body))
    if not body.strip():
        # llama-server answers this itself (an error naming the missing field).
        return RequestNeeds(normal, takes_slot=True)
    try:
        document: Any = _decode(body)
    except msgspec.DecodeError as error:
        raise BadRequest(
            f"The request body is not valid JSON ({error}); send a JSON object"
        ) from None
    if not isinstance(document, dict):
        raise BadRequest(
            f"The request body is JSON {type(document).__name__}, not an object; send a JSON object"
        )
    model = document.get("model")
    model = model if isinstance(model, str) and model else None
    head = conversation_head(normal, document)
    return RequestNeeds(
        normal,
        takes_slot=True,
        streaming=document.get("stream") is True,
        model=model,
        prefix=chain(model, head.text),
        shared_blocks=head.shared // BLOCK_BYTES,
        head_bytes=len(head.text),
    )


def _model_of(body: bytes) -> str | None:
    """The `model` of a body that is a JSON object, if any (for paths that take no slot, whose
    bodies the balancer does not check)."""
    if not body.startswith(b"{") or b'"model"' not in body:
        return None
    try:
        document: Any = _decode(body)
    except msgspec.DecodeError:
        return None
    model = document.get("model") if isinstance(document, dict) else None
    return model if isinstance(model, str) and model else None


def with_model(body: bytes, model: str) -> bytes:
    """`body` (a JSON object, or empty) naming `model`: what a router-mode llama-server needs
    when the client named the model otherwise (an alias the balancer maps) or not at all."""
    document: Any = _decode(body) if body.strip() else {}
    if not isinstance(document, dict):
        return body
    document["model"] = model
    return msgspec.json.encode(document)
