"""Runs one benchmark case in a fresh process; prints its Measurement as one JSON line."""
import json
import sys
from dataclasses import asdict

from .harness import Case, measure_in_process


def main() -> None:
    payload = json.loads(sys.stdin.read())
    case = Case(**payload["case"])
    print(json.dumps(asdict(measure_in_process(case, payload["device"]))), flush=True)


if __name__ == "__main__":
    main()
