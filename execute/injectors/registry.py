"""The injectors depdrill has, by name, and which one handles a fault on this machine."""

from __future__ import annotations

from depdrill.errors import CapabilityError
from depdrill.execute.injectors.base import Injector
from depdrill.execute.injectors.netem_latency import NetemLatency
from depdrill.execute.injectors.nfqueue_latency import NfqueueLatency
from depdrill.execute.injectors.nft_blackhole import NftBlackhole
from depdrill.generate.model import Fault

INJECTORS: dict[str, type[Injector]] = {
    NftBlackhole.name: NftBlackhole,
    NfqueueLatency.name: NfqueueLatency,
    NetemLatency.name: NetemLatency,
}

# Per fault kind, the injectors that can run it, best first.
BY_KIND: dict[str, tuple[str, ...]] = {
    "blackhole": (NftBlackhole.name,),
    "dns-blackhole": (NftBlackhole.name,),
    "latency": (NetemLatency.name, NfqueueLatency.name),
}


def choose(fault: Fault) -> Injector:
    """The first injector for the fault's kind that this machine can run."""
    reasons = []
    for name in BY_KIND[fault.kind]:
        injector = INJECTORS[name]()
        why = injector.available()
        if why is None:
            return injector
        reasons.append(f"{name}: {why}")
    raise CapabilityError(
        f"no injector for {fault.kind} faults on this machine ({'; '.join(reasons)}); "
        "see `depdrill doctor`"
    )


def availability() -> dict[str, str]:
    """Injector name -> "available", or why this machine cannot run it."""
    return {name: cls().available() or "available" for name, cls in INJECTORS.items()}
