"""A local HTTP server for weight files: the tests have no internet."""

from __future__ import annotations

import contextlib
import http.server
import re
import threading
from pathlib import Path
from typing import Iterator


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves the server's ``root`` folder with ``Range: bytes=N-`` support, logging each request."""

    server: "WeightsServer"

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        path = srv.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(match[1]) if match and not srv.ignore_range else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if srv.cut_after is not None:  # send only part of the body, then hang up
            body, srv.cut_after = body[: srv.cut_after], None
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class WeightsServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), _RangeHandler)
        self.root = root
        self.requests: list[tuple[str, str | None]] = []
        self.cut_after: int | None = None  # for the next request only
        self.ignore_range = False

    def url(self, name: str) -> str:
        """The URL of ``name`` on this server."""
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


@contextlib.contextmanager
def serve(root: Path) -> Iterator[WeightsServer]:
    """Serves the files under ``root`` on a free port of 127.0.0.1 until the block ends."""
    server = WeightsServer(root)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def write_random_resnet18(root: Path) -> dict[str, Path]:
    """Random torchvision ResNet-18 weights in ``root``: under resnet18.tv_in1k's published file
    name (``.pth``) and as ``resnet18.safetensors``. The BatchNorm statistics are not the
    identity, so kept and re-initialised statistics differ. Returns ``{"pth": ..., "safetensors": ...}``."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    from flaxnets import weights_table

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    state = model.state_dict()
    paths = {"pth": root / weights_table.weights_info("resnet18", "tv_in1k").filename,
             "safetensors": root / "resnet18.safetensors"}
    torch.save(state, paths["pth"])
    save_file({k: v.contiguous() for k, v in state.items()}, str(paths["safetensors"]))
    return paths
