"""The root of every error vllm-qvlm reports to a user.

Each package raises a subclass that says what went wrong and names the file, tensor or
module at fault (:class:`~qvlm_kernels.format.FormatError` for checkpoints and configs,
``CalibrationError``, ``UnsupportedModelError``, ...). The ``qvlm`` command line prints
any :class:`QVLMError` as one line and exits with status 2; anything else is a bug and
keeps its traceback.
"""


class QVLMError(Exception):
    """An error in what the user gave (a checkpoint, a dataset, a flag), not in this code."""
