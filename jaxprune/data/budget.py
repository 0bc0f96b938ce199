"""A calibration set must fit in memory: refused before anything is allocated, not by the OOM killer."""

from __future__ import annotations

from jaxprune.errors import UsageError

F32 = 4
# The run holds at least the pruned and the dense residual streams [S, T, D] in float32 at
# once (jaxprune.footprint counts more: dense outputs, the next streams); two is a floor, so
# that a run refused here could never have fitted.
STREAMS = 2


def available_bytes() -> int | None:
  """MemAvailable of /proc/meminfo (None where there is none to read)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    return None
  return None


def calibration_bytes(samples: int, seq_len: int, hidden: int) -> int:
  """The least memory `samples` windows of `seq_len` tokens take in a run: their ids and streams."""
  return samples * seq_len * (F32 + STREAMS * hidden * F32)


def check_calibration_size(samples: int, seq_len: int, hidden: int, available: int | None = None) -> None:
  from jaxprune.footprint import human

  available = available_bytes() if available is None else available
  need = calibration_bytes(samples, seq_len, hidden)
  if available is None or need <= available:
    return
  most = available // calibration_bytes(1, seq_len, hidden)
  raise UsageError(f"--calib-samples {samples} x --seq-len {seq_len} tokens need at least {human(need)} "
                   f"({STREAMS} float32 streams of width {hidden}), more than the {human(available)} of memory "
                   f"available; use at most --calib-samples {most} (or a shorter --seq-len)")


def device_bytes() -> int | None:
  """The memory of the first local device, where self-generated text is sampled: its allocator's
  limit on an accelerator; None on a CPU, whose memory is the host's."""
  import jax

  dev = jax.local_devices()[0]
  if dev.platform == "cpu":
    return None
  try:
    return (dev.memory_stats() or {}).get("bytes_limit")
  except (NotImplementedError, RuntimeError):  # a backend without memory statistics: nothing to check against
    return None


def check_generation_size(need: int, fix: str, available: int | None = None, device: int | None = None) -> None:
  """Self-generated calibration text is sampled by the whole model at once, on one device: refused
  where its weights (`need` bytes) would not fit in that device's memory (`device`, default
  `device_bytes()`) or, on a CPU, in the host memory available."""
  from jaxprune.footprint import human

  device = device_bytes() if device is None else device
  # On an accelerator the blocks are read one at a time into its memory; on a CPU, the host's.
  room, where = (device, "of the device that samples it") if device is not None else (
      available_bytes() if available is None else available, "available")
  if room is not None and need > room:
    raise UsageError(f"generating calibration text holds the whole model in memory ({human(need)}), more than "
                     f"the {human(room)} {where}; {fix}")
