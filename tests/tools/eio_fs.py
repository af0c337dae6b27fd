#!/usr/bin/python3
"""A FUSE file system that shows one file, read through to a real file, and
answers EIO (a real I/O error from the kernel's point of view) to every read
past an offset while a flag file exists. tests/offload_io_error.rs mounts it
to see a streamed read fail.

Usage: eio_fs.py SOURCE MOUNTPOINT FLAG_FILE MIN_OFFSET
The file appears as MOUNTPOINT/<basename of SOURCE>. Runs in the foreground
until unmounted (fusermount3 -u MOUNTPOINT).
"""
import errno
import os
import sys

from fusepy import FUSE, FuseOSError, Operations


class OneFile(Operations):
    def __init__(self, source, flag, min_offset):
        self.source = source
        self.name = "/" + os.path.basename(source)
        self.flag = flag
        self.min_offset = min_offset

    def getattr(self, path, fh=None):
        if path == "/":
            st = os.lstat(os.path.dirname(os.path.abspath(self.source)))
        elif path == self.name:
            st = os.lstat(self.source)
        else:
            raise FuseOSError(errno.ENOENT)
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size", "st_uid")
        return {k: getattr(st, k) for k in keys}

    def readdir(self, path, fh):
        return [".", "..", self.name[1:]]

    def open(self, path, flags):
        if path != self.name:
            raise FuseOSError(errno.ENOENT)
        return os.open(self.source, os.O_RDONLY)

    def read(self, path, size, offset, fh):
        if offset + size > self.min_offset and os.path.exists(self.flag):
            raise FuseOSError(errno.EIO)
        return os.pread(fh, size, offset)

    def release(self, path, fh):
        os.close(fh)


if __name__ == "__main__":
    source, mountpoint, flag, min_offset = sys.argv[1:5]
    FUSE(OneFile(source, flag, int(min_offset)), mountpoint, foreground=True, ro=True)
