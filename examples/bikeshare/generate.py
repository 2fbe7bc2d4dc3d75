"""Writes bikeshare.csv: hourly net bike change per station (arrivals - departures), with the
weather and calendar effects a real system shows. Deterministic (seeded).

    uv run python examples/bikeshare/generate.py
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import random
from pathlib import Path

STATIONS = {  # name: (kind, capacity)
    "central-station": ("commuter_hub", 40),
    "harbour-front": ("leisure", 25),
    "university": ("campus", 30),
    "old-town": ("leisure", 20),
    "business-park": ("office", 35),
    "riverside": ("residential", 20),
    "hospital": ("office", 15),
    "stadium": ("leisure", 30),
}
DAYS = 42
START = dt.datetime(2026, 5, 4, tzinfo=dt.UTC)


def weather(rng: random.Random, day: int, hour: int) -> tuple[float, float, float]:
    base = 14 + 6 * math.sin(day / 7) + 5 * math.sin((hour - 9) / 24 * 2 * math.pi)
    temp = base + rng.gauss(0, 1.5)
    rain = max(0.0, rng.gauss(-0.4, 1.2)) if (day % 5) in (1, 2) else max(0.0, rng.gauss(-1, 0.5))
    wind = abs(rng.gauss(12, 5))
    return round(temp, 1), round(rain, 2), round(wind, 1)


def net_change(
    kind: str, hour: int, weekday: int, temp: float, rain: float, wind: float, rng: random.Random
) -> float:
    workday = weekday < 5
    morning = math.exp(-((hour - 8) ** 2) / 3)
    evening = math.exp(-((hour - 17.5) ** 2) / 4)
    afternoon = math.exp(-((hour - 15) ** 2) / 8)
    effect = {
        "commuter_hub": (-9 * morning + 8 * evening) if workday else 0.5 * afternoon,
        "office": (8 * morning - 7 * evening) if workday else -0.5 * afternoon,
        "campus": (5 * morning - 4 * evening) if workday else 0.0,
        "residential": (-6 * morning + 6 * evening) if workday else -1.5 * morning,
        "leisure": (3 * afternoon if workday else 7 * afternoon) - 4 * evening * (not workday),
    }[kind]
    riding = max(0.15, 1 + (temp - 15) / 25) * (1 / (1 + rain)) * max(0.3, 1 - wind / 60)
    return round(effect * riding + rng.gauss(0, 0.8), 2)


def main() -> None:
    rng = random.Random(3)
    out = Path(__file__).with_name("bikeshare.csv")
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(
            [
                "timestamp",
                "station",
                "station_kind",
                "hour",
                "weekday",
                "temperature_c",
                "precipitation_mm",
                "wind_kmh",
                "net_change",
            ]
        )
        for day in range(DAYS):
            for hour in range(24):
                when = START + dt.timedelta(days=day, hours=hour)
                temp, rain, wind = weather(rng, day, hour)
                for station, (kind, _) in STATIONS.items():
                    writer.writerow(
                        [
                            when.strftime("%Y-%m-%dT%H:%M:%SZ"),
                            station,
                            kind,
                            hour,
                            when.weekday(),
                            temp,
                            rain,
                            wind,
                            net_change(kind, hour, when.weekday(), temp, rain, wind, rng),
                        ]
                    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
