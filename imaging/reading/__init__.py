"""Reading an image without restoring it: the read-only FUSE view of its disk and
partitions, the filesystems' tools that list and extract files, and the file session that
opens a partition once for many reads."""
