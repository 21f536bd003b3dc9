"""Which request paths take a llama-server slot, and which reach `/slots`."""

from __future__ import annotations

INFERENCE_PATHS = frozenset(
    {
        "/completion",
        "/completions",
        "/v1/completions",
        "/chat/completions",
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/messages",
        "/infill",
        "/embedding",
        "/embeddings",
        "/v1/embeddings",
        "/rerank",
        "/reranking",
        "/v1/rerank",
        "/v1/reranking",
    }
)


def normalize(path: str) -> str:
    """`/v1/chat/completions/` and `//v1//chat/completions` both name the chat endpoint.

    Dot segments are resolved as the upstream URL resolves them, so `/x/../slots` is `/slots`.
    """
    parts: list[str] = []
    for part in path.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part and part != ".":
            parts.append(part)
    return "/" + "/".join(parts)


def takes_slot(path: str) -> bool:
    """Whether a request to `path` runs on a slot (and so must wait for a free one)."""
    return normalize(path) in INFERENCE_PATHS


def is_slots_endpoint(path: str) -> bool:
    """Whether `path` is llama-server's `/slots` or below it (`/slots/0?action=save`)."""
    normal = normalize(path)
    return normal == "/slots" or normal.startswith("/slots/")


def path_class(path: str) -> str:
    """A low-cardinality label for metrics: the inference path itself, `slots` or `other`."""
    normal = normalize(path)
    if normal in INFERENCE_PATHS:
        return normal
    return "slots" if is_slots_endpoint(normal) else "other"
