"""Run tokens fence claims between drivers: no two runs, threads or processes may ever share one."""

from __future__ import annotations

import os
import threading

from crm_states.spec import run_token


def test_tokens_are_unique_across_threads_and_look_like_uuid4_hex() -> None:
    made: list[list[str]] = [[] for _ in range(4)]

    def make(into: list[str]) -> None:
        into.extend(run_token() for _ in range(5000))

    threads = [threading.Thread(target=make, args=(into,)) for into in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    tokens = [token for into in made for token in into]
    assert len(set(tokens)) == len(tokens) == 20_000
    assert all(len(token) == 32 and int(token, 16) >= 0 for token in tokens)


def test_a_forked_child_draws_its_own_tokens() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next tokens, to the parent
        os.close(read)
        os.write(write, " ".join(run_token() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    ours = [run_token() for _ in range(3)]
    with os.fdopen(read) as pipe:
        theirs = pipe.read().split()
    os.waitpid(pid, 0)
    assert len(theirs) == 3 and not set(theirs) & set(ours)
    assert {token[:20] for token in theirs} != {token[:20] for token in ours}
