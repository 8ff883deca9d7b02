"""What a command printed itself, without the C++ start-up logs of libraries it loads."""

from __future__ import annotations

import re

# absl/glog lines ("I0000 00:00:1795... cudart_stub.cc:31] ...") and absl's pre-init notice. With the
# [plan] extra installed on a machine without CUDA, `import jax` logs three such lines: the CUDA
# plugin's extensions announce that they found no driver.
_LIBRARY_LOG = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d+\.\d+ |WARNING: All log messages before absl::InitializeLog\(\))")


def message_lines(stderr: str) -> list[str]:
    """``stderr``'s lines less the libraries' start-up log lines."""
    return [line for line in stderr.strip().splitlines() if not _LIBRARY_LOG.match(line)]
