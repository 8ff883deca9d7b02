"""Cold and warm load time of published weights: ``create_model(name, pretrained=True)``.

Serves a checkpoint from 127.0.0.1 as the publisher's file (``FLAXNETS_MIRROR``), then times
the first load into an empty cache (download, SHA-256, torch-free read, conversion, cache write)
and a second one (the converted cache only), each with a forward pass, and reports which of
torch and tensorflow got imported. Runs without torch::

    python benchmarks/pretrained_load.py --checkpoint resnet50.pth --model resnet50 --tag tv_in1k

A checkpoint that is not the publisher's own file (e.g. random weights written by torch for the
benchmark) has another hash; the table's expected hash is then replaced by the file's for this
run, and the script says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import http.server
import os
import shutil
import sys
import tempfile
import threading
import time


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def main() -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a torchvision/timm .pth or .safetensors file")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--tag", default="tv_in1k")
    args = parser.parse_args()

    import numpy as np

    import flaxnets
    from flaxnets import weights_table

    entry = flaxnets.weights_info(args.model, args.tag)
    served = tempfile.mkdtemp()
    shutil.copy(args.checkpoint, os.path.join(served, entry.filename))
    digest = hashlib.sha256(open(args.checkpoint, "rb").read()).hexdigest()
    if not digest.startswith(entry.sha256_prefix):
        print(f"{args.checkpoint} is not {entry.filename} (sha256 {digest[:8]}): expecting its own hash for this run")
        weights_table._TABLE = tuple(dataclasses.replace(w, sha256_prefix=digest[:8]) if w == entry else w
                                     for w in weights_table._TABLE)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=served))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ.update(FLAXNETS_HOME=tempfile.mkdtemp(), FLAXNETS_MIRROR=f"http://127.0.0.1:{server.server_address[1]}/",
                      NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    images = np.zeros((1, 224, 224, 3), np.float32)
    for label in ("cold (download, verify, read, convert, cache)", "warm (converted cache)"):
        start = time.perf_counter()
        model = flaxnets.create_model(args.model, pretrained=args.tag)
        loaded = time.perf_counter() - start
        model(images, train=False).block_until_ready()
        print(f"{label}: load {loaded:.2f} s, load + first forward {time.perf_counter() - start:.2f} s")
    imported = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "tensorflow"})
    print(f"imported: {', '.join(imported) or 'neither torch nor tensorflow'}")
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
