"""Python clients of ``qrm serve`` (httpx): :class:`QRMClient` (blocking) and :class:`AsyncQRMClient`.

    with QRMClient("http://127.0.0.1:8000", api_key=...) as rm:
        res = rm.score([{"prompt": "2+2?", "response": " 4"}], standardize=True)
        res[0]["credits"], res[0]["offsets"], res[0]["score"]
        rm.get_reward(queries=[prompt + response], prompts=[prompt])  # OpenRLHF's format

A refused request raises :class:`QRMServerError` with the server's status, field and message.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import httpx

Item = Union[dict, tuple]


class QRMServerError(RuntimeError):
    """The server answered with an error status (its JSON ``error`` object, when it sent one)."""

    def __init__(self, status: int, field: Optional[str], message: str):
        super().__init__(f"qrm serve answered {status}" + (f" ({field})" if field else "") + f": {message}")
        self.status, self.field, self.message = status, field, message


def _items(items: Iterable[Item]) -> list[dict]:
    """``(prompt, response)`` tuples or item dicts -> item dicts."""
    return [dict(prompt=it[0], response=it[1]) if isinstance(it, tuple) else dict(it) for it in items]


def _headers(api_key: Optional[str]) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _payload(items, standardize: bool, truncate: bool, prompts_rendered: bool) -> dict:
    body: dict[str, Any] = {"items": _items(items)}
    if standardize:
        body["standardize"] = True
    if truncate:
        body["truncate"] = True
    if prompts_rendered:
        body["prompts_rendered"] = True
    return body


def _check(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            err = response.json().get("error", {})
        except ValueError:
            err = {}
        raise QRMServerError(response.status_code, err.get("field"), err.get("message", response.text))
    return response.json()


class QRMClient:
    """Blocking client; one connection pool, reused across calls."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: Optional[str] = None,
                 timeout: float = 300.0, **httpx_kwargs):
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout, **httpx_kwargs)

    def score(self, items: Iterable[Item], standardize: bool = False, truncate: bool = False,
              prompts_rendered: bool = False) -> list[dict]:
        """``POST /v1/score``: one result per item (token ids, texts, offsets, credits, score)."""
        return _check(self._http.post("/v1/score", json=_payload(items, standardize, truncate,
                                                                  prompts_rendered)))["results"]

    def get_reward(self, queries: list[str], prompts: list[str]) -> list[float]:
        """``POST /get_reward`` (OpenRLHF's remote reward model): one sequence reward per query."""
        return _check(self._http.post("/get_reward", json={"query": queries, "prompts": prompts}))["rewards"]

    def health(self) -> dict:
        return _check(self._http.get("/health"))

    def metrics(self) -> str:
        r = self._http.get("/metrics")
        if r.status_code >= 400:
            _check(r)
        return r.text

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "QRMClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncQRMClient:
    """asyncio client (same methods, awaitable); many concurrent calls share one connection pool."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: Optional[str] = None,
                 timeout: float = 300.0, **httpx_kwargs):
        self._http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout,
                                       **httpx_kwargs)

    async def score(self, items: Iterable[Item], standardize: bool = False, truncate: bool = False,
                    prompts_rendered: bool = False) -> list[dict]:
        r = await self._http.post("/v1/score", json=_payload(items, standardize, truncate, prompts_rendered))
        return _check(r)["results"]

    async def get_reward(self, queries: list[str], prompts: list[str]) -> list[float]:
        return _check(await self._http.post("/get_reward", json={"query": queries, "prompts": prompts}))["rewards"]

    async def health(self) -> dict:
        return _check(await self._http.get("/health"))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncQRMClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
