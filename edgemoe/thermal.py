"""Thermal governor: keeps the SSD holding the model below its temperature limit by slowing expert reads.

Consumer NVMe drives throttle themselves (30–50 % less bandwidth) after a minute or two of sustained reads;
backing off first is cheaper. Above the limit the governor halves the reader's queue depth at each poll down
to a floor, then paces reads (a pause between reads growing to `max_pacing`); below limit − hysteresis it
undoes one step per poll. It only calls `reader.set_queue_depth(n)` and `reader.set_pacing(seconds)`, so no
read is dropped, only delayed.

Temperature comes from pySMART or `smartctl` when they can read the device, else from the kernel's hwmon
sensor of the drive (`/sys/class/hwmon/hwmon*/temp*_input`, millidegrees), else there is no sensor: that is
reported once and the governor stays idle.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import subprocess
import threading
import time
from typing import Protocol

log = logging.getLogger("edgemoe.thermal")

HWMON_ROOT = "/sys/class/hwmon"
DRIVE_SENSORS = ("nvme", "drivetemp")  # hwmon driver names of NVMe and SATA drive sensors


class Sensor(Protocol):
    description: str

    def read(self) -> float | None:
        """Degrees Celsius, or None when the sensor does not answer."""


class HwmonSensor:
    """One hwmon directory; prefers the NVMe 'Composite' temperature, else temp1."""

    def __init__(self, directory: str, note: str = ""):
        self.directory = directory
        inputs = sorted(glob.glob(os.path.join(directory, "temp*_input")))
        chosen = inputs[0] if inputs else os.path.join(directory, "temp1_input")
        for path in inputs:
            if _read_text(path.replace("_input", "_label")) == "Composite":
                chosen = path
                break
        self.input = chosen
        name = _read_text(os.path.join(directory, "name")) or "?"
        self.description = f"hwmon {name} ({os.path.basename(directory)}){note}"

    def read(self) -> float | None:
        raw = _read_text(self.input)
        try:
            return int(raw) / 1000.0
        except (TypeError, ValueError):
            return None


class SmartSensor:
    """The drive's SMART temperature through pySMART, else `smartctl -j -A` (both usually need root)."""

    def __init__(self, device: str, smartctl: str | None):
        self.device = device
        self.smartctl = smartctl
        self.description = f"SMART {device}"

    def read(self) -> float | None:
        try:
            from pySMART import Device

            t = Device(self.device).temperature
            if t is not None:
                return float(t)
        except Exception:  # pySMART absent, or it failed on this device: try smartctl
            pass
        if self.smartctl is None:
            return None
        try:
            out = subprocess.run([self.smartctl, "-j", "-A", self.device], capture_output=True, text=True, timeout=10)
            return float(json.loads(out.stdout)["temperature"]["current"])
        except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
            return None


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def block_device(path: str) -> str | None:
    """The sysfs directory of the block device holding `path`, or None (tmpfs, overlay, btrfs, network)."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    sys_path = f"/sys/dev/block/{major}:{minor}"
    return os.path.realpath(sys_path) if major != 0 and os.path.exists(sys_path) else None


def device_node(sys_dir: str) -> str:
    """/dev node of the whole disk behind a sysfs block directory (a partition's parent)."""
    if os.path.exists(os.path.join(sys_dir, "partition")):
        sys_dir = os.path.dirname(sys_dir)
    return "/dev/" + os.path.basename(sys_dir)


def _sensor_device(hwmon_dir: str) -> str:
    dev = os.path.join(hwmon_dir, "device")
    if os.path.exists(dev):
        return os.path.realpath(dev)
    return os.path.dirname(os.path.realpath(hwmon_dir))


def find_sensor(path: str | None, *, hwmon_root: str = HWMON_ROOT, block: str | None = None,
                smartctl: str | None = "auto") -> tuple[Sensor | None, str]:
    """The temperature sensor of the drive holding `path`, and how it was chosen (or why there is none).

    `block` overrides the sysfs block device of `path` (tests); `smartctl`: "auto" = found on PATH, None = off.
    """
    if block is None and path is not None and os.path.exists(path):
        block = block_device(path)
    if smartctl == "auto":
        smartctl = shutil.which("smartctl")
    if block is not None:
        smart = SmartSensor(device_node(block), smartctl)
        if smart.read() is not None:
            return smart, f"{smart.description}"
    drives = [d for d in sorted(glob.glob(os.path.join(hwmon_root, "hwmon*")))
              if _read_text(os.path.join(d, "name")) in DRIVE_SENSORS]
    if block is not None:
        for d in drives:
            dev = _sensor_device(d)
            if block == dev or block.startswith(dev + os.sep):
                sensor = HwmonSensor(d)
                return sensor, f"{sensor.description}, the sensor of {device_node(block)}"
    if len(drives) == 1:
        sensor = HwmonSensor(drives[0], note=", assumed: the only drive sensor")
        return sensor, sensor.description
    why = "no block device behind the model's filesystem" if block is None else f"no sensor for {device_node(block)}"
    found = f"{len(drives)} drive sensors in {hwmon_root}, none matching" if drives else f"no drive sensor in {hwmon_root}"
    tool = "" if smartctl else "; smartctl not installed"
    return None, f"{why}; {found}{tool}"


class ThermalGovernor:
    """Polls a sensor in a thread and steps the reader's queue depth and pacing with hysteresis.

    `poll()` does one reading and one step (the thread calls it every `poll_interval` seconds; tests call it).
    """

    def __init__(self, reader, sensor: Sensor | None, *, queue_depth: int, limit: float = 70.0,
                 hysteresis: float = 5.0, poll_interval: float = 5.0, min_queue_depth: int = 1,
                 max_pacing: float = 0.1, pacing_steps: int = 4, throttle: bool = True,
                 no_sensor_reason: str = "", clock=time.monotonic):
        if not 1 <= min_queue_depth <= queue_depth:
            raise ValueError(f"min_queue_depth {min_queue_depth} must be in 1..queue_depth {queue_depth}")
        self.reader = reader
        self.sensor = sensor
        self.limit = limit
        self.hysteresis = hysteresis
        self.poll_interval = poll_interval
        self.throttle = throttle
        self.no_sensor_reason = no_sensor_reason
        self._clock = clock
        self.schedule = self._schedule(queue_depth, min_queue_depth, max_pacing, pacing_steps)  # [(depth, pacing s)]
        self._level = 0  # index into schedule; 0 = not throttled
        self._temperature: float | None = None
        self._throttled = 0.0  # seconds spent above level 0, up to _since
        self._since = clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned_silent = False

    @classmethod
    def from_config(cls, reader, cfg, model_path: str | None, *, hwmon_root: str = HWMON_ROOT) -> ThermalGovernor:
        """A governor for the drive holding `model_path`, set up from an `edgemoe.config.Config`."""
        m = cfg.monitoring
        sensor, how = find_sensor(model_path, hwmon_root=hwmon_root)
        return cls(reader, sensor, queue_depth=cfg.ssd.queue_depth, limit=m.nvme_thermal_limit,
                   hysteresis=m.hysteresis, poll_interval=m.poll_interval,
                   min_queue_depth=m.io_pacing.min_queue_depth, max_pacing=m.io_pacing.throttle_interval / 1000.0,
                   throttle=m.io_pacing.enabled, no_sensor_reason="" if sensor else how)

    @staticmethod
    def _schedule(depth: int, floor: int, max_pacing: float, steps: int) -> list[tuple[int, float]]:
        out = [(depth, 0.0)]
        while depth > floor:
            depth = max(floor, depth // 2)
            out.append((depth, 0.0))
        out += [(floor, max_pacing * k / steps) for k in range(1, steps + 1) if max_pacing > 0]
        return out

    # ------------------------------------------------------------------------------- state

    @property
    def temperature(self) -> float | None:
        return self._temperature

    @property
    def queue_depth(self) -> int:
        return self.schedule[self._level][0]

    @property
    def pacing(self) -> float:
        return self.schedule[self._level][1]

    @property
    def throttled_seconds(self) -> float:
        with self._lock:
            extra = self._clock() - self._since if self._level > 0 else 0.0
            return self._throttled + extra

    def status(self) -> dict:
        """Current figures for metrics: temperature (°C or None), queue depth, pacing (s), throttled seconds."""
        return {"sensor": self.sensor.description if self.sensor else None, "temperature": self.temperature,
                "limit": self.limit, "queue_depth": self.queue_depth, "pacing": self.pacing,
                "throttle_level": self._level, "throttled_seconds": round(self.throttled_seconds, 3)}

    # ------------------------------------------------------------------------------- control

    def poll(self) -> float | None:
        """Read the temperature once and move at most one step; returns the reading."""
        t = self.sensor.read() if self.sensor is not None else None
        with self._lock:
            now = self._clock()
            if self._level > 0:
                self._throttled += now - self._since
            self._since = now
            self._temperature = t
            if t is None:
                if self.sensor is not None and not self._warned_silent:
                    log.warning("SSD temperature sensor (%s) gave no reading; keeping the current I/O settings",
                                self.sensor.description)
                    self._warned_silent = True
                return None
            level = self._level
            if t > self.limit and self.throttle:
                level = min(level + 1, len(self.schedule) - 1)
            elif t < self.limit - self.hysteresis:
                level = max(level - 1, 0)
            if level != self._level:
                self._apply(level, t)
        return t

    def _apply(self, level: int, t: float) -> None:
        (old_depth, old_pacing), (depth, pacing) = self.schedule[self._level], self.schedule[level]
        if depth != old_depth:
            self.reader.set_queue_depth(depth)
        if pacing != old_pacing:
            self.reader.set_pacing(pacing)
        (log.warning if level > self._level else log.info)(
            "SSD at %.0f °C (limit %.0f): queue depth %d, %.0f ms between reads", t, self.limit, depth, pacing * 1000)
        self._level = level

    def start(self) -> None:
        """Poll in a daemon thread; without a sensor, say so once and stay idle."""
        if self.sensor is None:
            log.warning("no SSD temperature sensor (%s); the thermal governor is idle", self.no_sensor_reason)
            return
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="edgemoe-thermal", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # a failing reader call must not kill the governor silently
                log.exception("thermal governor step failed")
            self._stop.wait(self.poll_interval)

    def __enter__(self) -> ThermalGovernor:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
