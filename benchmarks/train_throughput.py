"""Training and inference throughput: flaxnets under ``jax.jit`` against the same torchvision/timm
architecture in PyTorch (eager, and ``torch.compile`` where it works), in one process.

For each model both frameworks get the same batch, resolution and precision and synthetic data
already on the device. A training step is forward, backward, SGD-momentum update and BatchNorm
statistics. After warm-up the frameworks are timed in alternating rounds (so machine noise hits
both alike) and the median round is reported. Prints a Markdown table and writes JSON.

Each round starts with one settling step that the rate leaves out (its time is kept in the JSON as
``*_first_step_s_rounds``): on the virtual machines this project measures on, free 2 MiB blocks are
handed back to the host two seconds after they are freed (virtio-balloon free page reporting), and
the first step that touches them again pays ~1-2 s of kernel time. XLA returns a step's temporaries
to the OS after every call, so that cost fell on flaxnets' first step after each PyTorch round
(PyTorch keeps its heap), cost it ~20% in three-step rounds, and is absent in a training run, whose
steps follow each other without pauses.

    python benchmarks/train_throughput.py                        # CPU: small resolution and batch
    python benchmarks/train_throughput.py --device gpu --image-size 224 --batch 256 --precision bf16

Memory: on GPU, for JAX the compiled training step's buffers (XLA's memory analysis: arguments,
outputs and temporaries, less donated aliases) and for PyTorch ``torch.cuda.max_memory_allocated``;
on CPU, for both, the rise of the process's peak resident memory (Linux ``VmHWM``, reset before
each phase) while the step is built, compiled and warmed up.

On the CPU the process runs again with glibc's huge-page tunable, as ``python -m train`` does
(``train/host_memory.py``; both frameworks get it); ``--host-memory default`` leaves glibc as it comes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The registry's torchvision is a CUDA build whose compiled ops do not load on CPU torch; the
# model definitions need none of them.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

import flaxnets  # noqa: E402
from flaxnets.torch_weights import torch_counterpart  # noqa: E402
from train.optim import make_optimizer, make_schedule  # noqa: E402
from train.recipes import Recipe  # noqa: E402
from train.host_memory import restart_with_huge_pages  # noqa: E402
from train.steps import create_state, train_step, train_step_compiler_options  # noqa: E402

DEFAULT_MODELS = ("resnet50", "resnext50_32x4d", "vgg16", "densenet121", "googlenet_bn", "xception")
AUX_WEIGHT = 0.3  # GoogLeNet's auxiliary losses, in both frameworks


# ----------------------------------------------------------------------------- memory helpers
def _rss_mb(field: str) -> float:
    """VmRSS or VmHWM of this process in MiB (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakMemory:
    """Peak memory added during a ``with`` block: device allocator peaks on GPU, VmHWM on CPU."""

    def __init__(self, device: str, framework: str):
        self.device, self.framework, self.mb = device, framework, None

    def __enter__(self):
        if self.device == "gpu":
            if self.framework == "torch":
                torch.cuda.reset_peak_memory_stats()
        else:
            try:  # give freed memory back, then reset the high-water mark to the current size
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self._base = _rss_mb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device != "gpu":
            self.mb = round(_rss_mb("VmHWM") - self._base, 1)
        elif self.framework == "torch":
            self.mb = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        # JAX on GPU: the caller reads the compiled step's memory analysis instead (the allocator's
        # peak cannot be reset between models).


# ----------------------------------------------------------------------------- JAX side
def jax_runner(name: str, args, num_classes: int):
    """(train_fn, infer_fn, compile_seconds, step MiB) for the flaxnets model; each fn runs n steps and blocks."""
    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    model = flaxnets.create_model(name, num_classes=num_classes, dtype=dtype)
    recipe = Recipe(name="benchmark", model=name, schedule="constant", lr=0.01, epochs=1)
    tx = make_optimizer(recipe, make_schedule(recipe, 1))
    state = create_state(model, tx, args.image_size, seed=0)
    key = jax.random.key(0)
    images = jax.random.normal(key, (args.batch, args.image_size, args.image_size, 3), jnp.float32)
    batch = {"image": images, "label": jax.random.randint(key, (args.batch,), 0, num_classes)}
    aux = AUX_WEIGHT if name.startswith("googlenet") else 0.0
    step = jax.jit(lambda s, b: train_step(s, b, num_classes=num_classes, aux_loss_weight=aux), donate_argnums=0,
                   compiler_options=train_step_compiler_options(jax.default_backend()))
    infer = jax.jit(lambda s, x: s.apply_fn(
        {"params": s.params, **({"batch_stats": s.batch_stats} if s.batch_stats else {})}, x, train=False))
    start = time.perf_counter()
    step_compiled = step.lower(state, batch).compile()
    infer_compiled = infer.lower(state, images).compile()
    compile_s = time.perf_counter() - start
    usage = step_compiled.memory_analysis()
    step_mb = None if usage is None else (usage.argument_size_in_bytes + usage.output_size_in_bytes
                                          + usage.temp_size_in_bytes - usage.alias_size_in_bytes) / 2**20
    holder = {"state": state}

    def train(n: int) -> None:
        s = holder["state"]
        for _ in range(n):
            s, metrics = step_compiled(s, batch)
        jax.block_until_ready(metrics["loss"])
        holder["state"] = s

    def inference(n: int) -> None:
        for _ in range(n):
            out = infer_compiled(holder["state"], images)
        out.block_until_ready()

    return train, inference, compile_s, step_mb


# ----------------------------------------------------------------------------- PyTorch side
def torch_runner(name: str, args, num_classes: int, compiled: bool):
    """(train_fn, infer_fn, compile_seconds, None) for the torchvision/timm model, eager or torch.compile'd."""
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    model = torch_counterpart(name, num_classes).to(device)
    if args.device == "gpu":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    if args.device == "gpu":
        images = images.to(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (args.batch,), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    loss_fn = torch.nn.functional.cross_entropy

    def forward_loss(x, y):
        out = model(x)
        if isinstance(out, tuple):  # GoogLeNet in training mode: (logits, aux2, aux1)
            return loss_fn(out[0], y) + AUX_WEIGHT * (loss_fn(out[1], y) + loss_fn(out[2], y))
        return loss_fn(out, y)

    train_forward = torch.compile(forward_loss) if compiled else forward_loss
    infer_forward = torch.compile(model) if compiled else model

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train(n: int) -> None:
        model.train()
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            with amp:
                loss = train_forward(images, labels)
            loss.backward()
            optimizer.step()
        sync()

    def inference(n: int) -> None:
        model.eval()
        with torch.inference_mode(), amp:
            for _ in range(n):
                infer_forward(images)
        sync()

    start = time.perf_counter()
    train(1)  # eager: warm-up; compiled: compiles (the first call is the compile)
    inference(1)
    compile_s = time.perf_counter() - start
    return train, inference, compile_s, None


# ----------------------------------------------------------------------------- driver
def _measure(name: str, args) -> dict:
    num_classes = 1000
    variants = {"jax": lambda: jax_runner(name, args, num_classes),
                "torch": lambda: torch_runner(name, args, num_classes, compiled=False)}
    if args.torch_compile:
        variants["torch.compile"] = lambda: torch_runner(name, args, num_classes, compiled=True)
    runners, result = {}, {"model": name, "image_size": args.image_size, "batch": args.batch,
                           "precision": args.precision}
    for label, build in variants.items():
        _say(f"  {label}: building, compiling, warming up ...")
        try:
            with PeakMemory(args.device, "jax" if label == "jax" else "torch") as memory:
                train, infer, compile_s, step_mb = build()
                train(args.warmup)
                infer(args.warmup)
            if memory.mb is None and step_mb is not None:
                memory.mb = round(step_mb, 1)
        except Exception as err:  # noqa: BLE001 - torch.compile fails on some setups; report and go on
            result[label] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            _say(f"  {label}: failed ({result[label]['error']})")
            continue
        runners[label] = (train, infer)
        result[label] = {"compile_s": round(compile_s, 1), "peak_memory_mb": memory.mb, "train": [], "infer": []}
    first_steps = {label: {"train": [], "infer": []} for label in runners}
    for round_index in range(args.rounds):
        for label, (train, infer) in runners.items():
            for kind, fn in (("train", train), ("infer", infer)):
                start = time.perf_counter()
                fn(1)  # settling step, untimed in the rate: see the module docstring
                first_steps[label][kind].append(time.perf_counter() - start)
                start = time.perf_counter()
                fn(args.steps)
                result[label][kind].append(args.steps * args.batch / (time.perf_counter() - start))
        _say(f"  round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{label} {result[label]['train'][-1]:.1f} img/s" for label in runners))
    for label in runners:
        for kind in ("train", "infer"):
            rates = result[label].pop(kind)
            result[label][f"{kind}_img_s"] = round(statistics.median(rates), 2)
            result[label][f"{kind}_img_s_rounds"] = [round(r, 2) for r in rates]
            result[label][f"{kind}_first_step_s_rounds"] = [round(t, 3) for t in first_steps[label][kind]]
    for label in runners:
        if label != "jax" and "jax" in runners:
            for kind in ("train", "infer"):
                result[f"{kind}_ratio_vs_{label}"] = round(
                    result["jax"][f"{kind}_img_s"] / result[label][f"{kind}_img_s"], 3)
    return result


def _cell(result: dict, label: str, key: str, fmt: str = "{:.1f}") -> str:
    value = result.get(label, {}).get(key)
    return "–" if value is None else fmt.format(value)


def markdown(results: list[dict], torch_compile: bool) -> str:
    """The results as a Markdown table (images/s, ratios flaxnets / PyTorch, compile s, peak MiB)."""
    head = ["model", "train img/s jax", "torch", "ratio"]
    if torch_compile:
        head += ["torch.compile", "ratio"]
    head += ["infer img/s jax", "torch", "ratio"]
    if torch_compile:
        head += ["torch.compile", "ratio"]
    head += ["compile s jax / torch.compile" if torch_compile else "compile s jax", "peak MiB jax / torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r["model"]]
        for kind in ("train", "infer"):
            row += [_cell(r, "jax", f"{kind}_img_s"), _cell(r, "torch", f"{kind}_img_s"),
                    _cell(r, "", "", "") if f"{kind}_ratio_vs_torch" not in r else f"**{r[f'{kind}_ratio_vs_torch']:.2f}x**"]
            if torch_compile:
                ratio = r.get(f"{kind}_ratio_vs_torch.compile")
                row += [_cell(r, "torch.compile", f"{kind}_img_s"), "–" if ratio is None else f"{ratio:.2f}x"]
        compile_cell = _cell(r, "jax", "compile_s")
        if torch_compile:
            compile_cell += " / " + _cell(r, "torch.compile", "compile_s")
        row += [compile_cell, _cell(r, "jax", "peak_memory_mb", "{:.0f}") + " / " + _cell(r, "torch", "peak_memory_mb", "{:.0f}")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def cpu_description() -> dict:
    """The CPU's model name and widest x86 vector extension (from /proc/cpuinfo where there is one).

    The ratios depend on it: PyTorch's oneDNN kernels use AVX-512 where the CPU has it, and ran
    2.5-3x faster on this project's AVX-512 machines than on its AVX2 ones, where flaxnets gained less.
    """
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    vector = next((isa for isa in ("avx512f", "avx2", "avx") if isa in flags), None)
    return {"cpu": model, "vector_isa": vector}


def environment(args) -> dict:
    """Hardware and versions the figures were taken on."""
    device = jax.local_devices()[0]
    return {"date": time.strftime("%Y-%m-%d"), "device": getattr(device, "device_kind", device.platform),
            **cpu_description(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "jax": jax.__version__, "flax": __import__("flax").__version__, "torch": torch.__version__,
            "torchvision": __import__("torchvision").__version__, "timm": __import__("timm").__version__,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "args": vars(args)}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated flaxnets names")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: JAX bfloat16 compute with float32 weights; PyTorch autocast to bfloat16")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
    parser.add_argument("--torch-compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time torch.compile")
    parser.add_argument("--host-memory", choices=("huge-pages", "default"), default="huge-pages",
                        help="CPU: huge-pages: run with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, as python -m train "
                             "does (both frameworks get it); default: glibc as it comes")
    parser.add_argument("--out", default="benchmarks/results/train_throughput.json", help="JSON output")
    args = parser.parse_args(argv)
    if argv is None and args.device == "cpu" and args.host_memory == "huge-pages":
        restart_with_huge_pages()
    if args.device == "gpu" and not torch.cuda.is_available():
        parser.error("--device gpu: PyTorch sees no CUDA device")
    if jax.local_devices()[0].platform != ("cpu" if args.device == "cpu" else "gpu"):
        parser.error(f"--device {args.device}: JAX's default device is {jax.local_devices()[0].platform}; "
                     f"set JAX_PLATFORMS={'cpu' if args.device == 'cpu' else 'cuda'}")
    results = []
    for name in args.models.split(","):
        _say(f"{name} at {args.image_size}px, batch {args.batch}, {args.precision} on {args.device}")
        results.append(_measure(flaxnets.resolve_name(name), args))
    env = environment(args)
    table = markdown(results, args.torch_compile)
    print(f"{env['device']} ({env['cpu']}, {env['vector_isa']}, {env['cores']} cores), {args.image_size}px, batch {args.batch}, {args.precision}; "
          f"jax {env['jax']}, torch {env['torch']}; GLIBC_TUNABLES={env['glibc_tunables'] or '(unset)'}; {env['date']}\n")
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"environment": env, "results": results, "markdown": table}, f, indent=2)
    _say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
