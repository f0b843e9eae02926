"""The FUSE side: path classes, the inode table, the filesystem logic and its pyfuse3 adapter."""
