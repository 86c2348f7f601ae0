"""Thermal governor against a fake hwmon tree and a fake reader: depth falls above the limit, recovers below
limit - hysteresis, and every read submitted meanwhile completes."""

from __future__ import annotations

import logging
import os
import queue
import threading

import pytest

from edgemoe.config import load_config
from edgemoe.thermal import HwmonSensor, ThermalGovernor, find_sensor


def hwmon(root, name: str, millideg: int | str, label: str | None = None, index: int = 0, extra_temps=()):
    d = root / f"hwmon{index}"
    d.mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    (d / "temp1_input").write_text(f"{millideg}\n")
    if label:
        (d / "temp1_label").write_text(label + "\n")
    for i, (lab, t) in enumerate(extra_temps, start=2):
        (d / f"temp{i}_input").write_text(f"{t}\n")
        (d / f"temp{i}_label").write_text(lab + "\n")
    return d


def set_temp(d, celsius: float) -> None:
    (d / "temp1_input").write_text(f"{int(celsius * 1000)}\n")


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class CallLog:
    """A reader that only records what the governor asks of it."""

    def __init__(self):
        self.calls: list[tuple[str, float]] = []

    def set_queue_depth(self, n: int) -> None:
        assert isinstance(n, int) and n >= 1
        self.calls.append(("depth", n))

    def set_pacing(self, seconds: float) -> None:
        assert seconds >= 0
        self.calls.append(("pacing", seconds))


def test_sensor_reads_millidegrees_and_prefers_composite(tmp_path):
    root = tmp_path / "hwmon"
    hwmon(root, "k10temp", 95000, index=0)  # a CPU sensor: not the drive's
    d = hwmon(root, "nvme", 51000, index=1, extra_temps=[("Composite", 47500), ("Sensor 2", 60000)])
    sensor, how = find_sensor(None, hwmon_root=str(root), smartctl=None)
    assert isinstance(sensor, HwmonSensor) and sensor.directory == str(d)
    assert sensor.read() == 47.5
    assert "only drive sensor" in how


def test_sensor_matches_the_drive_holding_the_model(tmp_path):
    # sysfs layout: hwmonN/device -> the controller; the block device sits below the controller.
    devices = tmp_path / "devices"
    root = tmp_path / "hwmon"
    for i in range(2):
        ctrl = devices / f"nvme{i}"
        (ctrl / f"nvme{i}n1" / f"nvme{i}n1p1").mkdir(parents=True)
        (ctrl / f"nvme{i}n1" / f"nvme{i}n1p1" / "partition").write_text("1\n")
        d = hwmon(root, "nvme", 40000 + 10000 * i, index=i)
        os.symlink(ctrl, d / "device")
    block = str(devices / "nvme1" / "nvme1n1" / "nvme1n1p1")
    sensor, how = find_sensor(None, hwmon_root=str(root), block=block, smartctl=None)
    assert sensor.read() == 50.0 and "/dev/nvme1n1" in how
    sensor, how = find_sensor(None, hwmon_root=str(root), block=str(tmp_path / "elsewhere"), smartctl=None)
    assert sensor is None and "2 drive sensors" in how and "none matching" in how


def test_no_sensor_is_reported_once_and_idle(tmp_path, caplog):
    (tmp_path / "hwmon").mkdir()
    sensor, how = find_sensor(str(tmp_path), hwmon_root=str(tmp_path / "hwmon"), smartctl=None)
    assert sensor is None and "no drive sensor" in how
    reader = CallLog()
    gov = ThermalGovernor(reader, None, queue_depth=4, no_sensor_reason=how)
    with caplog.at_level(logging.WARNING, logger="edgemoe.thermal"):
        gov.start()
        gov.start()
    assert gov._thread is None
    assert [r.message for r in caplog.records].count(f"no SSD temperature sensor ({how}); the thermal governor is idle") == 2
    assert gov.poll() is None and reader.calls == []
    assert gov.status()["temperature"] is None and gov.status()["sensor"] is None
    gov.stop()


def test_depth_falls_step_by_step_then_recovers_with_hysteresis(tmp_path):
    d = hwmon(tmp_path / "hwmon", "nvme", 60000, label="Composite")
    sensor, _ = find_sensor(None, hwmon_root=str(tmp_path / "hwmon"), smartctl=None)
    reader, clock = CallLog(), Clock()
    gov = ThermalGovernor(reader, sensor, queue_depth=8, limit=70, hysteresis=5, min_queue_depth=1,
                          max_pacing=0.1, pacing_steps=2, clock=clock)
    assert gov.schedule == [(8, 0.0), (4, 0.0), (2, 0.0), (1, 0.0), (1, 0.05), (1, 0.1)]

    def step(celsius: float) -> tuple[int, float]:
        set_temp(d, celsius)
        clock.t += 5
        assert gov.poll() == celsius
        return gov.queue_depth, gov.pacing

    assert step(60) == (8, 0.0) and step(70) == (8, 0.0)  # at the limit: not above it
    assert [step(75) for _ in range(7)] == [(4, 0.0), (2, 0.0), (1, 0.0), (1, 0.05), (1, 0.1), (1, 0.1), (1, 0.1)]
    assert step(66) == (1, 0.1) and step(65) == (1, 0.1)  # inside the hysteresis band: hold
    assert [step(60) for _ in range(6)] == [(1, 0.05), (1, 0.0), (2, 0.0), (4, 0.0), (8, 0.0), (8, 0.0)]
    assert reader.calls == [("depth", 4), ("depth", 2), ("depth", 1), ("pacing", 0.05), ("pacing", 0.1),
                            ("pacing", 0.05), ("pacing", 0.0), ("depth", 2), ("depth", 4), ("depth", 8)]
    # Throttled from the first hot poll to the poll that restored depth 8: 6 + 2 + 4 polls of 5 s.
    assert gov.throttled_seconds == 5 * (7 + 2 + 4)
    assert gov.status()["temperature"] == 60 and gov.status()["queue_depth"] == 8


