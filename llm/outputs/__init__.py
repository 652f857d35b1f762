r"""What a command writes, and where it may: the output-folder guard (:mod:`.folder`)."""

from .folder import SCRATCH, OutputFolderError, atomic_folder, clear_folder, plan_output, replace_folder

__all__ = ["OutputFolderError", "SCRATCH", "plan_output", "clear_folder", "replace_folder", "atomic_folder"]
