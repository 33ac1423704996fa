"""Output files that hold guest plaintext (memsave, pmemsave, sev-mem-map, dump-guest-memory): one way to write them.

sevmon often runs as root on hosts shared with other users, and what it writes is decrypted guest memory. QEMU
opens the name with ``open(O_CREAT|O_TRUNC)``: it follows a symlink planted at the name, truncates an existing file
before it knows whether the command will work, and takes the mode from the umask. Here instead:

* the caller runs every check (debug policy, range, RAM) before :func:`output_file` is called;
* a symlink at the final component is refused, and so are a directory and a block device (a dump over a disk would
  destroy it); a FIFO or a character device (a pipe to a compressor, ``/dev/null``) is written as it is, opened
  ``O_NOFOLLOW`` without ``O_CREAT``: it holds no contents to lose;
* for a regular file, or a new name, the bytes go to a new file beside the target (same directory, so same
  filesystem), mode 0600 whatever the umask; only when everything is written is it renamed over the target.
  ``rename`` replaces the directory entry and never follows a link, so a link swapped in after the check is
  replaced, not written through, and a hard link to some other file keeps that file's contents. A refused or failed
  command leaves an existing target exactly as it was, and no partial file.
* that new file has no name while it is written (``O_TMPFILE``): even a daemon killed by SIGKILL half-way through a
  4 GiB dump leaves nothing behind, since the kernel frees a file nobody named. Once written, it is given a name
  beside the target (``linkat`` of ``/proc/self/fd/N``) and renamed at once. Filesystems without ``O_TMPFILE`` (NFS,
  old kernels) get a named ``.NAME.XXXX.sevmon-part`` file created ``O_EXCL``, which only SIGKILL can leave behind.
"""

from __future__ import annotations

import contextlib
import errno as E
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from typing import BinaryIO


class OutputFileError(OSError):
    """The output file cannot be opened, written or put in place; ``str()`` is QEMU's sentence for it."""

    def __str__(self) -> str:
        return self.strerror


def _open_error(path: str, err: int, why: str | None = None) -> OutputFileError:
    return OutputFileError(err, f"Could not open '{path}': {why or os.strerror(err)}")


def check_target(path: str) -> bool:
    """Refuse a name that is a symlink, a directory or a block device, or whose directory does not exist. True when
    the name is a FIFO or a character device (written in place), False for a regular file or a new name."""
    if not path:
        raise _open_error(path, E.ENOENT)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        directory = os.path.dirname(path) or "."
        if not os.path.isdir(directory):
            raise _open_error(path, E.ENOENT) from None
        return False
    except OSError as e:
        raise _open_error(path, e.errno or E.EIO) from None
    if stat.S_ISLNK(st.st_mode):
        raise _open_error(path, E.ELOOP, "it is a symbolic link; sevmon does not write through links")
    if stat.S_ISDIR(st.st_mode):
        raise _open_error(path, E.EISDIR)
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
        return True
    if not stat.S_ISREG(st.st_mode):
        raise _open_error(path, E.EINVAL, "not a regular file, a FIFO or a character device")
    return False


def _unnamed(directory: str) -> int | None:
    """A new file in ``directory`` that has no name yet (``O_TMPFILE``), or None where the filesystem or the kernel
    has none (or ``/proc``, through which it gets its name, is not mounted): the caller then makes a named one."""
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno in (E.EOPNOTSUPP, E.EISDIR, E.EINVAL):
            return None
        raise


class OutputFile:
    """A file being written beside ``path``; :meth:`commit` puts it in place, :meth:`abort` removes it.

    ``tmp`` is the name of a named partial file, None while the file is unnamed (``unnamed``) or written in place."""

    def __init__(self, path: str):
        self.path, self.tmp, self.unnamed = path, None, False
        if check_target(path):
            try:  # O_NONBLOCK: a FIFO nobody reads is ENXIO at once instead of a monitor that hangs
                fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as e:
                raise _open_error(path, e.errno or E.EIO) from None
            os.set_blocking(fd, True)
            self.file = os.fdopen(fd, "wb")
            return
        directory, name = os.path.split(path)
        try:
            fd = _unnamed(directory or ".")
            if fd is None:
                fd, self.tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".sevmon-part", dir=directory or ".")
            else:
                self.unnamed = True
        except OSError as e:
            raise _open_error(path, e.errno or E.EIO) from None
        os.fchmod(fd, 0o600)  # mkstemp's mode already, O_TMPFILE's less the umask; said here because it is the point
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def commit(self) -> None:
        """Flush, close and rename over the target (which is checked once more: still no link, no directory)."""
        try:
            self.file.flush()  # a write error (ENOSPC...) surfaces here, before the target is touched
            if self.tmp is None and not self.unnamed:  # a FIFO or a character device, written in place
                self.file.close()
                return
            check_target(self.path)
            try:
                if self.unnamed:
                    self.tmp = self._name_it()
                self.file.close()
                os.rename(self.tmp, self.path)  # atomic; replaces a link or hard link itself, never follows it
            except OSError as e:
                raise OutputFileError(e.errno, f"Could not write '{self.path}': {os.strerror(e.errno or E.EIO)}") \
                    from None
        except BaseException:
            self.abort()
            raise

    def _name_it(self) -> str:
        """Give the unnamed file a fresh name beside the target (``linkat`` never replaces a name: EEXIST retries)."""
        directory, name = os.path.split(self.path)
        # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N; os.link uses plain link(2), which does not follow it,
        # unless a directory fd is given
        proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            while True:
                tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}.sevmon-part")
                try:
                    os.link(str(self.file.fileno()), tmp, src_dir_fd=proc, follow_symlinks=True)
                    return tmp
                except FileExistsError:
                    continue
        finally:
            os.close(proc)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)


@contextlib.contextmanager
def output_file(path: str) -> Iterator[OutputFile]:
    """``with output_file(path) as f: f.write(...)``: in place if the block ends normally, gone if it raises."""
    out = OutputFile(path)
    try:
        yield out
    except BaseException:
        out.abort()
        raise
    out.commit()
