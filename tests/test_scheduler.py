"""Scheme choice, resource fit and eviction over hand-built device snapshots."""

from __future__ import annotations

import pytest

from llm_manager.config import Amount
from llm_manager.devices.base import Device
from llm_manager.models.scheduler import (
    Claim,
    Fit,
    Holder,
    Shortfall,
    apply_claims,
    choose,
    fit_scheme,
    is_present,
    keep_free,
    matches,
    plan_eviction,
)
from llm_manager.models.turns import Turns


def gpu(
    index: int,
    name: str = "NVIDIA GeForce RTX 4060",
    total: int = 8192,
    free: int | None = None,
    *,
    online: bool = True,
    kind: str = "cuda",
) -> Device:
    free = total if free is None else free
    return Device(
        key=f"{kind}:{index}",
        kind=kind,
        name=name,
        memory_total=total,
        memory_used=total - free,
        memory_free=free,
        index=index,
        online=online,
    )


def declared(name: str, total: int, free: int | None = None) -> Device:
    free = total if free is None else free
    return Device(
        key=f"static:{name}",
        kind="cuda",
        name=name,
        memory_total=total,
        memory_used=total - free,
        memory_free=free,
        measured=False,
    )


def cpu(total: int = 65536, free: int | None = None, name: str = "Intel Xeon") -> Device:
    free = total if free is None else free
    return Device(
        key="cpu",
        kind="cpu",
        name=name,
        memory_total=total,
        memory_used=total - free,
        memory_free=free,
    )


# --- matches -----------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["cpu", "CPU", " cpu "])
def test_cpu_key_matches_only_the_cpu(key: str) -> None:
    assert matches(key, cpu())
    assert not matches(key, gpu(0))


@pytest.mark.parametrize("key", ["cuda:1", "CUDA:1", " cuda:1"])
def test_cuda_index_key(key: str) -> None:
    assert matches(key, gpu(1))
    assert not matches(key, gpu(0))
    assert not matches(key, gpu(1, kind="amd"))
    assert not matches(key, cpu())
    assert not matches(key, declared("rtx 4060", 8192))  # no index


@pytest.mark.parametrize(
    "key", ["rtx 4060", "RTX 4060", "rtx-4060", "rtx4060", "RTX_4060", "geforce rtx 4060", "4060"]
)
def test_name_substring_ignoring_case_spaces_dashes(key: str) -> None:
    assert matches(key, gpu(0, "NVIDIA GeForce RTX 4060"))


@pytest.mark.parametrize("key", ["rtx 4070", "rtx 4060 ti", "v100", "4060x"])
def test_name_that_is_not_a_substring(key: str) -> None:
    assert not matches(key, gpu(0, "NVIDIA GeForce RTX 4060"))


def test_name_matches_declared_and_amd_devices() -> None:
    assert matches("rtx 4060", declared("RTX 4060 Laptop", 8192))
    assert matches("7900", gpu(0, "AMD Radeon RX 7900 XTX", kind="amd"))


def test_cpu_is_never_matched_by_a_name() -> None:
    xeon = cpu(name="Intel Xeon Gold 6338 NVIDIA-ready")
    assert not matches("xeon", xeon)
    assert not matches("nvidia", xeon)
    assert not matches("Intel Xeon Gold 6338", xeon)


@pytest.mark.parametrize("key", ["", " ", "-", " - "])
def test_empty_name_matches_nothing(key: str) -> None:
    assert not matches(key, gpu(0))


# --- apply_claims ------------------------------------------------------------------------


def test_reflected_claim_on_measured_device_is_not_subtracted_again() -> None:
    [dev] = apply_claims([gpu(0, free=2000)], [Claim("a", "cuda:0", 6000, shown=6000)])
    assert dev.memory_free == 2000


def test_partly_shown_claim_subtracts_only_what_the_reading_lacks() -> None:
    # A model that booked 6000 MiB and was measured holding 4500 so far (its KV cache not
    # allocated yet): 1500 MiB more will go.
    [dev] = apply_claims([gpu(0, free=3000)], [Claim("a", "cuda:0", 6000, shown=4500)])
    assert dev.memory_free == 1500
    # Measured above its booking: nothing more to subtract, never a negative claim.
    [dev] = apply_claims([gpu(0, free=3000)], [Claim("a", "cuda:0", 6000, shown=7000)])
    assert dev.memory_free == 3000


