"""``python -m flaxnets [PATTERN]``: prints the table of registered models."""

from __future__ import annotations

import argparse
import sys
import time

from flaxnets import list_models, summarize


def main(argv: list[str] | None = None) -> int:
    """Prints parameters, GFLOPs (XLA cost analysis) and input size of every matching model."""
    parser = argparse.ArgumentParser(prog="python -m flaxnets", description=__doc__)
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'resnext*'")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
    args = parser.parse_args(argv)

    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}; try `python -m flaxnets` for all", file=sys.stderr)
        return 1
    print("| model | family | params | GFLOPs | input |")
    print("|---|---|---:|---:|---:|")
    start = time.perf_counter()
    for i, name in enumerate(names, start=1):
        row = summarize(name, flops=not args.no_flops)
        gflops = "-" if row.gflops is None else f"{row.gflops:.2f}"
        print(f"| {row.name} | {row.family} | {row.params:,} | {gflops} | {row.input_size} |", flush=True)
        print(f"  [{i}/{len(names)}] {time.perf_counter() - start:.0f}s", file=sys.stderr, end="\r")
    print(file=sys.stderr)
    print("GFLOPs: one 1-image forward pass, XLA's count (a multiply-add counts 2).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
