"""Writes crops.csv: per-field median reflectance in Sentinel-2 bands (as an Earth Engine
sample export would give) and the crop grown. Synthetic, deterministic (seeded).

    uv run python examples/crops/generate.py
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

BANDS = ["B2", "B3", "B4", "B5", "B8", "B11", "B12"]
# Mean reflectance per band (x 10^4) for each crop in mid-season, and its spread.
PROFILES = {
    "corn": [420, 720, 560, 1250, 3900, 2350, 1350],
    "soybean": [380, 690, 470, 1150, 4300, 2150, 1150],
    "wheat": [520, 820, 760, 1350, 3000, 2650, 1650],
    "rice": [450, 740, 520, 1050, 2800, 1700, 950],
    "fallow": [780, 1050, 1250, 1500, 2100, 3000, 2300],
}
REGIONS = ["north", "central", "south"]


def main() -> None:
    rng = random.Random(0)
    out = Path(__file__).with_name("crops.csv")
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["field_id", "region", *BANDS, "ndvi", "crop"])
        field = 0
        for crop, means in PROFILES.items():
            for _ in range(300):
                field += 1
                region = rng.choice(REGIONS)
                shift = {"north": -0.06, "central": 0.0, "south": 0.05}[region]
                values = [max(1.0, rng.gauss(m * (1 + shift), m * 0.11)) for m in means]
                red, nir = values[2], values[4]
                ndvi = (nir - red) / (nir + red)
                if rng.random() < 0.02:
                    values[rng.randrange(len(values))] = float("nan")  # cloud-masked band
                writer.writerow(
                    [
                        f"f{field:05d}",
                        region,
                        *["" if v != v else round(v, 1) for v in values],
                        round(ndvi, 4),
                        crop,
                    ]
                )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