def test_headroom_is_kept_free() -> None:
    devices = [gpu(0, total=10000, free=9000), declared("v100", 16000)]
    out = keep_free(devices, {"gpu": Amount(percent=10.0), "cuda:0": Amount(mib=500)})
    assert [d.memory_free for d in out] == [8000, 16000 - 1600]
    # System memory only by its own key.
    cpu = Device("cpu", "cpu", "CPU", 4000, 1000, 3000)
    assert keep_free([cpu], {"gpu": Amount(mib=100)})[0].memory_free == 3000
    assert keep_free([cpu], {"cpu": Amount(mib=100)})[0].memory_free == 2900


def test_pending_claim_on_measured_device_is_subtracted() -> None:
    [dev] = apply_claims([gpu(0, total=8192, free=8000)], [Claim("a", "cuda:0", 3000)])
    assert dev.memory_free == 5000
    assert dev.memory_used == 8192 - 5000


def test_claims_on_declared_device_always_subtracted() -> None:
    claims = [
        Claim("a", "static:v100", 6000, shown=6000),
        Claim("b", "static:v100", 4000),
    ]
    [dev] = apply_claims([declared("v100", 16000)], claims)
    assert dev.memory_free == 6000
    assert dev.memory_used == 10000


def test_claims_only_touch_their_own_device_and_never_go_negative() -> None:
    devices = [gpu(0, free=8192), gpu(1, free=1000), cpu(free=30000)]
    claims = [Claim("a", "cuda:1", 5000), Claim("b", "cuda:1", 100), Claim("c", "nowhere", 9)]
    out = apply_claims(devices, claims)
    assert [d.memory_free for d in out] == [8192, 0, 30000]
    assert out[1].memory_used == out[1].memory_total
    assert out[0] == devices[0]
    assert devices[1].memory_free == 1000  # inputs are not modified


def test_no_claims_leaves_devices_as_they_are() -> None:
    devices = [gpu(0, free=123), declared("x", 10, 5)]
    assert apply_claims(devices, []) == devices


# --- fit_scheme --------------------------------------------------------------------------


def test_fit_assigns_devices_and_records_needs() -> None:
    devices = [cpu(free=30000), gpu(0, "Tesla V100", 16384), gpu(1, "RTX 4060", 8192)]
    result = fit_scheme("gpu", {"rtx 4060": 6144, "v100": 16000, "cpu": 100}, devices)
    assert result == Fit(
        "gpu",
        {"v100": "cuda:0", "rtx 4060": "cuda:1", "cpu": "cpu"},
        {"cuda:1": 6144, "cuda:0": 16000, "cpu": 100},
    )


def test_fit_prefers_the_device_with_most_free_memory() -> None:
    devices = [gpu(0, free=3000), gpu(1, free=7000), gpu(2, free=5000)]
    result = fit_scheme("s", {"rtx 4060": 2000}, devices)
    assert isinstance(result, Fit)
    assert result.assignment == {"rtx 4060": "cuda:1"}


def test_missing_device() -> None:
    result = fit_scheme("gpu", {"cpu": 10, "v100": 16000}, [cpu(), gpu(0)])
    assert result == Shortfall("gpu", "v100", 16000, 0, missing=True)
    assert result.describe() == "scheme 'gpu': device 'v100' not present"


def test_offline_device_counts_as_missing() -> None:
    result = fit_scheme("gpu", {"cuda:0": 0}, [gpu(0, online=False)])
    assert isinstance(result, Shortfall)
    assert result.missing


def test_insufficient_memory_reports_needed_and_best_free() -> None:
    devices = [gpu(0, free=3000), gpu(1, free=5000)]
    result = fit_scheme("gpu", {"rtx 4060": 6000}, devices)
    assert result == Shortfall("gpu", "rtx 4060", 6000, 5000, missing=False)
    assert result.describe() == (
        "scheme 'gpu': device 'rtx 4060' needs 6000 MiB, 5000 MiB free (1000 MiB missing)"
    )


def test_exactly_enough_memory_fits() -> None:
    assert isinstance(fit_scheme("s", {"cuda:0": 4000}, [gpu(0, free=4000)]), Fit)


