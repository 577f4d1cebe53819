"""The bash worker: one persistent ``bash`` per bash context, driven by the agent like the other workers.

The driver below is bash itself, so that ``cd``, variables, functions, aliases and
background jobs of one cell are there in the next: each cell is sourced by the one
shell (not run in a child), at the top level (not in a function, where ``declare``
would make locals). ``source`` rather than ``eval`` because a ``return`` in the
SIGINT trap ends a sourced file: an interrupt stops the cell, and the shell with its
state lives on.

Framing, agent -> worker, on GROUNDLOOP_CMD_FD: NUL-terminated fields (bash reads
them with ``read -d ''``, and no bash string can hold a NUL, so none is ever
ambiguous): the cell number, the count of environment pairs, each name and value
(a name after ``=``, with an empty value: unset, and not put back after the cell), then the code. Worker -> agent, on GROUNDLOOP_RES_FD: one JSON line per cell,
``{"t":"done","ok":true,"exit_code":N}``: a failing command is the cell's exit
status, not an error of the request (like ``exec``).

The run's environment (the session's and the request's ``env``) is exported for
the cell and put back as it was afterwards.
"""

from __future__ import annotations

DRIVER = r"""
__gl_cmd=$GROUNDLOOP_CMD_FD __gl_res=$GROUNDLOOP_RES_FD
unset GROUNDLOOP_CMD_FD GROUNDLOOP_RES_FD
echo 1000 2>/dev/null >/proc/self/oom_score_adj
__gl_dir=$(mktemp -d "${TMPDIR:-/tmp}/bash-context.XXXXXX") || exit 70
__gl_file=$__gl_dir/cell
__gl_in_cell=
trap '[[ -n $__gl_in_cell ]] && return 130' INT
shopt -s expand_aliases
while :; do
  IFS= read -r -d '' -u "$__gl_cmd" __gl_n || break
  IFS= read -r -d '' -u "$__gl_cmd" __gl_count || break
  __gl_keys=() __gl_prev=()
  for ((__gl_i = 0; __gl_i < __gl_count; __gl_i++)); do
    IFS= read -r -d '' -u "$__gl_cmd" __gl_k || break 2
    IFS= read -r -d '' -u "$__gl_cmd" __gl_v || break 2
    if [[ $__gl_k == =* ]]; then  # "=NAME": unset for good, not put back (see cell())
      unset "${__gl_k:1}"
      continue
    fi
    __gl_keys+=("$__gl_k")
    __gl_prev+=("$(declare -p "$__gl_k" 2>/dev/null)")
    export "$__gl_k=$__gl_v"
  done
  IFS= read -r -d '' -u "$__gl_cmd" __gl_code || break
  printf '%s\n' "$__gl_code" >"$__gl_file"
  __gl_in_cell=1
  source "$__gl_file"
  __gl_status=$?
  __gl_in_cell=
  for __gl_i in "${!__gl_keys[@]}"; do
    unset "${__gl_keys[__gl_i]}"
    [[ -n ${__gl_prev[__gl_i]} ]] && eval "${__gl_prev[__gl_i]}"
  done
  printf '{"t":"done","ok":true,"exit_code":%d}\n' "$__gl_status" >&"$__gl_res"
done
rm -rf "$__gl_dir"
"""


def argv(bash: str) -> list[str]:
    return [bash, "--noprofile", "--norc", "-c", DRIVER, "bash"]


def cell(code: str, n: int, env: dict | None) -> bytes:
    """The frame of one cell (see the module's docstring). NULs were refused before (``check``)."""
    fields = [str(n), str(len(env or {}))]
    for k, v in (env or {}).items():
        fields += [k, v] if v is not None else ["=" + k, ""]  # None: unset for good
    fields.append(code)
    return "\0".join(fields).encode("utf-8", "surrogateescape") + b"\0"


def check(code: str) -> str | None:
    """Why ``code`` cannot be a bash cell, or None."""
    return "bash code cannot contain a NUL character" if "\0" in code else None
