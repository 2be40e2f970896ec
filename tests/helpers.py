"""Code shared by several test modules."""
import os
import threading
import time

# How long a call may run before a test calls it hung. Tests never assert how long something took:
# they make the wrong behaviour take far longer than this (an hour's wait, a server that never
# answers), so a busy machine cannot fail them and a regression cannot hang the suite.
HANG_LIMIT = 60.0


def finishes(fn, *args, **kwargs):
    """fn(*args, **kwargs)'s result; an AssertionError if it is still running after HANG_LIMIT."""
    result, error = [], []

    def call():
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            error.append(e)

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(HANG_LIMIT)
    assert not t.is_alive(), f"{getattr(fn, '__name__', fn)} still running after {HANG_LIMIT:.0f} s"
    if error:
        raise error[0]
    return result[0]


def remove_cgroups(*paths) -> None:
    """Remove cgroup directories in the order given (innermost first). A cgroup stays busy until its
    last process is reaped, so each removal is tried again for up to 5 s; one already gone is fine."""
    for path in paths:
        for _ in range(50):
            try:
                os.rmdir(path)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


class RecordingEvent(threading.Event):
    """An abort event that is never set and records each wait asked of it, returning at once: the
    waits a sender chose, without spending them."""

    def __init__(self):
        super().__init__()
        self.waits = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return False
