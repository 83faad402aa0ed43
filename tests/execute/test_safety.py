"""Never leave a fault behind: journal, watchdog, cleanup and the runner's FaultSession."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_world import FaultWorld, fault_world_fixture  # noqa: F401

from depdrill.artifact import utcnow
from depdrill.execute.injectors import iptables
from depdrill.execute.injectors.base import FaultContext, KernelObject, Plan
from depdrill.execute.injectors.nfqueue_latency import NfqueueLatency
from depdrill.execute.injectors.nft_blackhole import NftBlackhole
from depdrill.execute.safety import FaultSession
from depdrill.execute.safety import journal as journal_mod
from depdrill.execute.safety.cleanup import cleanup
from depdrill.generate.model import BlackholeFault, LatencyFault
from depdrill.netns import Target

HOLDER = Path(__file__).with_name("fault_holder.py")
KILLS = 20


def _plan(world: FaultWorld, name: str) -> Plan:
    return Plan(
        injector="nft-blackhole",
        fault=BlackholeFault(addresses=[world.dependency]),
        ctx=world.ctx(),
        rules=["table ..."],
        objects=[KernelObject(kind="nft-table", name=name, where="netdev")],
    )


def test_journal_lists_what_is_still_on(fault_world: FaultWorld, tmp_path: Path) -> None:
    # Given a journal with two faults applied and one of them reverted, and a torn last line
    world = fault_world
    journal = journal_mod.Journal("j1", tmp_path)
    journal.start(os.getpid())
    first = journal.opened(_plan(world, "depdrill_j1_1"))
    second = journal.opened(_plan(world, "depdrill_j1_2"))
    journal.closed(first)
    journal.close(remove=False)
    with open(journal.path, "a") as torn:
        torn.write('{"event": "revert", "ent')
    # When it is read back
    state = journal_mod.read(journal.path)
    # Then only the second is open, with its namespace, objects and deadline
    assert list(state.open) == [second]
    entry = state.open[second]
    assert entry.target == world.service
    assert entry.objects[0].name == "depdrill_j1_2"
    assert entry.deadline > utcnow()
    assert state.pid == os.getpid() and journal_mod.runner_alive(state)


def test_session_reverts_everything_on_an_exception(
    fault_world: FaultWorld, tmp_path: Path
) -> None:
    # Given a session with a blackhole and a latency fault on
    world = fault_world
    ctx = world.ctx(run_id="sx")
    watchdog_pid = None
    with pytest.raises(RuntimeError), FaultSession("sx", world.service, tmp_path) as session:
        assert session.watchdog is not None
        watchdog_pid = session.watchdog.pid
        session.apply(
            NftBlackhole(), BlackholeFault(addresses=[world.dependency], ports=[7001]), ctx
        )
        session.apply(
            NfqueueLatency(),
            LatencyFault(addresses=[world.dependency], ports=[7002], delay_ms=100),
            ctx,
        )
        assert "depdrill_sx_" in world.nft_tables() and "queue num" in world.nft_ruleset()
        # When the runner fails mid-test
        raise RuntimeError("the runner broke")
    # Then nothing is left, the watchdog has stopped, and the journal is gone
    assert "depdrill" not in world.nft_tables()
    assert world.tagged_rules() == []
    assert list(tmp_path.iterdir()) == []
    assert watchdog_pid is not None and not Path(f"/proc/{watchdog_pid}").exists()


def test_revert_closes_the_journal_entry(fault_world: FaultWorld, tmp_path: Path) -> None:
    world = fault_world
    with FaultSession("rv", world.service, tmp_path) as session:
        handle = session.apply(
            NftBlackhole(), BlackholeFault(addresses=[world.dependency]), world.ctx(run_id="rv")
        )
        assert len(journal_mod.read(tmp_path / "rv.jsonl").open) == 1
        session.revert(handle)
        assert journal_mod.read(tmp_path / "rv.jsonl").open == {}
        assert session.faults_on == 0
    assert not (tmp_path / "rv.jsonl").exists()


def test_a_latency_fault_ends_at_its_deadline_while_the_runner_hangs(
    fault_world: FaultWorld, tmp_path: Path
) -> None:
    # Given a latency fault whose deadline is 0.5 s away, and a runner that hangs on
    world = fault_world
    with FaultSession("dl", world.service, tmp_path) as session:
        handle = session.apply(
            NfqueueLatency(),
            LatencyFault(addresses=[world.dependency], delay_ms=100),
            world.ctx(run_id="dl", seconds=0.5),
        )
        assert world.connect(world.dependency, 7001)[1] >= 100
        # When the deadline passes
        time.sleep(0.7)
        # Then the kernel has ended it (the gate's set elements timed out), and the
        # runner's revert still works
        assert world.connect(world.dependency, 7001)[1] < 20
        session.revert(handle)
    assert "depdrill" not in world.nft_tables()


def _accept_rule(world: FaultWorld, tag: str) -> iptables.Rule:
    """A harmless iptables rule for the dependency, tagged as depdrill tags what it installs."""
    spec = ("-s", world.dependency, "-m", "comment", "--comment", tag, "-j", "ACCEPT")
    return iptables.Rule(binary="iptables-legacy", chain="INPUT", spec=spec)


class _TaggedRule:
    """An injector whose one kernel object is a tagged iptables rule: what the watchdog
    removes by itself at a deadline, as it would a netem qdisc (this kernel has no netem)."""

    name = "tagged-rule"

    def __init__(self, target: Target, rule: iptables.Rule) -> None:
        self.target = target
        self.rule = rule
        self.rules: list[str] = []

    def plan(self, fault: LatencyFault, ctx: FaultContext) -> Plan:
        tag = self.rule.spec[self.rule.spec.index("--comment") + 1]
        objects = [
            KernelObject(
                kind="iptables-rule", name=tag, where=self.rule.where, spec=" ".join(self.rule.spec)
            )
        ]
        return Plan(self.name, fault, ctx, [self.rule.command()], objects)

    def apply_plan(self, plan: Plan) -> _TaggedRule:
        iptables.install(self.target, [self.rule])
        self.rules = plan.rules
        return self

    def matched(self) -> int | None:
        return None

    def revert(self, handle: object) -> None:
        iptables.remove_tagged(self.target, self.rule.binary, "depdrill:wd:")


def test_watchdog_removes_a_fault_past_its_deadline(
    fault_world: FaultWorld, tmp_path: Path
) -> None:
    # Given a fault made of a tagged iptables rule, with its deadline 0.5 s away, journaled
    # by a session whose runner then hangs on
    world = fault_world
    rule = _accept_rule(world, "depdrill:wd:1")
    injector = _TaggedRule(world.service, rule)
    with FaultSession("wd", world.service, tmp_path) as session:
        handle = session.apply(
            injector,  # type: ignore[arg-type]
            LatencyFault(addresses=[world.dependency], delay_ms=10),
            world.ctx(run_id="wd", seconds=0.5),
        )
        assert world.tagged_rules()
        # When the deadline passes
        stop = time.monotonic() + 2
        while world.tagged_rules() and time.monotonic() < stop:
            time.sleep(0.05)
        # Then the watchdog has removed the rule already, and the runner's revert still works
        assert world.tagged_rules() == []
        session.revert(handle)  # type: ignore[arg-type]


def test_cleanup_removes_what_a_dead_run_left(fault_world: FaultWorld, tmp_path: Path) -> None:
    # Given a journal from a run that died (a pid that no longer runs) and its rule, left on
    world = fault_world
    rule = _accept_rule(world, "depdrill:dead:1")
    iptables.install(world.service, [rule])
    journal = journal_mod.Journal("dead", tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    journal.start(dead.pid)
    journal.opened(
        Plan(
            injector="nfqueue-latency",
            fault=LatencyFault(addresses=[world.dependency], delay_ms=10),
            ctx=world.ctx(run_id="dead"),
            rules=[rule.command()],
            objects=[
                KernelObject(
                    kind="iptables-rule",
                    name="depdrill:dead:1",
                    where=rule.where,
                    spec=" ".join(rule.spec),
                )
            ],
        )
    )
    journal.close(remove=False)
    # When `depdrill cleanup` runs
    removed = cleanup(tmp_path)
    # Then the rule is gone, reported, and so is the journal
    assert world.tagged_rules() == []
    assert any("depdrill:dead:1" in r for r in removed)
    assert list(tmp_path.iterdir()) == []
    assert cleanup(tmp_path) == []


def _kill_once(world: FaultWorld, journal_dir: Path, run_id: str, mode: str) -> float:
    assert world.service.netns is not None
    child = subprocess.Popen(
        [
            sys.executable,
            "-P",
            str(HOLDER),
            world.service.netns,
            world.dependency,
            str(journal_dir),
            run_id,
            mode,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    with child.stdout:
        assert child.stdout.readline().strip() == "on"
    time.sleep(random.uniform(0, 0.25))
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    killed = time.monotonic()
    while time.monotonic() - killed < 2:
        if (
            "depdrill" not in world.nft_tables()
            and world.tagged_rules() == []
            and not any(journal_dir.iterdir())
        ):
            break
        time.sleep(0.02)
    return time.monotonic() - killed


def test_sigkilled_runner_leaves_nothing_behind(fault_world: FaultWorld, tmp_path: Path) -> None:
    # Given a runner holding a blackhole and a latency fault (or cycling through them)
    world = fault_world
    for n in range(KILLS):
        mode = "cycle" if n % 2 else "both"
        # When it is SIGKILLed at a random moment
        took = _kill_once(world, tmp_path, f"k{n}", mode)
        # Then within 2 s no table, no rule, no journal remains, and traffic flows
        assert took < 2, f"kill {n} ({mode}): leftovers after {took:.2f} s"
        assert "depdrill" not in world.nft_tables()
        assert world.tagged_rules() == []
        for port in (7001, 7002):
            outcome, ms = world.connect(world.dependency, port)
            assert outcome == "connected" and ms < 20, (n, port, outcome, ms)


def test_sigterm_reverts_before_the_runner_exits(fault_world: FaultWorld, tmp_path: Path) -> None:
    # Given a runner holding faults, with no SIGTERM handler of its own
    world = fault_world
    assert world.service.netns is not None
    child = subprocess.Popen(
        [
            sys.executable,
            "-P",
            str(HOLDER),
            world.service.netns,
            world.dependency,
            str(tmp_path),
            "term",
            "both",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    with child.stdout:
        assert child.stdout.readline().strip() == "on"
    # When it is asked to stop
    child.send_signal(signal.SIGTERM)
    # Then it exits through the session (which reverted everything), not by the signal
    assert child.wait(5) == 128 + signal.SIGTERM
    assert "depdrill" not in world.nft_tables()
    assert world.tagged_rules() == []
    assert list(tmp_path.iterdir()) == []
