"""CPU overhead of our engine per profile against a bare ``transitions.Machine``.

Path measured (NB profile validation, happy path, one profile per ``Engine.drive`` call as Sefaria's
single-profile path does): [*] -> NotChecked -> RequestedContact -> OkResponse -> WroteSalesforceAppUserUid.

- ours: ``Engine(machines.nb_profile_validation.SPEC)`` with an ``InMemoryCrm`` that finds every profile and
  a store that discards writes; per profile ``prepare`` + ``drive([run])``.
- bare: a ``transitions.Machine`` with the same states and edges (auto_transitions=False), per profile
  ``add_model`` (the [*] -> NotChecked start), the three triggers of the path, ``remove_model``: the same
  per-profile model lifecycle our engine has.

CPU time (``time.process_time``), warm-up first, best of several repeats. Target: ours / bare <= 1.5.
Always exits 0: it is a benchmark, not a test.

    python benchmarks/engine_overhead.py [--profiles N] [--repeats R] [--profile-hotspots]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from transitions import Machine

from crm_states.crm.memory import InMemoryCrm
from crm_states.engine import Engine, trigger_name
from crm_states.records import Position
from machines import nb_profile_validation as nb

TARGET = 1.5
PATH = ["NotChecked", "RequestedContact", "OkResponse", "WroteSalesforceAppUserUid"]


class DiscardingStore:
    """The two ``Store`` methods this path calls: every profile is new, every step is accepted, nothing kept."""

    def position(self, profile_id: int, machine: str) -> Position:
        return Position()

    def commit(self, steps: Sequence[Any]) -> list[None]:
        return [None] * len(steps)


class Plain:
    """A bare model for the bare machine."""


def make_profiles(n: int) -> tuple[list[dict[str, Any]], InMemoryCrm]:
    crm = InMemoryCrm()
    profiles = []
    for i in range(1, n + 1):
        crm.add_app_user(nationbuilder_id=100_000 + i)
        profiles.append({"id": i, "nationbuilder_id": 100_000 + i})
    return profiles, crm


def ours(profiles: list[dict[str, Any]], crm: InMemoryCrm) -> Callable[[], None]:
    engine = Engine(nb.SPEC, DiscardingStore(), context=crm)  # type: ignore[arg-type]
    prepare, drive = engine.prepare, engine.drive

    def go() -> None:
        for profile in profiles:
            drive([prepare(profile)])

    return go


def check_ours(profiles: list[dict[str, Any]], crm: InMemoryCrm) -> None:
    engine = Engine(nb.SPEC, DiscardingStore(), context=crm)  # type: ignore[arg-type]
    run = engine.prepare(profiles[0])
    [result] = engine.drive([run])
    assert result.finished and result.state == PATH[-1], result
    assert [t.dest for t in run.pending] == [] and run.position.state == PATH[-1], run


def bare_machine() -> tuple[Machine, list[str]]:
    diagram = nb.SPEC.diagram
    triggers = {(e.source, e.dest): trigger_name(e.label, e.dest) for e in diagram.edges}
    machine = Machine(model=None, states=list(diagram.states),
                      transitions=[{"trigger": t, "source": s, "dest": d} for (s, d), t in triggers.items()],
                      initial=diagram.initial, auto_transitions=False)
    path = [triggers[(a, b)] for a, b in zip(PATH, PATH[1:])]
    return machine, path


def bare(profiles: list[dict[str, Any]]) -> Callable[[], None]:
    machine, (t1, t2, t3) = bare_machine()
    add, remove = machine.add_model, machine.remove_model

    def go() -> None:
        for _ in profiles:
            model = Plain()
            add(model)
            model.trigger(t1)
            model.trigger(t2)
            model.trigger(t3)
            remove(model)

    return go


def check_bare() -> None:
    machine, path = bare_machine()
    model = Plain()
    machine.add_model(model)
    seen = [model.state]
    for t in path:
        model.trigger(t)
        seen.append(model.state)
    machine.remove_model(model)
    assert seen == PATH, seen
    assert not machine.models


def best_cpu(fn: Callable[[], None], repeats: int, reset: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeats):
        reset()
        gc.collect()
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def hotspots(profiles: list[dict[str, Any]], crm: InMemoryCrm, top: int) -> str:
    go = ours(profiles, crm)
    profiler = cProfile.Profile()
    profiler.enable()
    go()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime")
    stats.print_stats(top)
    out.write("\n-- by cumulative time --\n")
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", type=int, default=3000, help="profiles per timed repeat (default 3000)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each, best taken (default 5)")
    parser.add_argument("--profile-hotspots", action="store_true",
                        help="print cProfile hot spots of our path when the ratio misses the target")
    parser.add_argument("--top", type=int, default=25, help="hot spots to print (default 25)")
    args = parser.parse_args(argv)
    n = max(1, args.profiles)

    profiles, crm = make_profiles(n)
    check_ours(profiles, crm)
    check_bare()
    run_ours, run_bare = ours(profiles, crm), bare(profiles)

    def reset() -> None:
        crm.calls.clear()  # the double records every call; keep its list from growing across repeats

    warm = profiles[: min(n, 500)]
    ours(warm, crm)()
    bare(warm)()

    t_ours = best_cpu(run_ours, args.repeats, reset)
    t_bare = best_cpu(run_bare, args.repeats, reset)
    us_ours, us_bare = t_ours / n * 1e6, t_bare / n * 1e6
    ratio = us_ours / us_bare if us_bare else float("inf")
    print(f"profiles per repeat: {n}, repeats: {args.repeats} (best taken), CPU time (process_time)")
    print(f"path: [*] -> {' -> '.join(PATH)}")
    print(f"ours (Engine.prepare + Engine.drive, one profile per drive): {us_ours:8.1f} µs/profile")
    print(f"bare transitions.Machine (add_model, 3 triggers, remove_model): {us_bare:8.1f} µs/profile")
    print(f"ratio ours/bare: {ratio:.2f}   target <= {TARGET}: {'PASS' if ratio <= TARGET else 'FAIL'}")
    if ratio > TARGET:
        if args.profile_hotspots:
            print()
            print(hotspots(profiles[: min(n, 2000)], crm, args.top))
        else:
            print("(run with --profile-hotspots for a cProfile of our path)")
    return 0


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # a benchmark reports, it does not fail the caller
        print(f"benchmark error: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(0)
