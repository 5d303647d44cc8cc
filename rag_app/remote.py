"""`rag ask` and `rag search` through a running `rag serve` (setting serve.url): the server's
models answer, this process loads none. Same results as in process, as the same JSON."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from rag_app.errors import RagError, SettingsError
from rag_app.settings import Settings


class RemoteRag:
    """A client of the API of `rag_app.server` at serve.url (with serve.token, if set)."""

    def __init__(self, settings: Settings, timeout_s: float = 600) -> None:
        serve = settings.serve
        assert serve.url is not None
        self.url = serve.url.rstrip("/")
        self.settings = settings
        headers = {"Authorization": f"Bearer {serve.token.get_secret_value()}"} \
            if serve.token else {}
        self.client = httpx.Client(base_url=self.url, headers=headers,
                                   timeout=httpx.Timeout(timeout_s, connect=10))

    def search(self, query: str, **options: Any) -> list[dict[str, Any]]:
        body = {"query": query, "collection": self.settings.collection, **_given(options)}
        response = self._call(lambda: self.client.post("/v1/search", json=body))
        return response.json()["hits"]

    def ask(self, question: str, **options: Any) -> Iterator[str | dict[str, Any]]:
        """The answer's text pieces as the server streams them, then the answer as
        `rag ask --json` prints it (the server's `rag` field)."""
        body = {"model": "rag", "stream": True, "collection": self.settings.collection,
                "messages": [{"role": "user", "content": question}], **self._chat(options)}
        request = self.client.build_request("POST", "/v1/chat/completions", json=body)
        response = self._call(lambda: self.client.send(request, stream=True))
        try:
            for line in response.iter_lines():
                data = line.removeprefix("data: ")
                if data == line or not data:  # a comment (": waiting …") or a blank line
                    continue
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise RagError(f"serve.url={self.url}: {event['error']['message']}")
                if "rag" in event:  # the final chunk: the caller prints the final answer
                    yield event["rag"]
                elif content := event["choices"][0]["delta"].get("content"):
                    yield content
        except httpx.HTTPError as e:
            raise RagError(f"serve.url={self.url}: the answer was cut off ({e})") from e
        finally:
            response.close()

    def _chat(self, options: dict[str, Any]) -> dict[str, Any]:
        """`rag ask`'s options as the chat request's fields (greedy = temperature 0)."""
        out = _given(options)
        sample = out.pop("do_sample", None)
        temperature = out.pop("temperature", None)
        if sample is not None:
            out["temperature"] = (temperature or self.settings.generation.temperature) \
                if sample else 0
        if "max_new_tokens" in out:
            out["max_tokens"] = out.pop("max_new_tokens")
        return out

    def _call(self, send: Any) -> httpx.Response:
        try:
            response = send()
        except httpx.HTTPError as e:
            raise RagError(f"cannot reach serve.url={self.url}: {e}") from e
        if response.status_code < 400:
            return response
        response.read()
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {response.status_code}"
        if response.status_code == 401:
            message += " (set serve.token / RAG_SERVE__TOKEN to the server's token)"
        error = SettingsError if response.status_code == 400 else RagError
        raise error(f"serve.url={self.url}: {message}")


def _given(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}
