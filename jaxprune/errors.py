"""Exception types. Every message names the value, what was expected and the fix."""


class JaxpruneError(Exception):
  """Base class: the CLI prints these as one line, without a traceback."""


class ConfigError(JaxpruneError, ValueError):
  """A model configuration jaxprune does not support or cannot make sense of."""


class ShapeError(JaxpruneError, ValueError):
  """Parameter shapes disagree with the model description."""


class CheckpointError(JaxpruneError, OSError):
  """A checkpoint is missing, incomplete or corrupt."""


class UsageError(JaxpruneError, ValueError):
  """An argument outside its allowed range."""
