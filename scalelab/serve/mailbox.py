"""Engine events handed to the event loop in batches.

The engine thread reports every token. Scheduling each one on the event loop by itself
(``call_soon_threadsafe``) writes a byte to the loop's wake-up pipe per token: a system call that
drops the GIL, which the engine thread must then win back from a busy event loop before it can
go on. Under load that wait, up to the interpreter's switch interval per token, is paid by
every sequence in the batch. A :class:`Mailbox` wakes the loop once for whatever the engine
posts until the loop gets to it, typically one decode step's tokens.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque

_MAILBOXES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox]" = weakref.WeakKeyDictionary()


class Mailbox:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._items: deque = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, queue: asyncio.Queue, item) -> None:
        """Put ``item`` on ``queue`` (an asyncio queue of this loop), from any thread, in order."""
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the event loop closed under us: the server is shutting down
            pass

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, deque()
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


def mailbox_for(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The loop's one mailbox (made on first use)."""
    box = _MAILBOXES.get(loop)
    if box is None:
        box = _MAILBOXES[loop] = Mailbox(loop)
    return box
