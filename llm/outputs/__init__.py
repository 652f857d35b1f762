r"""What a command writes, and where it may: the output-folder guard (:mod:`.folder`)."""

from .atomic import atomic_write_text
from .folder import (LOCK, SCRATCH, OutputFolderError, atomic_folder, clear_folder, hold_lock, lock_holder,
                     output_path, plan_output, replace_folder)

__all__ = ["OutputFolderError", "SCRATCH", "LOCK", "plan_output", "clear_folder", "replace_folder", "atomic_folder",
           "hold_lock", "lock_holder", "output_path", "atomic_write_text"]
