"""What the benchmarks record about the machine they ran on."""

import platform


def cpu_name() -> str:
  """The CPU model from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
  try:
    with open("/proc/cpuinfo") as f:
      return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor()
