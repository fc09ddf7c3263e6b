"""The post index: the exact flat store and its GPU engines, the snapshot file, the write-ahead log,
and the live index (one writer, any number of followers) built from them."""
