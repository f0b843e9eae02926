"""Local state: the replicated-file store (RAM over LMDB) and backing-store I/O."""
