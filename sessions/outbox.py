"""A session's outbox: the replay buffer, the send queue and the backpressure, in one.

Frames enter with ``put`` (serialized once, without ``seq``, and kept without
their opening brace: the wire form is ``{"seq":N,`` and that rest, no slicing);
each gets the next ``seq``. The outbox keeps every frame in one deque, in seq
order. A cursor, ``sent_seq``, says which frames have been written to a socket:
frames after it are *unsent* (the send queue), frames up to it are the replay
buffer.

- The one writer of the attached socket waits with ``wait_unsent``, takes the
  queued frames with ``peek_frames`` and reports the ones it wrote with
  ``mark_sent_many`` (``mark_sent`` for one).
- Only sent frames are evicted, oldest first, beyond ``replay_frames`` or
  ``replay_bytes``.
- ``put`` blocks while the unsent frames are at ``high`` or their bytes at
  ``high_bytes``, until both fall to ``low`` / ``low_bytes``. Producers are the
  request tasks and the sandbox's event callback, so a client that does not
  read pauses its sandbox: memory stays bounded at ``high_bytes`` unsent bytes
  (plus one put's worth, and the dones of requests in flight) plus the replay
  limits, connected or not. Counting frames alone was not enough: a frame can
  be megabytes.
- The frame handler calls ``wait_turn`` before it starts a request, so a
  client that sends requests and reads nothing stops being read (TCP pushes
  back) instead of piling up their answers.
- ``rewind(last_seq)`` (resume): drop the frames the client has, renumber the
  rest after ``last_seq`` behind a new ``ready`` frame (and a ``gap`` frame when
  frames after ``last_seq`` were already evicted), and move the cursor back so
  the new writer sends them all. The client sees seq strictly increasing by 1.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from .protocol import SEQ_HEAD, encode, gap_frame


class ResumeError(ValueError):
    """last_seq names a frame that was never sent."""


class _Frame:
    __slots__ = ("seq", "rest", "t")

    def __init__(self, seq: int, rest: bytes, t: float):
        self.seq = seq
        self.rest = rest  # the encoded frame without its opening brace
        self.t = t

    def wire(self) -> bytes:
        """The frame as sent: ``{"seq":N,`` and the rest."""
        return SEQ_HEAD % self.seq + self.rest


class Outbox:
    def __init__(
        self,
        *,
        replay_frames: int,
        replay_bytes: int,
        high: int,
        low: int | None = None,
        high_bytes: int | None = None,
        low_bytes: int | None = None,
    ):
        self.replay_frames = max(0, replay_frames)
        self.replay_bytes = max(0, replay_bytes)
        self.high = max(1, high)
        self.low = min(self.high - 1, self.high // 2) if low is None else min(low, self.high - 1)
        self.high_bytes = max(1, high_bytes) if high_bytes is not None else float("inf")
        self.low_bytes = self.high_bytes / 2 if low_bytes is None else min(low_bytes, self.high_bytes)
        self.unsent_bytes = 0  # bytes of the frames after sent_seq
        self.max_unsent_bytes_seen = 0
        self._frames: deque[_Frame] = deque()
        self.next_seq = 1
        self.sent_seq = 0  # last seq written to a socket (completed)
        self.attempted_seq = 0  # last seq handed to a socket send
        self._sent_bytes = 0  # bytes of the frames <= sent_seq still kept
        self._sent_count = 0
        self._can_put = asyncio.Event()
        self._can_put.set()
        self._has_unsent = asyncio.Event()
        self.evicted = 0
        self.max_unsent_seen = 0
        self.closed = False

    # ---- introspection

    @property
    def unsent(self) -> int:
        return self.next_seq - 1 - self.sent_seq

    @property
    def buffered(self) -> int:
        return len(self._frames)

    @property
    def buffered_bytes(self) -> int:
        return sum(len(f.rest) for f in self._frames)

    def stats(self) -> dict[str, int]:
        return {
            "next_seq": self.next_seq,
            "sent_seq": self.sent_seq,
            "unsent": self.unsent,
            "buffered": self.buffered,
            "replay_bytes": self._sent_bytes,
            "evicted": self.evicted,
            "max_unsent_seen": self.max_unsent_seen,
            "high": self.high,
            "unsent_bytes": self.unsent_bytes,
            "max_unsent_bytes_seen": self.max_unsent_bytes_seen,
        }

    @property
    def full(self) -> bool:
        """Producers are paused (frames or bytes at the mark, not yet back to the low one)."""
        return not self._can_put.is_set()

    # ---- producers

    async def put(self, frame: dict[str, Any]) -> int:
        """Queue a frame; waits while the send queue is full. Returns its seq."""
        await self.wait_room()
        return self.put_nowait(frame)

    async def wait_room(self) -> None:
        """Wait while the send queue is full; ConnectionError once closed."""
        while not self._can_put.is_set():
            if self.closed:
                raise ConnectionError("the session is closed")
            await self._can_put.wait()
        if self.closed:
            raise ConnectionError("the session is closed")

    async def wait_turn(self) -> None:
        """Wait until the send queue has had room once; ConnectionError once closed.

        Unlike ``wait_room`` this does not wait again when a producer woken at the same time
        fills the queue first: the frame handler (a new request, a cancel) must not starve behind
        a flood. What it lets past the mark is bounded: a request adds one ``done`` and at most
        ``max_inflight`` are in flight.
        """
        if not self._can_put.is_set():
            await self._can_put.wait()
        if self.closed:
            raise ConnectionError("the session is closed")

    def put_nowait(self, frame: dict[str, Any]) -> int:
        """Queue a frame past the high water mark (control frames only)."""
        return self.put_encoded_many((encode(frame)[1:],))

    @property
    def space(self) -> int:
        """How many frames can be put before the send queue is full."""
        return self.high - self.unsent if self._can_put.is_set() else 0

    def put_encoded_many(self, rests: Any) -> int:
        """Queue serialized frames, each without its opening brace, in order; no waiting (callers
        respect ``space``). Returns the last seq."""
        if self.closed:
            raise ConnectionError("the session is closed")
        t = time.perf_counter()
        seq = self.next_seq
        append = self._frames.append
        added = 0
        for rest in rests:
            append(_Frame(seq, rest, t))
            added += len(rest)
            seq += 1
        self.next_seq = seq
        n = self.unsent
        if n > self.max_unsent_seen:
            self.max_unsent_seen = n
        b = self.unsent_bytes = self.unsent_bytes + added
        if b > self.max_unsent_bytes_seen:
            self.max_unsent_bytes_seen = b
        if n >= self.high or b >= self.high_bytes:
            self._can_put.clear()
        self._has_unsent.set()
        return seq - 1

    # ---- the writer

    async def wait_unsent(self) -> None:
        """Return when there is a frame to send; ConnectionError once closed."""
        while True:
            if self.closed:
                raise ConnectionError("the session is closed")
            if self.sent_seq + 1 < self.next_seq:
                return
            self._has_unsent.clear()
            await self._has_unsent.wait()

    def peek_frames(self, limit: int) -> list[_Frame]:
        """Up to ``limit`` unsent frames from the cursor on (``seq``, ``rest``, ``t`` queued; ``wire()``)."""
        first = self._frames[0].seq
        start = self.sent_seq + 1 - first
        out = [self._frames[i] for i in range(start, min(len(self._frames), start + limit))]
        if out:
            self.attempted_seq = max(self.attempted_seq, out[-1].seq)
        return out

    def mark_sent(self, seq: int) -> None:
        """The frame ``seq`` reached the socket: advance the cursor, evict, wake producers."""
        self.mark_sent_many(seq, seq)

    def mark_sent_many(self, first: int, last: int, nbytes: int | None = None) -> None:
        """Frames ``first`` to ``last`` (seq numbers read before the write) reached the socket;
        ``nbytes``, when the writer counted it, is the sum of their ``rest`` lengths."""
        if first != self.sent_seq + 1 or last < first:
            return  # the outbox was rewound meanwhile
        if nbytes is None:
            frames = self._frames
            base = frames[0].seq
            nbytes = sum(len(frames[i].rest) for i in range(first - base, last - base + 1))
        self._sent_bytes += nbytes
        self.unsent_bytes -= nbytes
        self.sent_seq = last
        self._sent_count += last - first + 1
        while self._sent_count and (self._sent_count > self.replay_frames or self._sent_bytes > self.replay_bytes):
            old = self._frames.popleft()
            self._sent_bytes -= len(old.rest)
            self._sent_count -= 1
            self.evicted += 1
        if self.unsent <= self.low and self.unsent_bytes <= self.low_bytes:
            self._can_put.set()

    # ---- resume

    def check_rewind(self, last_seq: int) -> None:
        """Raise ResumeError unless ``rewind(last_seq)`` would succeed; changes nothing, so a resume
        can be refused before it takes the session over from its open socket."""
        if last_seq < 0 or last_seq > self.attempted_seq:
            raise ResumeError(f"last_seq {last_seq} is past the last frame sent ({self.attempted_seq})")

    def rewind(self, last_seq: int, ready: dict[str, Any]) -> tuple[int, int]:
        """Rebase the outbox on the client's ``last_seq``; returns (replayed, missed).

        Frames with seq <= last_seq are dropped (the client has them). ``ready``
        gets seq last_seq + 1, then a gap frame if frames were evicted, then
        every kept frame, renumbered; the cursor goes back to last_seq.
        """
        self.check_rewind(last_seq)
        while self._frames and self._frames[0].seq <= last_seq:
            self._frames.popleft()
        first_kept = self._frames[0].seq if self._frames else self.next_seq
        missed = first_kept - last_seq - 1
        now = time.perf_counter()
        head = [_Frame(0, encode(ready)[1:], now)]
        if missed > 0:
            head.append(_Frame(0, encode(gap_frame(missed, last_seq + 1, first_kept - 1))[1:], now))
        replayed = len(self._frames)
        self._frames.extendleft(reversed(head))
        seq = last_seq
        for f in self._frames:
            seq += 1
            f.seq = seq
        self.next_seq = seq + 1
        self.sent_seq = last_seq
        self.attempted_seq = last_seq
        self._sent_bytes = 0
        self._sent_count = 0
        self.unsent_bytes = sum(len(f.rest) for f in self._frames)  # every kept frame is unsent again
        if self.unsent >= self.high or self.unsent_bytes >= self.high_bytes:
            self._can_put.clear()
        self._has_unsent.set()
        return replayed, max(0, missed)

    def close(self) -> None:
        """Wake every waiter; later puts raise ConnectionError."""
        self.closed = True
        self._can_put.set()
        self._has_unsent.set()
