"""The sampler keeps its cadence while slow probes are in flight, and stops when told."""

from __future__ import annotations

import itertools
import threading
import time

from execute_servers import Behaviour, http_server

from depdrill.execute.probes.registry import make_probe
from depdrill.execute.sampler import Sampler, planned_samples, workers_for
from depdrill.generate.model import HttpProbe


def test_slow_probes_do_not_stretch_the_timeline() -> None:
    # Given a service that takes 0.6 s per answer, probed every 0.1 s for 1 s
    behaviour = Behaviour()
    behaviour.delay_s = 0.6
    with http_server(behaviour) as port:
        probe = make_probe(HttpProbe(url=f"http://127.0.0.1:{port}/", timeout_s=2))
        with Sampler([(probe, 2.0)], 0.1, threading.Event()) as sampler:
            epoch = time.monotonic()
            # When the window runs
            samples = sampler.window("observe", 1.0, epoch)
            took = time.monotonic() - epoch
    # Then all 10 samples ran, 0.1 s apart, and the window took ~1 s + one answer, not 6 s
    assert len(samples) == 10 and all(s.ok and s.phase == "observe" for s in samples)
    gaps = [b.t - a.t for a, b in itertools.pairwise(samples)]
    # (generous bounds: other tests may load the machine; the mean holds the cadence)
    assert all(0.03 < g < 0.3 for g in gaps), gaps
    assert abs(sum(gaps) / len(gaps) - 0.1) < 0.02, gaps
    assert all((s.latency_ms or 0) >= 600 for s in samples)
    assert took < 2.2


def test_stop_predicate_ends_the_window_and_abandons_in_flight_samples() -> None:
    # Given a healthy service probed every 0.05 s for 5 s
    with http_server(Behaviour()) as port:
        probe = make_probe(HttpProbe(url=f"http://127.0.0.1:{port}/"))
        with Sampler([(probe, 1.0)], 0.05, threading.Event()) as sampler:
            start = time.monotonic()
            # When the stop predicate is satisfied by the 4th settled sample
            samples = sampler.window("recovery", 5.0, start, stop=lambda s: len(s) >= 4)
            took = time.monotonic() - start
    # Then the window returns at once with exactly the settled prefix
    assert len(samples) == 4 and took < 1.0


def test_interrupt_ends_the_window() -> None:
    # Given a window of 10 s and an interrupt after 0.3 s
    interrupted = threading.Event()
    with http_server(Behaviour()) as port:
        probe = make_probe(HttpProbe(url=f"http://127.0.0.1:{port}/"))
        with Sampler([(probe, 1.0)], 0.1, interrupted) as sampler:
            timer = threading.Timer(0.3, interrupted.set)
            timer.start()
            start = time.monotonic()
            samples = sampler.window("baseline", 10.0, start)
            took = time.monotonic() - start
            timer.join()
    # Then it returned within a poll step, with the samples settled so far
    assert took < 0.6 and 1 <= len(samples) <= 4


def test_pool_size_and_planned_samples() -> None:
    assert workers_for(0.25, 5.0) == 22  # 20 in flight at once, plus room
    assert workers_for(0.05, 120) == 64
    assert planned_samples(8, 0.25) == 32 and planned_samples(0.1, 0.25) == 1
