"""Forecast streams (engine/streams.py, engine/stream_store.py): pushes, windows across a daylight-saving
change, gaps, rollouts, batching, durability across processes (SIGKILL included) and PostgreSQL.

The engine is a tiny checkpoint with a New York calendar opened in memory on the eager backend (no export:
fast); every forecast is compared with ``Engine.predict`` on a window built here by hand, with tod/dow
computed independently with ``zoneinfo``.
"""
from __future__ import annotations

import select
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from helpers import CONFIGS, free_ports, write_checkpoint
from stvfm_engine.engine import Engine
from stvfm_engine.engine.manifest import FORMAT_VERSION
from stvfm_engine.engine.precision import get_precision
from stvfm_engine.engine.session import Built, open_session
from stvfm_engine.engine.streams import Streams
from stvfm_engine.errors import ConfigError, InputError, StoreError
from stvfm_engine.export.records import manifest_head, model_record
from stvfm_engine.model.checkpoint import load_model
from stvfm_engine.model.config import STVFMConfig

NY = ZoneInfo("America/New_York")
UTC = timezone.utc
CALENDAR = {"start": "2026-10-31T00:00:00-04:00", "zone": "America/New_York"}
CONFIG = CONFIGS["vit-tiny-c2-6x5-p2-T4-H2-day48"].replace(calendar=CALENDAR)
T, SHAPE = CONFIG.history, (CONFIG.channels, CONFIG.height, CONFIG.width)
STEP = timedelta(minutes=30)
T0 = datetime(2026, 11, 1, 3, 0, tzinfo=UTC)  # 23:00 EDT on Oct 31; New York falls back at 06:00 UTC


def memory_engine(checkpoint: Path, max_batch: int = 8) -> Engine:
    """The checkpoint as an eager engine held in memory (what a build records, without the artifacts)."""
    model = load_model(checkpoint)
    manifest = {**manifest_head(FORMAT_VERSION, get_precision("fp32"), "cpu", max_batch),
                **model_record(model, {}, max_batch), "backends": {}}
    return Engine(open_session(Built(checkpoint.parent / "bike", manifest, references=lambda: {"bike": model}),
                               backend="eager"))