def test_unreadable_sensor_holds_the_current_settings(tmp_path, caplog):
    d = hwmon(tmp_path / "hwmon", "nvme", 80000)
    sensor, _ = find_sensor(None, hwmon_root=str(tmp_path / "hwmon"), smartctl=None)
    reader = CallLog()
    gov = ThermalGovernor(reader, sensor, queue_depth=4, limit=70, hysteresis=5)
    gov.poll()
    assert gov.queue_depth == 2
    (d / "temp1_input").write_text("garbage\n")
    with caplog.at_level(logging.WARNING, logger="edgemoe.thermal"):
        assert gov.poll() is None and gov.poll() is None
    assert gov.queue_depth == 2 and gov.temperature is None
    assert sum("gave no reading" in r.message for r in caplog.records) == 1


def test_monitor_only_when_pacing_disabled(tmp_path):
    hwmon(tmp_path / "hwmon", "nvme", 90000)
    cfg = load_config(None, {"monitoring.io_pacing.enabled": False})
    reader = CallLog()
    gov = ThermalGovernor.from_config(reader, cfg, None, hwmon_root=str(tmp_path / "hwmon"))
    assert gov.poll() == 90.0 and reader.calls == [] and gov.queue_depth == cfg.ssd.queue_depth


def test_from_config(tmp_path):
    hwmon(tmp_path / "hwmon", "nvme", 30000)
    cfg = load_config(None, {"ssd.queue_depth": 16, "monitoring.io_pacing.min_queue_depth": 4,
                             "monitoring.io_pacing.throttle_interval": 200, "monitoring.nvme_thermal_limit": 65})
    gov = ThermalGovernor.from_config(CallLog(), cfg, str(tmp_path), hwmon_root=str(tmp_path / "hwmon"))
    assert gov.limit == 65 and gov.hysteresis == 5 and gov.poll_interval == 5
    assert [d for d, _ in gov.schedule] == [16, 8, 4, 4, 4, 4, 4] and gov.schedule[-1][1] == pytest.approx(0.2)


class PooledReader:
    """Reads run on `workers` threads, at most `depth` at a time, pausing `pacing` s after each (like the reader)."""

    def __init__(self, workers: int):
        self.depth, self.pacing = workers, 0.0
        self.cond = threading.Condition()
        self.in_flight = 0
        self.done: list[int] = []
        self.todo: queue.Queue = queue.Queue()
        self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(workers)]
        for t in self.threads:
            t.start()

    def set_queue_depth(self, n: int) -> None:
        with self.cond:
            self.depth = n
            self.cond.notify_all()

    def set_pacing(self, seconds: float) -> None:
        self.pacing = seconds

    def submit(self, key: int) -> None:
        self.todo.put(key)

    def _work(self) -> None:
        while (key := self.todo.get()) is not None:
            with self.cond:
                self.cond.wait_for(lambda: self.in_flight < self.depth)
                self.in_flight += 1
            threading.Event().wait(0.0005)  # the read
            with self.cond:
                self.in_flight -= 1
                self.done.append(key)
                self.cond.notify_all()
            if self.pacing:
                threading.Event().wait(self.pacing)

    def close(self) -> None:
        for _ in self.threads:
            self.todo.put(None)
        for t in self.threads:
            t.join()


def wait_until(cond, what: str, timeout: float = 20.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.005)):
        if cond():
            return
        done.wait(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def test_governor_thread_throttles_live_reads_without_losing_any(tmp_path):
    d = hwmon(tmp_path / "hwmon", "nvme", 50000)
    sensor, _ = find_sensor(None, hwmon_root=str(tmp_path / "hwmon"), smartctl=None)
    reader = PooledReader(workers=4)
    gov = ThermalGovernor(reader, sensor, queue_depth=4, limit=70, hysteresis=5, poll_interval=0.002,
                          min_queue_depth=1, max_pacing=0.002, pacing_steps=2)
    n = 400
    with gov:
        for k in range(n // 2):
            reader.submit(k)
        set_temp(d, 85)
        wait_until(lambda: gov.queue_depth == 1 and gov.pacing == 0.002, "full throttle")
        for k in range(n // 2, n):
            reader.submit(k)
        set_temp(d, 50)
        wait_until(lambda: gov.queue_depth == 4 and gov.pacing == 0.0, "recovery")
        wait_until(lambda: len(reader.done) == n, "all reads")
    reader.close()
    assert sorted(reader.done) == list(range(n))
    assert gov.throttled_seconds > 0 and gov._thread is None
