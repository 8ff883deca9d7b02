"""``python -m flaxnets.convert weights.pth --model resnet50 --out DIR``: PyTorch weights to Orbax.

DIR receives ``variables/`` (an Orbax checkpoint of ``{"params", "batch_stats"}``) and
``model.json`` (the model name and the ``create_model`` options that fit the weights).
:func:`load_converted` reads both back; training (``--init-from``) and evaluation read the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import flax.linen as nn

from flaxnets.registry import create_model, resolve_name

META_FILE = "model.json"
_VARIABLES = "variables"


def save_converted(out_dir: str, name: str, variables: dict[str, Any], **options: Any) -> str:
    """Writes ``variables`` of model ``name`` (built with ``options``) to ``out_dir``; returns its path."""
    import orbax.checkpoint as ocp

    out_dir = os.path.abspath(out_dir)
    target = os.path.join(out_dir, _VARIABLES)
    if os.path.exists(target):
        raise FileExistsError(f"{target} exists; choose another --out or remove it")
    os.makedirs(out_dir, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(target, variables)
    checkpointer.wait_until_finished()
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump({"model": resolve_name(name), "options": options}, f, indent=2)
    return out_dir


def load_converted(directory: str) -> tuple[nn.Module, dict[str, Any]]:
    """Reads a directory written by :func:`save_converted`; returns ``(model, variables)``.

    Raises:
      FileNotFoundError: ``directory`` is not such a checkpoint (the message says what is missing).
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(
            f"{directory} has no {META_FILE}: not a flaxnets checkpoint (write one with `python -m flaxnets.convert`)"
        )
    with open(meta_path) as f:
        meta = json.load(f)
    model = create_model(meta["model"], **meta["options"])
    variables = ocp.StandardCheckpointer().restore(os.path.join(directory, _VARIABLES))
    return model, variables


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m flaxnets.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", help="a PyTorch state dict (.pth) of torchvision's or timm's model")
    parser.add_argument("--model", required=True, help="flaxnets model name, e.g. resnet50 (any of flaxnets.torch_weights.torch_models())")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--transform-input", action="store_true",
        help="googlenet_bn: apply torchvision's input re-normalisation (needed for its pretrained weights)",
    )
    args = parser.parse_args(argv)

    from flaxnets.torch_weights import load_pretrained

    try:
        options = {"transform_input": True} if args.transform_input else {}
        if not os.path.isfile(args.weights):
            raise FileNotFoundError(f"no such file: {args.weights}")
        print(f"reading {args.weights} as {args.model} ...", flush=True)
        model, variables = load_pretrained(args.model, args.weights, **options)
        options = {"num_classes": model.num_classes, **options}
        if hasattr(model, "aux_logits"):
            options["aux_logits"] = model.aux_logits
        out = save_converted(args.out, args.model, variables, **options)
    except (KeyError, ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({resolve_name(args.model)}, {options})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
