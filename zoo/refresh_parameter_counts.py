"""Rewrite `parameter_count` in every zoo file by building the preset (random weights).

    python -m keras_perceiver.zoo.refresh_parameter_counts
"""

import json
from pathlib import Path

ZOO = Path(__file__).resolve().parent


def main():
    import keras_perceiver as kp

    for path in sorted(ZOO.glob("*.json")):
        entry = json.loads(path.read_text())
        model = kp.from_preset(entry["name"], load_weights=False)
        entry["parameter_count"] = model.count_params()
        path.write_text(json.dumps(entry, indent=2) + "\n")
        print(f"{entry['name']}: {entry['parameter_count']:,}")


if __name__ == "__main__":
    main()
