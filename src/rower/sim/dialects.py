"""The three answer formats of the completion endpoints, behind one interface.

`/completion` speaks llama.cpp's native format, `/v1/completions` OpenAI's `text_completion`,
`/v1/chat/completions` OpenAI's `chat.completion`. The server's one generation loop asks the
dialect what to send for each token and at the end.
"""

from __future__ import annotations

from typing import Protocol

from rower.sim import responses
from rower.sim.bodies import Generation
from rower.sim.engine import Run
from rower.sim.responses import SSE_DONE, Identity, Json


class Dialect(Protocol):
    """How one endpoint family answers."""

    def chunks(self, run: Run, piece: str) -> list[Json]:
        """Stream events for one generated piece of text."""
        ...

    def final_chunks(self, run: Run) -> list[Json]:
        """Stream events after the last piece."""
        ...

    def trailer(self) -> bytes:
        """Bytes that close a stream (`data: [DONE]` for OpenAI formats)."""
        ...

    def answer(self, run: Run) -> Json:
        """The whole answer of a request that does not stream."""
        ...


class Native:
    """llama.cpp's `/completion`."""

    def __init__(self, generation: Generation, identity: Identity) -> None:
        self._generation = generation
        self._identity = identity

    def chunks(self, run: Run, piece: str) -> list[Json]:
        return [responses.completion_chunk(run, piece)]

    def final_chunks(self, run: Run) -> list[Json]:
        return [self.answer(run)]

    def trailer(self) -> bytes:
        return b""

    def answer(self, run: Run) -> Json:
        return responses.completion(run, self._generation, self._identity)


class TextCompletion:
    """OpenAI's `/v1/completions`."""

    def __init__(self, generation: Generation, identity: Identity) -> None:
        self._stream = generation.stream
        self._identity = identity
        self._id = responses.completion_id()

    def chunks(self, run: Run, piece: str) -> list[Json]:
        return [responses.text_completion_chunk(piece, self._id, self._identity)]

    def final_chunks(self, run: Run) -> list[Json]:
        return [self.answer(run)]

    def trailer(self) -> bytes:
        return SSE_DONE

    def answer(self, run: Run) -> Json:
        return responses.text_completion(run, self._id, self._identity, stream=self._stream)


class ChatCompletion:
    """OpenAI's `/v1/chat/completions`."""

    def __init__(self, generation: Generation, identity: Identity) -> None:
        self._include_usage = generation.include_usage
        self._identity = identity
        self._id = responses.completion_id()
        self._first = True

    def chunks(self, run: Run, piece: str) -> list[Json]:
        first, self._first = self._first, False
        return responses.chat_chunks(piece, self._id, self._identity, first=first)

    def final_chunks(self, run: Run) -> list[Json]:
        return responses.chat_final_chunks(
            run, self._id, self._identity, include_usage=self._include_usage
        )

    def trailer(self) -> bytes:
        return SSE_DONE

    def answer(self, run: Run) -> Json:
        return responses.chat_completion(run, self._id, self._identity)
