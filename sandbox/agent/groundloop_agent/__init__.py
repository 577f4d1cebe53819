"""groundloop in-container agent (stdlib only), run as ``python3 -P -m groundloop_agent``.

One stdlib-only process per sandbox, the child of the container's pid 1, which is the
agent's own init (``init.py``: non-dumpable, reaps orphans; no docker-init). It speaks newline-delimited JSON over its stdin/stdout, which
are the container's attached streams, and runs many requests at once, each
tagged by the server-chosen request id ``rid``.

Server -> agent: ``{"op": ..., "rid": ..., ...}``.
Agent -> server (``ev``):

- ``hello``   once at start: ``{"ev":"hello","agent":1,"pid":..,"languages":[..],"egress":bool}`` (egress: its proxy runs, egress.py)
- ``out``     output lines of a request: ``{"ev":"out","rid":..,"s":"stdout","lines":[..]}``
- ``result``  a MIME bundle of a run: ``{"ev":"result","rid":..,"data":{..},"main":bool}``
- ``done``    exactly one per request: ``{"ev":"done","rid":..,"ok":bool,...}``
- ``pout``    output of a background process: ``{"ev":"pout","proc":..,"s":..,"lines":[..]}``
- ``pexit``   a background process ended: ``{"ev":"pexit","proc":..,"exit_code":..}``
- ``log``     a diagnostic that belongs to no request.
- ``watching``, ``fev`` (file events, batched), ``progress``, ``chunk``: of watch_files and the
  chunked transfers (``watch``, ``transfer``).

Output is read from pipes as the children write it (no polling, no per-cell
buffering), split into lines, decoded as UTF-8 with replacement, long lines
split at ``line_max`` bytes, and dropped past a per-request byte cap with a
``truncated`` mark on the ``done`` event.  When the server stops reading, the
agent stops reading the children's pipes, so a flooding child blocks instead
of filling memory.

Modules: ``wire`` (the frame stream), ``pipes`` (children's output),
``contexts`` (persistent workers), ``procs`` (process trees, background
processes), ``files`` (file operations), ``watch`` (watch_files, inotify),
``transfer`` (chunked upload and download), ``agent`` (dispatch and main loop),
``init`` (pid 1 of the container, and the non-dumpable guard of the frame
stream). Every answer is held to the ``max_frame_bytes`` a request names.
"""
