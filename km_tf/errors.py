"""The errors km-tf raises for bad input, one family under `KMError`.

Every message names the problem and the fix, so a program can print it as
one line: the apps catch `KMError` once (`km_tf.cli.common.run_program`).
Each error also keeps the built-in nature callers rely on (`ValueError` for
bad values and files, `RuntimeError` for what failed while running), so
`except ValueError` code keeps working.
"""


class KMError(Exception):
    """Base class of km-tf's own errors."""


class TaskFileError(KMError, ValueError):
    """A task file that cannot be loaded into this model."""


class UnsupportedLayerError(KMError, ValueError):
    """A layer that Kernel Modulation cannot rewrite."""


class ModelFileError(KMError, ValueError):
    """A model file (e.g. a base `.keras`) that cannot be loaded."""


class DataError(KMError, ValueError):
    """A dataset that cannot train or evaluate a classifier as asked.

    E.g. fewer than two classes (where every prediction is right), or image
    files that do not decode; the message names the files or classes.
    """


class ClusterError(KMError, RuntimeError):
    """A TPU or worker that cannot be reached."""


class ResumeError(KMError, ValueError):
    """A backup of an interrupted run that the current settings cannot
    resume."""


class ExportError(KMError, ValueError):
    """Bad input to an export: the message names the problem and the fix."""


class BudgetError(KMError, ValueError):
    """No searched configuration fits the per-task size budget."""


class WeightsUnavailableError(KMError, RuntimeError):
    """Pretrained weights cannot be fetched (e.g. offline)."""


class MicroRuntimeError(KMError, RuntimeError):
    """TFLite Micro cannot run a model; the message names the cause."""


class MicroArenaTooSmallError(MicroRuntimeError):
    """The tensor arena given to TFLite Micro cannot hold the model."""


class PackError(KMError, ValueError):
    """A task pack, plan or template that cannot be applied: wrong or
    corrupt file, or files that do not belong together."""
