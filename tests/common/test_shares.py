"""services.common.shares: share <-> units <-> MPS percentage, the one conversion (plain Python)."""
from __future__ import annotations

import pytest

from services.common.shares import (PhaseUnits, UnitSpace, assign, core_set, percentage_for_share,
                                    share_of_percentage)

H100 = UnitSpace.cuda(132)


def test_a_share_buys_whole_units_rounded_down_to_a_step_at_least_one():
    assert [H100.units_for(s) for s in (0.5, 0.3, 0.0, 1.0, 1.5)] == [66, 38, 2, 132, 132]   # 39.6 -> 38: TPCs
    cpu = UnitSpace.cpu(8)
    assert [cpu.units_for(s) for s in (0.125, 0.3, 0.5, 1.0, 0.0)] == [1, 2, 4, 8, 1]
    assert all(H100.units_for(H100.share_of(u)) == u for u in range(2, 133, 2))   # exact round trip
    assert UnitSpace.cpu(3).units_for(2 / 3) == 2                              # float noise: 1.9999...


def test_an_odd_sm_count_is_cut_to_whole_tpcs_and_bad_spaces_are_refused():
    assert UnitSpace.cuda(133).num_units == 132 and UnitSpace.cuda(114).unit == "sm"
    assert UnitSpace.cpu(2).unit == "core"
    for bad in (lambda: UnitSpace("tpu", 4), lambda: UnitSpace.cpu(0), lambda: UnitSpace("cuda", 131, 2)):
        with pytest.raises(ValueError):
            bad()


def test_units_a_worker_may_be_given_are_checked():
    assert H100.check_units(38) == 38
    for bad in (0, 37, 134, 2.0):
        with pytest.raises(ValueError, match="multiple of 2"):
            H100.check_units(bad)


def test_the_mps_percentage_is_the_smallest_cap_that_covers_the_units():
    # A cap is rounded down to whole TPCs too: every even SM count on an H100 comes back exactly.
    assert [H100.mps_percentage(u) for u in (2, 38, 40, 66, 132)] == [2, 29, 31, 50, 100]
    assert all(H100.units_of_percentage(H100.mps_percentage(u)) == u for u in range(2, 133, 2))
    assert [percentage_for_share(s) for s in (0.0, 0.004, 0.5, 0.3, 0.704, 1.2)] == [1, 1, 50, 30, 71, 100]
    assert share_of_percentage(40) == 0.4 and H100.units_of_percentage(1) == 2


def test_assign_gives_prefill_the_front_cores_and_decode_the_back_or_sms_and_caps():
    cpus = (4, 5, 6, 7)
    prefill, decode = assign(UnitSpace.cpu(4), 0.75, 0.5, cpus)
    assert prefill == PhaseUnits(3, 0.75, (4, 5, 6))
    assert decode == PhaseUnits(2, 0.5, (6, 7))                              # overlapping caps meet in between
    prefill, decode = assign(H100, 1.0, 0.3)
    assert prefill == PhaseUnits(132, 1.0, (), 100)
    assert decode == PhaseUnits(38, 38 / 132, (), 29)
    assert core_set(cpus, 0, from_back=True) == (7,) and core_set(cpus, 9, from_back=False) == cpus
    with pytest.raises(ValueError, match="stack cores"):
        assign(UnitSpace.cpu(4), 0.5, 0.5, (0, 1))


def test_green_partitions_round_up_to_the_drivers_alignment_and_the_phase_picks_the_smallest_that_fits():
    from services.common.shares import green_partition_units, pick_partition
    # Hopper: at least 8 SMs, in multiples of 8 (the driver reports both: SmResource).
    assert [green_partition_units(u, 8, 8, 132) for u in (2, 38, 66, 132)] == [8, 40, 72, 132]
    assert green_partition_units(38, 0, 0, 132) == 38                      # nothing known: as asked
    sizes = (40, 72, 132)
    assert [pick_partition(sizes, u) for u in (2, 40, 41, 132, 200)] == [0, 0, 1, 2, 2]
    with pytest.raises(ValueError):
        pick_partition((), 8)


def test_the_gpus_sm_count_from_a_capped_workers_measurement():
    from services.common.shares import device_sms
    assert device_sms(66, 132, 0.5) == 132          # the context reports the whole GPU: the probe saw the cap
    assert device_sms(66, 66, 0.5) == 132           # it reports the capped count: the probe filled it
    assert device_sms(38, 38, 0.29) == 132          # 131.03 SMs -> whole TPCs
    assert device_sms(0, 132, 0.5) == 132           # no probe, the driver's count
    assert device_sms(132, 132, 1.0) == 132 and device_sms(0, 0, 0.5) == 0
