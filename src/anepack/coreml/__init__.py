"""Core ML shards: the shard builder, the MIL interpreter that checks them on any OS, residency rules."""
