"""The calendar (model/calendar.py): tod/dow of absolute times in an IANA zone, the step grid, the config's
``calendar`` (and old ``start_dow`` files read into it), training windows and the CLI's --start/--zone.

Expected values are computed here independently with ``zoneinfo`` (local wall clock of each time)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import numpy as np
import pytest
import torch

from stvfm_engine.cli import main
from stvfm_engine.errors import ConfigError, InputError
from stvfm_engine.model.calendar import calendar_from_start_dow, grid_for, normalize_calendar, parse_time, time_features
from stvfm_engine.model.config import PRESETS, STVFMConfig
from stvfm_engine.model.data import FlowSeries, Windows, flow_data_from_array, windows_for

NY = ZoneInfo("America/New_York")
UTC = timezone.utc


def local_features(times, zone, steps_per_day):
    """tod/dow by hand: the local wall clock's seconds of the day // interval, the local weekday."""
    interval = 86400 // steps_per_day
    local = [t.astimezone(zone) for t in times]
    return ([(t.hour * 3600 + t.minute * 60 + t.second) // interval for t in local], [t.weekday() for t in local])


@pytest.mark.parametrize("day, slots", [("2026-03-08", 46), ("2026-11-01", 50), ("2026-11-02", 48)])
def test_new_york_days_have_46_48_or_50_half_hour_slots(day, slots):
    start = datetime.fromisoformat(day).replace(tzinfo=NY).astimezone(UTC)
    end = (datetime.fromisoformat(day) + timedelta(days=1)).replace(tzinfo=NY).astimezone(UTC)
    times = [start + timedelta(minutes=30 * k) for k in range(int((end - start) / timedelta(minutes=30)))]
    assert len(times) == slots
    tod, dow = time_features(times, "America/New_York", 48)
    np.testing.assert_array_equal(tod, local_features(times, NY, 48)[0])
    np.testing.assert_array_equal(dow, local_features(times, NY, 48)[1])
    assert tod.dtype == np.int64 and tod[0] == 0 and tod[-1] == 47 and len(set(dow.tolist())) == 1
    if slots == 50:  # 01:00 and 01:30 happen twice
        assert list(tod[:6]) == [0, 1, 2, 3, 2, 3]
    if slots == 46:  # 02:00 and 02:30 never happen
        assert list(tod[:6]) == [0, 1, 2, 3, 6, 7]


def test_time_features_cross_local_midnight_with_the_local_weekday():
    times = [datetime(2026, 1, 5, 4, 0, tzinfo=UTC) + timedelta(minutes=15 * k) for k in range(12)]  # 23:00 EST Sun
    tod, dow = time_features(times, "America/New_York", 96)
    assert list(dow) == [6] * 4 + [0] * 8 and list(tod) == list(range(92, 96)) + list(range(8))


@pytest.mark.parametrize("text", ["2026-11-01T05:30:00Z", "2026-11-01T01:30:00-04:00", "2026-11-01T00:30:00-05:00"])
def test_parse_time_gives_the_instant_in_utc(text):
    assert parse_time(text) == datetime(2026, 11, 1, 5, 30, tzinfo=UTC) and parse_time(text).tzinfo is UTC


@pytest.mark.parametrize("value, match", [("2026-11-01T05:30:00", "naive"), (datetime(2026, 11, 1), "naive"),
                                          ("yesterday", "ISO-8601"), (17, "datetime")])
def test_parse_time_refuses_naive_and_unreadable_times(value, match):
    with pytest.raises(InputError, match=match):
        parse_time(value)


@pytest.mark.parametrize("calendar, match", [({"start": "2026-01-01T00:00:00Z", "zone": "Mars/Olympus"}, "unknown IANA"),
                                             ({"start": "2026-01-01T00:00:00", "zone": "UTC"}, "naive"),
                                             ({"start": "2026-01-01T00:00:00Z"}, "expected"),
                                             ("UTC", "expected")])
def test_bad_calendars_are_one_line_config_errors(calendar, match):
    with pytest.raises(ConfigError, match=match) as e:
        normalize_calendar(calendar)
    assert "\n" not in str(e.value)


def test_grid_steps_and_refuses_off_grid_times():
    grid = grid_for(48, {"start": "2026-10-31T00:00:00-04:00", "zone": "America/New_York"})
    t = datetime(2026, 11, 1, 6, 30, tzinfo=UTC)
    k = grid.step(t)
    assert grid.time(k) == t and k == (t - datetime(2026, 10, 31, 4, tzinfo=UTC)) // timedelta(minutes=30)
    with pytest.raises(InputError, match="off the 1800 s grid.*06:30:00Z and 2026-11-01T07:00:00Z"):
        grid.step(t + timedelta(minutes=7))
    with pytest.raises(ConfigError, match="no calendar"):
        grid_for(48, None)
    with pytest.raises(ConfigError, match="interval=SECONDS"):
        grid_for(0, None)
    assert grid_for(0, None, interval=900).interval == timedelta(minutes=15)


@pytest.mark.parametrize("start_dow", [0, 2, 6])
def test_old_start_dow_configs_load_into_a_calendar_with_the_same_features(start_dow):
    old = {k: v for k, v in PRESETS["tiny"].to_dict().items() if k != "calendar"} | {"start_dow": start_dow}
    config = STVFMConfig.from_dict(old)
    assert config.calendar == calendar_from_start_dow(start_dow) and config.start_dow == start_dow
    assert "start_dow" not in config.to_dict()
    steps = np.arange(0, 48 * 9, 7)
    tod, dow = grid_for(48, config.calendar).features(steps)
    np.testing.assert_array_equal(tod, steps % 48)  # the features these checkpoints were trained with
    np.testing.assert_array_equal(dow, (start_dow + steps // 48) % 7)


def test_windows_compute_tod_dow_from_absolute_times_in_the_zone():
    calendar = {"start": "2026-10-31T20:00:00-04:00", "zone": "America/New_York"}
    flow = np.random.default_rng(0).random((60, 2, 3, 2)).astype(np.float32)
    w = Windows(FlowSeries(flow, start_step=5), history=8, horizon=2, steps_per_day=48, calendar=calendar)
    x, y, tod, dow = w.batch(np.array([0, 3, 30]))
    start = datetime(2026, 11, 1, 0, 0, tzinfo=UTC)
    for row, i in enumerate([0, 3, 30]):
        times = [start + timedelta(minutes=30 * (5 + i + j)) for j in range(8)]
        want_tod, want_dow = local_features(times, NY, 48)
        assert list(tod[row]) == want_tod and list(dow[row]) == want_dow
        np.testing.assert_array_equal(x[row], flow[i:i + 8])
    data = flow_data_from_array(np.random.default_rng(1).random((80, 6, 5, 2)))
    config = STVFMConfig(height=6, width=5, history=4, horizon=2, calendar=calendar).validate()
    w = windows_for(config, data, "val")
    _, _, tod, _ = w.batch(np.array([0]))
    times = [start + timedelta(minutes=30 * (data.splits["val"].start_step + j)) for j in range(4)]
    assert list(tod[0]) == local_features(times, NY, 48)[0]


def test_init_records_the_calendar_and_train_options_go_together(tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["init", "--backbone-layers", "1", "--start", "2026-01-05T00:00:00-05:00", "--zone",
                 "America/New_York", "-o", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["config"]["calendar"] == {"start": "2026-01-05T05:00:00Z", "zone": "America/New_York"}
    raw = torch.load(out, weights_only=True)
    assert raw["config"]["calendar"]["zone"] == "America/New_York" and "start_dow" not in raw["config"]
    assert main(["init", "--backbone-layers", "1", "--zone", "America/New_York", "-o", str(out)]) == 2
    assert "--start and --zone go together" in capsys.readouterr().err
    assert main(["init", "--backbone-layers", "1", "--start", "2026-01-05T00:00:00-05:00", "--zone", "Nowhere/Town",
                 "-o", str(out)]) == 2
    assert "unknown IANA zone 'Nowhere/Town'" in capsys.readouterr().err


def test_the_older_start_dow_flag_keeps_working(tmp_path, capsys):
    from stvfm_engine.model.checkpoint import load_model

    assert main(["init", "--preset", "tiny", "--backbone-layers", "1", "--start-dow", "4", "-o", str(tmp_path / "a.pt")]) == 0
    config = load_model(tmp_path / "a.pt").config
    assert config.calendar == calendar_from_start_dow(4) and config.start_dow == 4
    capsys.readouterr()
    assert main(["init", "--preset", "tiny", "--start-dow", "4", "--zone", "UTC", "-o", str(tmp_path / "b.pt")]) == 2
    assert "--start-dow is the older form of --start/--zone" in capsys.readouterr().err
    assert not (tmp_path / "b.pt").exists()
