"""What the filesystem refused, read from the errors of whichever library wrote or read:
Python's OSError, TensorStore's and Rust's error texts, array_record's words. Checkpoints,
exports, data preparation and distillation all turn such an error into one line."""

import contextlib
import errno
import fcntl
import logging
import os
import re

from jaxarch.config import ConfigError

# Refused writes, which some libraries report in their errors' text alone, by errno's
# words (array_record's "write() failed: No space left on device").
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
# flock's errors where the filesystem keeps no locks at all: NFS without its lock daemon
# (ENOLCK), Lustre mounted with noflock (ENOSYS), some FUSE mounts (EOPNOTSUPP).
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)
_unlocked_told = set()


def chain(error):
  """The error and the errors it was raised from or while handling; not past a `raise ...
  from None`, which says the error it replaced is explained (a reader's ConfigError that
  names the file it could not read is no refused write)."""
  while error is not None:
    yield error
    error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def caused_by_os_error(error) -> OSError | None:
  """The OSError behind `error`: raised as one, or reported in the text of TensorStore's
  errors ("... No space left on device [os_error_code='28']"), Rust's (safetensors: "(os
  error 28)") or by its words alone (`_WRITE_ERRNOS`)."""
  for e in chain(error):
    if isinstance(e, OSError):
      return e
    text = str(e)
    code = re.search(r"os_error_code='?(\d+)|\(os error (\d+)\)", text)
    code = int(code[1] or code[2]) if code else next(
        (c for c in _WRITE_ERRNOS if os.strerror(c) in text), None)
    if code is not None:
      return OSError(code, os.strerror(code))
  return None


def reason(os_error: OSError) -> str:
  """The error's words for a message: 'no space left on device', 'Read-only file system'."""
  return ('no space left on device' if os_error.errno == errno.ENOSPC
          else os_error.strerror or str(os_error))


@contextlib.contextmanager
def explained_write_errors(explain):
  """A write that the filesystem refuses (disk full, read-only, permissions), however the
  library that wrote reports it, raises `explain(reason)` instead: one line, where it was
  a traceback from deep inside TFDS or safetensors. Other OS errors pass through (a source
  file that is not gzip, or gone: the error of its reader names it), and so do config
  errors, which are one line already."""
  try:
    yield
  except ConfigError:
    raise  # explained already: a reader's error naming the file it could not read
  except Exception as e:  # pylint: disable=broad-except
    os_error = caused_by_os_error(e)
    if os_error is None or os_error.errno not in _WRITE_ERRNOS:
      raise
    raise explain(reason(os_error)) from None


def lock(file, *, wait: bool, guards: str) -> None:
  """An exclusive `flock` on the open `file`, waiting for it or raising BlockingIOError
  where another process holds it. On a filesystem that keeps no locks, warns once per
  file that `guards` ('two trainers in one workdir') goes unguarded, and carries on: the
  lock only guards against a mistake, which should not stop every run on such a mount."""
  try:
    fcntl.flock(file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
  except BlockingIOError:
    raise
  except OSError as e:
    if e.errno not in _NO_LOCKS:
      raise
    if file.name not in _unlocked_told:
      _unlocked_told.add(file.name)
      logging.warning('jaxarch: %s cannot be locked (%s: the filesystem keeps no file '
                      'locks); going on without the lock, so nothing stops %s', file.name,
                      e.strerror or e, guards)
