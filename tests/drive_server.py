"""Google Drive and a release mirror on 127.0.0.1, for testing downloads without internet.

``DriveProxy`` is an HTTPS proxy: clients reach it through ``HTTPS_PROXY``, it answers
``CONNECT`` for drive.google.com, docs.google.com and drive.usercontent.google.com, wraps
the tunnel in TLS with a certificate from a ``trustme`` CA (the client trusts it through
``REQUESTS_CA_BUNDLE``), and serves what Drive serves to gdown: ``/uc?id=ID`` redirects to
``drive.usercontent.google.com/download``, which answers a large file with the virus-scan
confirm page (a ``download-form`` with hidden id/export/confirm/uuid inputs), then with the
file as an attachment. Per file it can instead answer Drive's quota page, a sign-in page,
or a body shorter than its Content-Length. ``ReleaseMirror`` is the plain HTTP server that
``DPL_ZOO_MIRROR`` points at. Both record every request. ``authors_checkpoint`` writes a file
in the layout of the authors' released checkpoints, to serve.
"""
from __future__ import annotations

import html
import ssl
import threading
import uuid
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlparse

from loopback import LoopbackServer

DRIVE_HOSTS = ("drive.google.com", "docs.google.com", "drive.usercontent.google.com")
QUOTA_MESSAGE = ("Too many users have viewed or downloaded this file recently. Please try accessing the file again "
                 "later. If the file you are trying to access is particularly large or is shared with many people, "
                 "it may take up to 24 hours to be able to view or download the file. If you still can't access a "
                 "file after 24 hours, contact your domain administrator.")


class DriveFile:
    """A file served by the fake Drive; ``mode``: "confirm" (large file: confirm page first),
    "direct", "quota", "signin" (an HTML page without a download) or "truncated"."""

    def __init__(self, name: str, data: bytes, mode: str = "confirm"):
        self.name, self.data, self.mode = name, data, mode
        self.uuid = str(uuid.uuid4())


def _quiet_handler(base):
    class Quiet(base):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, send_bytes: int | None = None):
            self.send_response(code)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body if send_bytes is None else body[:send_bytes])
            self.wfile.flush()
            if send_bytes is not None:  # a transfer that breaks off: close the connection mid-body
                self.close_connection = True

        def _html(self, code: int, page: str):
            self._send(code, page.encode(), {"Content-Type": "text/html; charset=utf-8"})

    return Quiet


