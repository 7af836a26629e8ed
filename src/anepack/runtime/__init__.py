"""Generation over built shards: the shard runtime (MIL interpreter or Core ML), sampling, and the
host files (config, vocabulary) a shard directory carries beside the shards.

Submodules are imported where used (``anepack.runtime.shards`` pulls in coremltools), so the
CLI starts without it.
"""
