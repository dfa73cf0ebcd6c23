"""llmtrain.runtime.data: collect → clean → tokenize → shard, and the loader that streams shards back."""