def test_zero_mib_means_present() -> None:
    full = gpu(0, free=0)
    assert fit_scheme("s", {"cuda:0": 0}, [full]) == Fit("s", {"cuda:0": "cuda:0"}, {"cuda:0": 0})
    absent = fit_scheme("s", {"cuda:3": 0}, [full])
    assert isinstance(absent, Shortfall) and absent.missing


def test_two_keys_matching_the_same_name_get_distinct_devices() -> None:
    devices = [gpu(0, free=8000), gpu(1, free=8000)]
    result = fit_scheme("s", {"rtx 4060": 6000, "RTX-4060": 5000}, devices)
    assert isinstance(result, Fit)
    assert sorted(result.assignment.values()) == ["cuda:0", "cuda:1"]
    assert sum(result.needs.values()) == 11000


def test_two_keys_with_one_matching_device_do_not_share_it() -> None:
    result = fit_scheme("s", {"rtx 4060": 1000, "4060": 1000}, [gpu(0, free=8000)])
    assert isinstance(result, Shortfall)
    assert result.missing


def test_name_key_does_not_take_the_device_an_index_key_needs() -> None:
    # Greedy "roomiest first" would give cuda:1 to the name key and leave "cuda:1" without a
    # device, although rtx->cuda:0, cuda:1->cuda:1 fits.
    devices = [gpu(0, free=7000), gpu(1, free=8000)]
    result = fit_scheme("s", {"rtx 4060": 6000, "cuda:1": 1000}, devices)
    assert isinstance(result, Fit)
    assert result.assignment == {"rtx 4060": "cuda:0", "cuda:1": "cuda:1"}
    assert result.needs == {"cuda:0": 6000, "cuda:1": 1000}


def test_broad_name_leaves_room_for_narrow_name() -> None:
    devices = [gpu(0, "RTX 4060", free=7000), gpu(1, "RTX 4060 Ti", free=8000)]
    result = fit_scheme("s", {"4060": 6000, "4060 ti": 1000}, devices)
    assert isinstance(result, Fit)
    assert result.assignment == {"4060": "cuda:0", "4060 ti": "cuda:1"}


def test_joint_assignment_impossible_is_a_shortfall() -> None:
    devices = [gpu(0, "RTX 4060", free=7000), gpu(1, "RTX 4060 Ti", free=8000)]
    result = fit_scheme("s", {"4060": 7500, "4060 ti": 1000}, devices)
    assert isinstance(result, Shortfall)
    assert result.scheme == "s"


def test_empty_scheme_fits_anywhere() -> None:
    assert fit_scheme("none", {}, []) == Fit("none", {}, {})


def test_is_present_ignores_memory() -> None:
    devices = [gpu(0, free=0), cpu(free=0)]
    assert is_present({"cuda:0": 99999, "cpu": 99999}, devices)
    assert not is_present({"cuda:1": 0}, devices)
    assert not is_present({"cuda:0": 0}, [gpu(0, online=False)])


# --- choose ------------------------------------------------------------------------------


def test_choose_takes_the_first_scheme_that_fits() -> None:
    devices = [gpu(0, free=4000), cpu(free=30000)]
    schemes = [
        ("big-gpu", {"cuda:0": 6000}),
        ("cpu", {"cpu": 20000}),
        ("small-gpu", {"cuda:0": 1000}),
    ]
    result = choose(schemes, devices)
    assert isinstance(result, Fit)
    assert result.scheme == "cpu"


def test_choose_returns_every_shortfall_in_order() -> None:
    devices = [gpu(0, free=4000), cpu(free=1000)]
    schemes = [("gpu", {"cuda:0": 6000}), ("v100", {"v100": 1}), ("cpu", {"cpu": 2000})]
    result = choose(schemes, devices)
    assert result == [
        Shortfall("gpu", "cuda:0", 6000, 4000, missing=False),
        Shortfall("v100", "v100", 1, 0, missing=True),
        Shortfall("cpu", "cpu", 2000, 1000, missing=False),
    ]


def test_choose_with_no_schemes() -> None:
    assert choose([], [gpu(0)]) == []


def test_choose_after_claims() -> None:
    devices = apply_claims([gpu(0, free=8000)], [Claim("other", "cuda:0", 5000)])
    result = choose([("gpu", {"cuda:0": 6000}), ("cpu", {"cpu": 1})], [*devices, cpu()])
    assert isinstance(result, Fit) and result.scheme == "cpu"


# --- Fit.gpu_indices ---------------------------------------------------------------------


