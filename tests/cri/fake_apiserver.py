"""A tiny stand-in for kube-apiserver plus kubelet, enough for ``kubectl exec``, ``attach``
and ``port-forward`` against pods run through our CRI.

It answers discovery and ``GET .../pods/<name>`` with a Running pod, and for
``.../pods/<name>/exec|attach|portforward`` calls the CRI Exec/Attach/PortForward RPC,
then proxies the client's raw connection to the streaming URL it got back (the request
line rewritten to that URL's path, headers passed through) and pipes bytes both ways,
the way kubelet's streaming proxy does. Written independently of the server's code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import grpc

from pycontainerd.api.cri.runtime.v1 import api_pb2
from tests.cri.conftest import CRI

if TYPE_CHECKING:
    from pathlib import Path

RESOURCES = [
    {"name": n, "singularName": "", "namespaced": True, "kind": k, "verbs": v}
    for n, k, v in (
        ("pods", "Pod", ["get", "list"]),
        ("pods/exec", "PodExecOptions", ["create", "get"]),
        ("pods/attach", "PodAttachOptions", ["create", "get"]),
        ("pods/portforward", "PodPortForwardOptions", ["create", "get"]),
    )
]


@dataclass
class Pod:
    sandbox_id: str
    containers: dict[str, str]  # name -> CRI container id


@dataclass
class FakeAPIServer:
    cri: CRI
    pods: dict[str, Pod] = field(default_factory=dict)
    tamper_token: bool = False  # hand out a URL whose token the server never issued
    requests: list[str] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            "apiVersion: v1\nkind: Config\n"
            f"clusters:\n- name: fake\n  cluster:\n    server: {self.url}\n"
            "users:\n- name: me\n  user:\n    token: not-checked\n"
            "contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: me\n"
            "    namespace: default\ncurrent-context: fake\n"
        )
        return path

    # ------------------------------------------------------------------ HTTP

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:  # keep-alive: several requests per connection
                try:
                    head = await r.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [tuple(x.strip() for x in ln.split(":", 1)) for ln in lines[1:] if ln]
                length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
                if length:
                    await r.readexactly(length)
                self.requests.append(f"{method} {target}")
                if not await self._route(method, target, headers, r, w):
                    return
        finally:
            self._tasks.discard(task)
            w.close()

    async def _route(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, ...]],
        r: asyncio.StreamReader,
        w: asyncio.StreamWriter,
    ) -> bool:
        """Answer one request; False when the connection is used up."""
        url = urlsplit(target)
        parts = url.path.strip("/").split("/")
        if url.path == "/api":
            return await _json(w, 200, {"kind": "APIVersions", "versions": ["v1"]})
        if url.path == "/apis":
            return await _json(w, 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        if url.path == "/api/v1":
            doc = {"kind": "APIResourceList", "groupVersion": "v1", "resources": RESOURCES}
            return await _json(w, 200, doc)
        if url.path == "/version":
            return await _json(w, 200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0"})
        if len(parts) in (6, 7) and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
            pod = self.pods.get(parts[5])
            if pod is None:
                return await _json(w, 404, _status(404, f'pods "{parts[5]}" not found', "NotFound"))
            if len(parts) == 6:
                return await _json(w, 200, _pod_json(parts[3], parts[5], pod))
            try:
                stream_url = await self._stream_url(parts[6], pod, parse_qs(url.query))
            except grpc.aio.AioRpcError as exc:
                return await _json(w, 500, _status(500, exc.details() or "", "InternalError"))
            if stream_url is None:
                return await _json(w, 404, _status(404, "no such subresource", "NotFound"))
            await _proxy(method, stream_url, url.query, headers, r, w)
            return False
        return await _json(w, 404, _status(404, f"no route for {url.path}", "NotFound"))

    async def _stream_url(self, sub: str, pod: Pod, q: dict[str, list[str]]) -> str | None:
        def flag(name: str) -> bool:
            return q.get(name, [""])[0] in ("1", "true")

        container = q.get("container", [next(iter(pod.containers))])[0]
        rt = self.cri.runtime
        if sub == "exec":
            req = api_pb2.ExecRequest(
                container_id=pod.containers[container], cmd=q.get("command", []),
                tty=flag("tty"), stdin=flag("stdin"), stdout=flag("stdout"),
                stderr=flag("stderr"),
            )  # fmt: skip
            url = (await rt.Exec(req)).url
        elif sub == "attach":
            areq = api_pb2.AttachRequest(
                container_id=pod.containers[container], tty=flag("tty"), stdin=flag("stdin"),
                stdout=flag("stdout"), stderr=flag("stderr"),
            )  # fmt: skip
            url = (await rt.Attach(areq)).url
        elif sub == "portforward":
            preq = api_pb2.PortForwardRequest(pod_sandbox_id=pod.sandbox_id)
            url = (await rt.PortForward(preq)).url
        else:
            return None
        if self.tamper_token:
            url = url.rsplit("/", 1)[0] + "/never-issued"
        return url


async def _proxy(
    method: str,
    stream_url: str,
    query: str,
    headers: list[tuple[str, ...]],
    r: asyncio.StreamReader,
    w: asyncio.StreamWriter,
) -> None:
    u = urlsplit(stream_url)
    ur, uw = await asyncio.open_connection(u.hostname, u.port)
    path = u.path + (f"?{query}" if query else "")
    head = [f"{method} {path} HTTP/1.1", f"Host: {u.netloc}"]
    head += [f"{k}: {v}" for k, v in headers if k.lower() not in ("host", "authorization")]
    uw.write(("\r\n".join(head) + "\r\n\r\n").encode())

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):  # ConnectionError, ENOTCONN on write_eof
            while chunk := await src.read(1 << 16):
                dst.write(chunk)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()

    try:
        await asyncio.gather(pipe(r, uw), pipe(ur, w))
    finally:
        uw.close()


async def _json(w: asyncio.StreamWriter, code: int, doc: dict[str, Any]) -> bool:
    body = json.dumps(doc).encode()
    w.write(
        f"HTTP/1.1 {code} X\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await w.drain()
    return True


def _status(code: int, message: str, reason: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}  # fmt: skip


def _pod_json(ns: str, name: str, pod: Pod) -> dict[str, Any]:
    names = list(pod.containers)
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "uid": pod.sandbox_id[:32]},
        "spec": {"containers": [{"name": n, "image": "busybox"} for n in names]},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {"name": n, "ready": True, "restartCount": 0, "image": "busybox",
                 "imageID": "", "state": {"running": {}}}
                for n in names
            ],
        },
    }  # fmt: skip
