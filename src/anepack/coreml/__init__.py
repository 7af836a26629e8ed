"""Core ML shards: the shard builder, the MIL interpreter that checks them on any OS, residency rules."""

import logging
import sys


class _MissingNativeModuleNotes(logging.Filter):
    """coremltools logs, on import, each class of its macOS-only native module it cannot load.
    Off macOS that is expected (anepack builds and interprets there, it never predicts), and
    eight warning lines before every command's output would bury the real ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load _ML")


if sys.platform != "darwin":
    logging.getLogger("coremltools").addFilter(_MissingNativeModuleNotes())