def test_gpu_indices_only_cuda_devices_with_an_index() -> None:
    devices = [
        cpu(),
        gpu(0, "V100", 16384),
        gpu(1, "RTX 4060", 8192),
        gpu(2, "Radeon", 8192, kind="amd"),
        declared("A100", 40000),
    ]
    result = fit_scheme(
        "s", {"v100": 9000, "rtx 4060": 8000, "radeon": 1, "a100": 1, "cpu": 1}, devices
    )
    assert isinstance(result, Fit)
    assert sorted(result.gpu_indices(devices)) == [0, 1]
    assert result.gpu_indices([]) == []


def test_gpu_indices_follow_the_assignment() -> None:
    devices = [gpu(0), gpu(1), gpu(2)]
    fit = Fit("s", {"a": "cuda:2", "b": "cuda:0"}, {"cuda:2": 1, "cuda:0": 1})
    assert fit.gpu_indices(devices) == [2, 0]


# --- plan_eviction -----------------------------------------------------------------------


def holder(model: str, last_used: float, *claims: tuple[str, int]) -> Holder:
    return Holder(model, last_used, tuple(Claim(model, key, mib) for key, mib in claims))


HOLDERS = [
    holder("recent", 30.0, ("cuda:0", 3000)),
    holder("older", 20.0, ("cuda:0", 2000)),
    holder("oldest-cpu", 1.0, ("cpu", 40000)),
    holder("middle", 25.0, ("cuda:0", 1000)),
]


def test_evicts_the_least_recently_used_holder_that_makes_it_fit() -> None:
    devices = [gpu(0, total=8192, free=2000), cpu(free=1000)]
    # LRU among cuda:0 holders: older (20), middle (25), recent (30); oldest-cpu is irrelevant
    assert plan_eviction("s", {"cuda:0": 4000}, devices, HOLDERS) == ["older"]


def test_evicts_as_few_as_needed_in_lru_order() -> None:
    devices = [gpu(0, total=8192, free=2000), cpu(free=1000)]
    assert plan_eviction("s", {"cuda:0": 5000}, devices, HOLDERS) == ["older", "middle"]
    assert plan_eviction("s", {"rtx 4060": 8000}, devices, HOLDERS) == [
        "older",
        "middle",
        "recent",
    ]


def test_none_when_evicting_everything_is_not_enough() -> None:
    devices = [gpu(0, total=8192, free=2000), cpu(free=1000)]
    assert plan_eviction("s", {"cuda:0": 8193}, devices, HOLDERS) is None


def test_none_when_the_device_is_absent() -> None:
    devices = [gpu(0, free=0), cpu(free=0)]
    assert plan_eviction("s", {"cuda:1": 1}, devices, HOLDERS) is None
    assert plan_eviction("s", {"cuda:0": 1}, [gpu(0, free=0, online=False)], HOLDERS) is None


def test_none_without_holders() -> None:
    assert plan_eviction("s", {"cuda:0": 1000}, [gpu(0, free=0)], []) is None


def test_holders_of_unrelated_devices_are_never_evicted() -> None:
    devices = [gpu(0, free=0), gpu(1, free=0), cpu(free=0)]
    holders = [
        holder("on-gpu1", 1.0, ("cuda:1", 8000)),
        holder("on-cpu", 2.0, ("cpu", 8000)),
        holder("on-gpu0", 3.0, ("cuda:0", 8000)),
    ]
    assert plan_eviction("s", {"cuda:0": 4000}, devices, holders) == ["on-gpu0"]
    # A claim on a device no longer in the snapshot is not relevant either.
    gone = [holder("ghost", 0.0, ("cuda:9", 8000))]
    assert plan_eviction("s", {"cuda:0": 4000}, devices, gone) is None


def test_eviction_for_a_scheme_needing_two_devices() -> None:
    devices = [gpu(0, free=1000), cpu(free=1000)]
    holders = [
        holder("gpu-user", 1.0, ("cuda:0", 6000)),
        holder("cpu-user", 2.0, ("cpu", 20000)),
    ]
    needs = {"cuda:0": 5000, "cpu": 10000}
    assert plan_eviction("s", needs, devices, holders) == ["gpu-user", "cpu-user"]
    # one holder with claims on both devices is enough on its own
    both = [holder("both", 5.0, ("cuda:0", 6000), ("cpu", 20000)), *holders]
    assert plan_eviction("s", needs, devices, both) == ["gpu-user", "cpu-user"]
    assert plan_eviction("s", needs, devices, [both[0]]) == ["both"]


