"""train.host_memory: glibc's huge-page tunable, and what it does to a repeated XLA:CPU call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from train import host_memory
from train.host_memory import TUNABLE, huge_page_environment

# One jitted function with a 100 MiB temporary (sin(x) before the matmul): the median page faults
# of a call, after warm-up calls.
_PROBE = textwrap.dedent("""
    import json, resource
    import jax, jax.numpy as jnp
    step = jax.jit(lambda x, w: (jnp.sin(x) @ w).sum())
    x, w = jnp.ones((12800, 2048)), jnp.ones((2048, 16))
    per_call = []
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(x, w).block_until_ready()
        per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps(sorted(per_call[2:])[3]))
""")


def test_the_tunable_is_added_once_and_other_tunables_kept(monkeypatch):
    monkeypatch.setattr(host_memory, "huge_pages_available", lambda: True)
    assert huge_page_environment({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": f"{TUNABLE}=1"}
    other = huge_page_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert other == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{TUNABLE}=1"}
    assert huge_page_environment(other) is None  # already set: no second restart
    assert huge_page_environment({"GLIBC_TUNABLES": f"{TUNABLE}=0"}) is None  # the user's own choice
    assert huge_page_environment({"FLAXNETS_HUGE_PAGES": "0"}) is None
    monkeypatch.setattr(host_memory, "huge_pages_available", lambda: False)
    assert huge_page_environment({"PATH": "/bin"}) is None


def _median_faults(environ: dict[str, str]) -> int:
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=environ, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host_memory.huge_pages_available(), reason="needs glibc 2.35+ and transparent huge pages")
def test_huge_pages_take_the_page_faults_out_of_a_repeated_call():
    plain = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FLAXNETS_HUGE_PAGES")}
    plain["JAX_PLATFORMS"] = "cpu"
    default_faults = _median_faults(plain)
    huge_faults = _median_faults(huge_page_environment(plain))
    # 100 MiB is 25,600 pages of 4 KiB, or 50 huge pages.
    assert default_faults > 12_000, default_faults
    assert huge_faults < default_faults / 10, (huge_faults, default_faults)