def features(times):
    """tod/dow ``[1, n]`` by hand: New York wall-clock half-hour slot and weekday of each time."""
    local = [t.astimezone(NY) for t in times]
    return (np.array([[(t.hour * 3600 + t.minute * 60 + t.second) // 1800 for t in local]]),
            np.array([[t.weekday() for t in local]]))


def frame(i: int, seed: int = 0) -> np.ndarray:
    return (5.0 + 2.0 * np.random.default_rng(1000 * seed + i).standard_normal(SHAPE)).astype(np.float32)


def predict(engine, frames, times):
    return engine.predict(np.stack(frames)[None], *features(times))[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("streams") / "bike.pt", CONFIG, seed=3)


@pytest.fixture(scope="module")
def engine(checkpoint):
    return memory_engine(checkpoint)


@pytest.fixture
def streams(engine, tmp_path):
    with Streams(engine, tmp_path / "streams.db") as s:
        yield s


def push_run(streams, name, count, seed=0, skip=(), start=T0):
    times = [start + k * STEP for k in range(count)]
    for k, t in enumerate(times):
        if k not in skip:
            streams.push(name, t, frame(k, seed))
    return times


# ----------------------------------------------------------------------------- the done-when cases
def test_forecast_across_the_fall_back_hour_equals_predict_on_the_window(engine, streams):
    repeated = False
    for k in range(12):  # 03:00Z .. 08:30Z: local 23:00 EDT .. 03:30 EST, 01:00 and 01:30 twice
        t = T0 + k * STEP
        held = streams.push("midtown", t.isoformat(), frame(k))
        assert held == min(k + 1, T)
        if k + 1 < T:
            with pytest.raises(InputError, match=f"holds {k + 1} frames .*a forecast needs {T}"):
                streams.forecast("midtown")
            continue
        times = [T0 + j * STEP for j in range(k - T + 1, k + 1)]
        tod = features(times)[0][0]
        repeated |= len(set(tod.tolist())) < T
        fc = streams.forecast("midtown")
        want = predict(engine, [frame(j) for j in range(k - T + 1, k + 1)], times)
        np.testing.assert_allclose(fc.y, want, rtol=1e-6, atol=1e-6)
        assert fc.time == [t + STEP, t + 2 * STEP] and all(x.tzinfo is UTC for x in fc.time)
        assert (fc.imputed, fc.rolled_out, fc.held, fc.model) == ([], 0, T, "bike")
        held_times, held_frames = streams.history("midtown")
        assert held_times == times and np.array_equal(held_frames, np.stack([frame(j) for j in range(k - T + 1, k + 1)]))
    assert repeated  # some window held the repeated 01:00/01:30 slots


def test_steps_beyond_the_horizon_roll_out_like_by_hand_and_change_nothing(engine, streams):
    times = push_run(streams, "a", T)
    before = streams.history("a")
    fc = streams.forecast("a", steps=2 * CONFIG.horizon)
    y1 = predict(engine, [frame(j) for j in range(T)], times)
    window = np.concatenate([np.stack([frame(j) for j in range(T)]), y1])[-T:]
    times2 = [times[-1] + j * STEP for j in range(CONFIG.horizon - T + 1, CONFIG.horizon + 1)]
    y2 = engine.predict(window[None], *features(times2))[0]
    np.testing.assert_allclose(fc.y, np.concatenate([y1, y2]), rtol=1e-6, atol=1e-6)
    assert fc.rolled_out == CONFIG.horizon and fc.time == [times[-1] + j * STEP for j in range(1, 5)]
    odd = streams.forecast("a", steps=3)  # a partial last round
    np.testing.assert_allclose(odd.y, fc.y[:3], rtol=1e-6, atol=1e-6)
    after = streams.history("a")
    assert after[0] == before[0] and np.array_equal(after[1], before[1])
    with pytest.raises(InputError, match=r"steps must be an integer in \[1, 1024\], got 0"):
        streams.forecast("a", steps=0)


def test_a_missing_frame_is_refused_by_time_or_filled_and_reported(engine, streams):
    times = push_run(streams, "gap", T + 1, skip={3})
    window_times = times[1:]
    with pytest.raises(InputError, match=f"1 of the {T} frames .* missing: {times[3].isoformat().replace('+00:00', 'Z')}"):
        streams.forecast("gap")
    fc = streams.forecast("gap", gaps="hold")
    assert fc.imputed == [times[3]] and fc.held == T - 1
    held = [frame(k if k != 3 else 2) for k in range(1, T + 1)]
    np.testing.assert_allclose(fc.y, predict(engine, held, window_times), rtol=1e-6, atol=1e-6)
    fc = streams.forecast("gap", gaps="linear")
    linear = [frame(k) if k != 3 else (frame(2) + (frame(4).astype(np.float64) - frame(2)) / 2).astype(np.float32)
              for k in range(1, T + 1)]
    np.testing.assert_allclose(fc.y, predict(engine, linear, window_times), rtol=1e-6, atol=1e-6)
    # a late frame fills the gap; the forecast then needs no filling
    streams.push("gap", times[3], frame(3))
    fc = streams.forecast("gap", gaps="hold")
    assert fc.imputed == [] and fc.held == T
    # more consecutive missing steps than max_gap: refused even with a filler, naming the run
    push_run(streams, "holes", T + 4, skip={4, 5, 6})
    with pytest.raises(InputError, match="3 consecutive frames missing .*max_gap=2"):
        streams.forecast("holes", gaps="hold")
    assert len(streams.forecast("holes", gaps="hold", max_gap=3).imputed) == 3
    # the window's first step missing: the frame held before the window is the anchor
    push_run(streams, "lead", T + 1, skip={1})
    assert streams.forecast("lead", gaps="hold").imputed == [T0 + STEP]
    # a run that starts before the window counts from the frame held before it
    push_run(streams, "far", T + 2, skip={1, 2})
    with pytest.raises(InputError, match="2 consecutive frames missing .*max_gap=1"):
        streams.forecast("far", gaps="hold", max_gap=1)
    assert streams.forecast("far", gaps="hold").imputed == [T0 + 2 * STEP]


def run_child(checkpoint, store, out, kill_after=None):
    """A new process on ``store``: saves its forecast of 'midtown' to ``out``, then pushes 'k<i>' streams in a
    loop, printing ``i`` after each push returns (killed with SIGKILL after ``kill_after`` of them)."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "import importlib.util, numpy as np\n"
            f"spec = importlib.util.spec_from_file_location('streams_child', {__file__!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            f"s = m.Streams(m.memory_engine(m.Path({str(checkpoint)!r})), {str(store)!r})\n"
            f"np.save({str(out)!r}, s.forecast('midtown').y)\n"
            "print('forecast', flush=True)\n"
            "for i in range(100000):\n"
            "    s.push(f'k{i}', m.T0 + i * m.STEP, m.frame(i, seed=7))\n"
            "    print(i, flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked, deadline = [], time.monotonic() + 240
    try:
        while len(acked) < kill_after:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = proc.stdout.readline() if ready else ""
            if not line:
                raise AssertionError(f"child stopped or stalled: {proc.stderr.read() if proc.poll() is not None else ''}")
            if line.strip() != "forecast":
                acked.append(int(line))
        proc.send_signal(signal.SIGKILL)  # in the middle of the loop of pushes
    finally:
        proc.kill()
        proc.wait(timeout=30)
    return acked


def test_a_new_process_continues_and_sigkill_loses_no_acknowledged_push(engine, checkpoint, tmp_path):
    store = tmp_path / "streams.db"
    with Streams(engine, store) as s:
        push_run(s, "midtown", T + 2)
        mine = s.forecast("midtown").y
    acked = run_child(checkpoint, store, tmp_path / "y.npy", kill_after=40)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), mine, rtol=1e-6, atol=1e-6)
    assert acked == list(range(40))
    with Streams(engine, store) as s:
        for i in acked:
            times, frames = s.history(f"k{i}")
            assert times == [T0 + i * STEP] and np.array_equal(frames[0], frame(i, seed=7)), i
        np.testing.assert_allclose(s.forecast("midtown").y, mine, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- pushes
def test_refused_pushes_change_nothing(streams):
    times = push_run(streams, "s", T)
    before = streams.history("s")
    bad = [
        (times[-1].replace(tzinfo=None), frame(0), "naive"),
        (times[-1] + timedelta(minutes=10), frame(0), "off the 1800 s grid"),
        (times[-1] + STEP, frame(0)[:1], rf"frame \[1, 6, 5\] .*expected x \[B, {T}, 2, 6, 5\]"),
        (times[-1] + STEP, frame(0).astype(np.int32), "expected x float32"),
        (times[-1] + STEP, np.where(np.arange(60).reshape(SHAPE) == 7, np.nan, frame(0)), "1 non-finite"),
        (times[0] - STEP, frame(0), "older than the window"),
        (times[2], frame(9), "already holds a different frame .*replace=True"),
        (times[-1] + STEP, "frame", "expected frame float32"),
    ]
    for t, f, match in bad:
        with pytest.raises(InputError, match=match) as e:
            streams.push("s", t, f)
        assert "\n" not in str(e.value)
    for name in ("", 7, "x" * 201):
        with pytest.raises(InputError, match="printable name"):
            streams.push(name, times[0], frame(0))
    after = streams.history("s")
    assert after[0] == before[0] and np.array_equal(after[1], before[1])
    assert streams.push("s", times[2], frame(2)) == T  # the same frame again: a no-op
    assert streams.push("s", times[2], frame(9), replace=True) == T
    assert np.array_equal(streams.history("s")[1][2], frame(9))
    with pytest.raises(InputError, match="unknown stream 'nope'"):
        streams.forecast("nope")


def test_the_store_keeps_the_window_and_one_frame_before_it(streams):
    push_run(streams, "w", 3 * T)
    held = streams.store.read(["w"])["w"]
    assert len(held.frames) == T + 1  # the window and its anchor
    times, frames = streams.history("w")
    assert times == [T0 + k * STEP for k in range(2 * T, 3 * T)] and len(frames) == T


# ----------------------------------------------------------------------------- batching and serving
def test_many_streams_are_forecast_in_one_engine_call(engine, streams):
    names = [f"r{i}" for i in range(5)]
    for i, name in enumerate(names):
        push_run(streams, name, T, seed=i)
    single = [streams.forecast(n).y for n in names]
    calls = engine.backbone_calls
    many = streams.forecast_many(names)
    assert engine.backbone_calls == calls + 1
    for fc, y in zip(many, single):
        np.testing.assert_allclose(fc.y, y, rtol=1e-5, atol=1e-5)
    calls = engine.backbone_calls
    rolled = streams.forecast_many([(n, 2 * CONFIG.horizon) for n in names])
    assert engine.backbone_calls == calls + 2 and all(fc.rolled_out == CONFIG.horizon for fc in rolled)


def test_serve_batch_pushes_then_forecasts_with_one_call_and_answers_each_item(engine, streams):
    for i in range(3):
        push_run(streams, f"v{i}", T - 1, seed=i)
    t_new = T0 + (T - 1) * STEP
    items = [(f"v{i}", iso_z(t_new), frame(T - 1, seed=i), None, None) for i in range(3)]
    items += [(b"fresh", iso_z(t_new).encode(), frame(0), None, None),  # BYTES elements; a new stream: 0 steps
              ("v0", None, None, np.int64(3), None),             # forecast only (after v0's push above)
              ("nope", None, None, None, None),                  # unknown stream
              ("v1", iso_z(t_new + STEP), frame(0)[:1], None, None),  # a bad frame
              ("v2", iso_z(T0), None, None, None)]               # a time without a frame: not the newest
    calls = engine.backbone_calls
    out = streams.serve_batch(items)
    assert engine.backbone_calls == calls + 2  # one call, and one more for v0's rollout round
    for i in range(3):
        np.testing.assert_allclose(out[i].y, predict(engine, [frame(j, seed=i) for j in range(T)],
                                                     [T0 + j * STEP for j in range(T)]), rtol=1e-5, atol=1e-5)
        assert out[i].held == T
    assert out[3].y.shape == (0, *SHAPE) and out[3].held == 1 and streams.history("fresh")[0] == [t_new]
    assert out[3].stream == "fresh" and out[3].time == []
    assert out[4].y.shape == (3, *SHAPE) and out[4].rolled_out == 1
    assert isinstance(out[5], InputError) and "unknown stream 'nope'" in str(out[5])
    assert isinstance(out[6], InputError) and "frame [1, 6, 5]" in str(out[6])
    assert isinstance(out[7], InputError) and f"must be the newest time held, {iso_z(t_new)}" in str(out[7])
    assert streams.history("v1")[0][-1] == t_new  # the refused frame was not stored
    bad_steps = streams.serve_batch([("late", iso_z(T0), frame(0), 0, None)])[0]  # pushed; then refused
    assert isinstance(bad_steps, InputError) and "steps must be" in str(bad_steps)
    assert streams.history("late")[0] == [T0]


def iso_z(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


# ----------------------------------------------------------------------------- calendars
def test_a_checkpoint_without_a_calendar_needs_one_passed(tmp_path):
    ckpt = write_checkpoint(tmp_path / "plain.pt", STVFMConfig(**{**CONFIG.to_dict(), "calendar": None}), seed=3)
    engine = memory_engine(ckpt)
    with pytest.raises(ConfigError, match="has no calendar: pass calendar="):
        Streams(engine, tmp_path / "a.db")
    with Streams(engine, tmp_path / "a.db", calendar=CALENDAR) as s:
        push_run(s, "x", T)
        assert s.forecast("x").y.shape == (CONFIG.horizon, *SHAPE)
    # the same store under a calendar on another grid phase refuses the stream's times
    with Streams(engine, tmp_path / "a.db", calendar={"start": "2026-10-31T00:15:00-04:00", "zone": "UTC"}) as s:
        with pytest.raises(InputError, match="off the 1800 s grid"):
            s.push("x", T0 + T * STEP, frame(0))
        with pytest.raises(InputError, match="was pushed on a 1800 s grid"):
            s.forecast("x")


def test_an_engine_written_with_start_dow_streams_with_its_old_features(checkpoint, tmp_path):
    model = load_model(checkpoint)
    manifest = {**manifest_head(FORMAT_VERSION, get_precision("fp32"), "cpu", 4), **model_record(model, {}, 4),
                "backends": {}}
    manifest["config"] = {k: v for k, v in manifest["config"].items() if k != "calendar"} | {"start_dow": 3}
    engine = Engine(open_session(Built(tmp_path / "old", manifest, references=lambda: {"old": model}), backend="eager"))
    assert engine.config.start_dow == 3 and engine.config.calendar["zone"] == "UTC"
    with Streams(engine, tmp_path / "old.db") as s:
        start = datetime.fromisoformat(engine.config.calendar["start"])
        times = push_run(s, "x", T, start=start + 47 * STEP)  # from step 47: across a UTC midnight
        steps = np.arange(47, 47 + T)
        want = engine.predict(np.stack([frame(k) for k in range(T)])[None], (steps % 48)[None],
                              ((3 + steps // 48) % 7)[None])[0]
        np.testing.assert_allclose(s.forecast("x").y, want, rtol=1e-6, atol=1e-6)
        assert times[0].weekday() == 3


def test_a_model_without_time_inputs_takes_an_interval(tmp_path):
    ckpt = write_checkpoint(tmp_path / "notime.pt", STVFMConfig(**{**CONFIG.to_dict(), "steps_per_day": 0,
                                                                   "calendar": None}), seed=3)
    engine = memory_engine(ckpt)
    with pytest.raises(ConfigError, match="interval=SECONDS"):
        Streams(engine, tmp_path / "b.db")
    with Streams(engine, tmp_path / "b.db", interval=600) as s:
        times = [T0 + k * timedelta(minutes=10) for k in range(T)]
        for k, t in enumerate(times):
            s.push("x", t, frame(k))
        fc = s.forecast("x", steps=3)
        y = engine.predict(np.stack([frame(k) for k in range(T)])[None])[0]
        np.testing.assert_allclose(fc.y[:2], y, rtol=1e-6, atol=1e-6)
        assert fc.time == [times[-1] + k * timedelta(minutes=10) for k in (1, 2, 3)]


def test_bad_store_and_options_are_one_line_errors(engine, tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Streams(engine, tmp_path / "missing" / "s.db")
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="junk.db"):
        Streams(engine, tmp_path / "junk.db")
    with pytest.raises(InputError, match="gaps must be one of"):
        Streams(engine, tmp_path / "s.db", gaps="zero")
    with pytest.raises(InputError, match="max_gap must be"):
        Streams(engine, tmp_path / "s.db", max_gap=-1)


# ----------------------------------------------------------------------------- PostgreSQL
def test_postgresql_store_forecasts_like_sqlite_and_continues_in_a_new_connection(engine, postgres_url, tmp_path):
    with Streams(engine, tmp_path / "lite.db") as lite:
        push_run(lite, "p", T + 1, skip={2})
        want = lite.forecast("p", steps=3, gaps="linear")
    first, second = Streams(engine, postgres_url), Streams(engine, postgres_url)
    try:
        for k in range(T + 1):  # two connections push to the same stream in turn
            if k != 2:
                (first if k % 2 else second).push("p", T0 + k * STEP, frame(k))
        assert first.push("p", T0 + STEP, frame(1)) == T - 1  # same frame: a no-op
        with pytest.raises(InputError, match="already holds a different frame"):
            second.push("p", T0 + STEP, frame(5))
        with pytest.raises(InputError, match="missing"):
            second.forecast("p")
        got = second.forecast("p", steps=3, gaps="linear")
        np.testing.assert_allclose(got.y, want.y, rtol=1e-6, atol=1e-6)
        assert got.imputed == want.imputed == [T0 + 2 * STEP] and got.time == want.time
    finally:
        first.close()
        second.close()
    with Streams(engine, postgres_url) as again:
        np.testing.assert_allclose(again.forecast("p", steps=3, gaps="linear").y, want.y, rtol=1e-6, atol=1e-6)
    with pytest.raises(StoreError, match="cannot connect"):
        Streams(engine, f"postgresql://postgres@127.0.0.1:{free_ports(1)[0]}/postgres")