class _DriveHandler(_quiet_handler(BaseHTTPRequestHandler)):
    server_ctx: ssl.SSLContext
    files: dict
    requests: list
    host = None

    def do_CONNECT(self):
        host, _, port = self.path.partition(":")
        if host not in DRIVE_HOSTS or port != "443":
            self.requests.append(("CONNECT", self.path))
            return self._send(403, b"only Google Drive hosts")
        self.send_response(200, "Connection Established")
        self.end_headers()
        self.wfile.flush()
        self.connection = self.server_ctx.wrap_socket(self.connection, server_side=True)
        self.rfile = self.connection.makefile("rb")
        self.wfile = self.connection.makefile("wb")
        self.host = host
        self.close_connection = False  # go on reading requests, now inside the TLS tunnel

    def finish(self):
        super().finish()
        if isinstance(self.connection, ssl.SSLSocket):  # the server closes only the socket it accepted
            self.connection.close()

    def do_GET(self):
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.requests.append((self.host, self.path))
        if self.host is None:
            return self._send(400, b"plain HTTP: this proxy serves Drive over CONNECT only")
        file = self.files.get(query.get("id"))
        if file is None:
            return self._html(404, "<html><title>Google Drive - 404</title><body>Not Found</body></html>")
        if self.host == "drive.google.com" and url.path == "/uc":
            target = f"https://drive.usercontent.google.com/download?id={file.name}&export=download"
            return self._send(303, headers={"Location": target})
        if self.host == "drive.usercontent.google.com" and url.path == "/download":
            if file.mode == "quota":
                return self._html(200, _page("Google Drive - Quota exceeded",
                                             f'<p class="uc-error-caption">Sorry, you can\'t view or download this '
                                             f'file at this time.</p><p class="uc-error-subcaption">'
                                             f'{html.escape(QUOTA_MESSAGE)}</p>'))
            if file.mode == "signin":
                return self._html(200, _page("Sign in - Google Accounts", "<p>Sign in to continue to Drive</p>"))
            confirmed = query.get("confirm") == "t" and query.get("uuid") == file.uuid
            if file.mode in ("confirm", "truncated") and not confirmed:
                return self._html(200, _confirm_page(file))
            return self._send(200, file.data, {
                "Content-Type": "application/octet-stream",
                "Content-Disposition": f'attachment; filename="{file.name}.pth.tar"'},
                send_bytes=len(file.data) // 2 if file.mode == "truncated" else None)
        self._html(404, "<html><body>Not Found</body></html>")


def _page(title: str, body: str) -> str:
    return f"<!DOCTYPE html><html><head><title>{title}</title></head><body>{body}</body></html>"


def _confirm_page(file: DriveFile) -> str:
    # one line, as Drive sends it: gdown parses the page line by line
    size = f"{len(file.data) / 1e6:.0f}M"
    form = ('<form id="download-form" action="https://drive.usercontent.google.com/download" method="get">'
            '<input type="submit" id="uc-download-link" class="goog-inline-block jfk-button jfk-button-action" '
            'value="Download anyway"/>'
            f'<input type="hidden" name="id" value="{file.name}">'
            '<input type="hidden" name="export" value="download">'
            '<input type="hidden" name="confirm" value="t">'
            f'<input type="hidden" name="uuid" value="{file.uuid}"></form>')
    return _page("Google Drive - Virus scan warning",
                 f'<div class="uc-main"><p class="uc-warning-caption">Google Drive can\'t scan this file for '
                 f'viruses.</p><p class="uc-warning-subcaption"><span class="uc-name-size"><a href="/open?id='
                 f'{file.name}">{file.name}.pth.tar</a> ({size})</span> is too large for Google to scan for '
                 f'viruses. Would you still like to download this file?</p>{form}</div>')


class DriveProxy(LoopbackServer):
    """``with DriveProxy(ca_bundle_path) as drive: drive.add(DriveFile(id, data))``; point
    ``HTTPS_PROXY`` at ``drive.url`` and ``REQUESTS_CA_BUNDLE`` at the bundle it wrote."""

    def __init__(self, ca_bundle_path):
        import trustme
        ca = trustme.CA()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(*DRIVE_HOSTS).configure_cert(ctx)
        ca.cert_pem.write_to_path(str(ca_bundle_path))
        self.ca_bundle = str(ca_bundle_path)
        self.files: dict[str, DriveFile] = {}
        handler = type("Drive", (_DriveHandler,), {"server_ctx": ctx, "files": self.files})
        super().__init__(handler)
        handler.requests = self.requests

    def add(self, file: DriveFile) -> DriveFile:
        self.files[file.name] = file
        return file


class _MirrorHandler(_quiet_handler(BaseHTTPRequestHandler)):
    files: dict
    requests: list
    together: threading.Barrier

    def do_GET(self):
        self.requests.append(("GET", self.path))
        name = urlparse(self.path).path.lstrip("/")
        entry = self.files.get(name)
        if entry is None:
            return self._html(404, "<html><body>404 Not Found</body></html>")
        data, mode = entry
        if mode == "together":  # answer two clients at the same moment: hold the first until the second asks
            try:
                self.together.wait()
            except threading.BrokenBarrierError:  # no second client within the timeout: serve the one there is
                pass
        if mode == "html":  # a captive portal or an error page answered with 200
            return self._html(200, _page("Sign in", "<p>Please sign in to access this network.</p>"))
        if mode == "unsized":  # close-delimited body: the client cannot tell it was cut short
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        self._send(200, data, {"Content-Type": "application/octet-stream"},
                   send_bytes=len(data) // 2 if mode == "truncated" else None)


class ReleaseMirror(LoopbackServer):
    """A plain HTTP file server: ``mirror.add("name.pth.tar", data, mode)`` with mode
    "file", "html" (a page instead of the file), "truncated" (short body, full Content-Length),
    "unsized" (short body without Content-Length) or "together" (the file, sent to two clients
    at once: the first request waits up to ``together_timeout`` seconds for the second)."""

    def __init__(self, together_timeout: float = 3.0):
        self.files: dict[str, tuple[bytes, str]] = {}
        handler = type("Mirror", (_MirrorHandler,), {"files": self.files,
                                                     "together": threading.Barrier(2, timeout=together_timeout)})
        super().__init__(handler)
        handler.requests = self.requests

    def add(self, name: str, data: bytes, mode: str = "file") -> None:
        self.files[name] = (data, mode)


def authors_checkpoint(path, arch="resnet50", num_classes=1000, seed=0):
    """A .pth.tar as the authors' training code saves it: module.main.* student,
    module.ema.* EMA teacher, SGD momentum buffers, best_acc1 as a tensor (about 3x the
    model's size: 0.3 GB for ResNet-50, like the released files)."""
    import timm
    import torch
    torch.manual_seed(seed)
    student = timm.create_model(arch, num_classes=num_classes).eval()
    teacher = timm.create_model(arch, num_classes=num_classes).eval()
    state = {}
    for prefix, model in (("module.main", student), ("module.ema", teacher)):
        for k, v in model.state_dict().items():
            state[f"{prefix}.{k}" if k.startswith("fc.") else f"{prefix}.backbone.{k}"] = v
    params = list(student.parameters())
    optimizer = {"state": {i: {"momentum_buffer": torch.randn_like(p)} for i, p in enumerate(params)},
                 "param_groups": [{"lr": 0.003, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False,
                                   "params": list(range(len(params)))}]}
    torch.save({"epoch": 50, "arch": arch, "state_dict": state, "best_acc1": torch.tensor(65.6),
                "optimizer": optimizer}, path)
    return student, teacher
