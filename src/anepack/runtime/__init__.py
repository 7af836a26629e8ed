"""Generation over built shards: the shard runtime (MIL interpreter or Core ML), sampling, and the
host files (config, vocabulary) a shard directory carries beside the shards."""

from anepack.runtime.backends import BACKENDS
from anepack.runtime.host_files import read_config, tokenizer_path, write_host_files
from anepack.runtime.sampling import GenerationResult, Sampler, Timings, generate
from anepack.runtime.shards import ShardRuntime

__all__ = [
    "BACKENDS", "GenerationResult", "Sampler", "ShardRuntime", "Timings",
    "generate", "read_config", "tokenizer_path", "write_host_files",
]