def test_freed_memory_is_capped_at_the_device_total() -> None:
    # A stale claim larger than the device must not make room that cannot exist.
    devices = [gpu(0, total=8192, free=0)]
    holders = [holder("huge", 1.0, ("cuda:0", 100000))]
    assert plan_eviction("s", {"cuda:0": 9000}, devices, holders) is None
    assert plan_eviction("s", {"cuda:0": 8192}, devices, holders) == ["huge"]


def test_eviction_on_a_declared_device_matched_by_name() -> None:
    devices = [declared("rtx 4060", 8192, free=1000)]
    holders = [holder("a", 2.0, ("static:rtx 4060", 4000)), holder("b", 1.0, ("cuda:0", 9))]
    assert plan_eviction("s", {"RTX-4060": 5000}, devices, holders) == ["a"]


def test_lower_priority_holders_are_evicted_before_less_recently_used_ones() -> None:
    devices = [gpu(0, total=8192, free=0)]
    holders = [
        Holder("old-important", 1.0, (Claim("old-important", "cuda:0", 4000),), priority=5),
        Holder("recent-minor", 9.0, (Claim("recent-minor", "cuda:0", 4000),), priority=-1),
    ]
    assert plan_eviction("s", {"cuda:0": 4000}, devices, holders) == ["recent-minor"]


def test_a_holder_that_can_go_now_is_preferred_to_a_busy_one() -> None:
    devices = [gpu(0, total=8192, free=0)]
    holders = [
        Holder("busy", 1.0, (Claim("busy", "cuda:0", 4000),), ready=False),
        Holder("idle", 9.0, (Claim("idle", "cuda:0", 4000),)),
    ]
    assert plan_eviction("s", {"cuda:0": 4000}, devices, holders) == ["idle"]
    # Only the busy one is big enough: it is planned for (and waited for).
    holders[0] = Holder("busy", 1.0, (Claim("busy", "cuda:0", 8000),), ready=False)
    assert plan_eviction("s", {"cuda:0": 6000}, devices, holders) == ["busy"]


def test_a_holder_taken_on_the_way_but_not_needed_is_left_out() -> None:
    devices = [gpu(0, total=10000, free=0)]
    holders = [
        holder("small-old", 1.0, ("cuda:0", 1000)),
        holder("big-new", 2.0, ("cuda:0", 9000)),
    ]
    assert plan_eviction("s", {"cuda:0": 8000}, devices, holders) == ["big-new"]


# --- turns ---------------------------------------------------------------------------------


def test_turns_rank_by_priority_then_arrival_and_reserve_victims() -> None:
    turns = Turns()
    first = turns.enter("b", 0, 60)
    later = turns.enter("c", 5, 60)
    last = turns.enter("d", 0, 60)
    first.victims = frozenset({"a"})
    later.victims = frozenset({"x"})
    assert [w.model for w in turns.waits] == ["c", "b", "d"]
    assert turns.reserved_before(first) == {"x"}
    assert turns.reserved_before(last) == {"a", "x"}
    assert turns.ahead_of(last, ["a"]) == {"b"}
    assert turns.waiting_on("a") == ["b"]
    turns.leave(later)
    assert turns.reserved_before(first) == frozenset()


def test_turn_ends_count_from_the_later_of_the_wait_and_the_model_becoming_ready() -> None:
    turns = Turns()
    wait = turns.enter("b", 0, 60)
    wait.victims = frozenset({"a", "starting"})
    ends = turns.turn_ends({"a": (wait.since + 2.0, 30.0)})
    assert ends == {"a": wait.since + 32.0}  # ready after the wait began
    ends = turns.turn_ends({"a": (wait.since - 100.0, 30.0)})
    assert ends == {"a": wait.since + 30.0}  # ready long before: its turn counts from now


async def test_turns_wake_waiters_only_when_someone_waits() -> None:
    turns = Turns()
    event = turns.changed_event()
    turns.notify()
    assert not event.is_set()  # nobody waits: the request path pays nothing
    wait = turns.enter("b", 0, 60)
    event = turns.changed_event()
    turns.notify()
    assert event.is_set() and not turns.changed_event().is_set()
    turns.leave(wait)
