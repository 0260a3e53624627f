"""The attack suite's long run: the properties of tests/e2e/test_attack.py with many more
examples, every invariant violation collected (not just the first), then a summary.

    python scripts/attack.py --examples 2000 --minutes 10 [--only target,host] [--out FILE]

Starts its own fake upstream (``--realistic``) and mitmdump on 127.0.0.1, shares the time
between the properties, prints each distinct failure (invariant, property, variant) with
its shortest example, and exits 1 if any invariant was falsified.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck  # noqa: E402
from hypothesis import Phase  # noqa: E402
from hypothesis import settings  # noqa: E402

from tests.e2e import test_attack  # noqa: E402
from tests.e2e.attack_support import Finding  # noqa: E402
from tests.e2e.attack_support import OutOfTime  # noqa: E402
from tests.e2e.attack_support import attack_lab  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="per property, at most")
    parser.add_argument("--minutes", type=float, default=10.0, help="for all properties")
    parser.add_argument("--only", default="", help="comma-separated property names")
    parser.add_argument("--out", type=Path, help="write every finding as JSON lines here")
    args = parser.parse_args()
    props = [
        p
        for p in test_attack.PROPERTIES
        if not args.only
        or p.__name__.removeprefix("test_") in args.only.split(",")
        or any(name in p.__name__ for name in args.only.split(","))
    ]
    if not props:
        print(f"no property matches {args.only!r}", file=sys.stderr)
        return 2
    budget = args.minutes * 60 / len(props)
    ran: dict[str, int] = {}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="burnmeter-attack-") as workdir:
        with attack_lab(Path(workdir), collect=True) as lab:
            # shorter waits than make test's: a failing example costs them, a passing one not
            lab.answer_timeout, lab.settle_timeout = 2.0, 1.0
            stopped: list[int] = []

            def stop(signum: int, _frame: object) -> None:
                # not an exception: one raised here can land where it is swallowed (a gc
                # callback, a test body hypothesis reports); the next example is refused
                # instead, and the labs' processes stop on the way out
                stopped.append(signum)
                lab.stop_at = float("-inf")

            signal.signal(signal.SIGTERM, stop)
            for prop in props:
                if stopped:
                    break
                name = prop.__name__
                before = lab.examples
                lab.stop_at = time.monotonic() + budget
                run = settings(
                    max_examples=args.examples,
                    deadline=None,
                    derandomize=False,
                    phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=list(HealthCheck),
                    database=None,
                )(prop)
                try:
                    run(lab=lab)
                except OutOfTime:
                    pass
                except Exception as e:  # a bug in the suite, or the lab itself broke
                    lab.findings.append(
                        Finding(
                            "ERROR",
                            name,
                            type(e).__name__,
                            str(e)[:2000],
                            traceback.format_exc()[-3000:],
                        )
                    )
                ran[name] = lab.examples - before
                print(
                    f"{name}: {ran[name]} examples, {len(lab.findings)} findings so far", flush=True
                )
            findings = lab.findings
    elapsed = time.monotonic() - started
    if args.out:
        with args.out.open("w") as out:
            for f in findings:
                out.write(json.dumps(f.__dict__) + "\n")
    groups: dict[tuple[str, str, str], list[Finding]] = defaultdict(list)
    for f in findings:
        groups[(f.invariant, f.prop, f.label)].append(f)
    print(f"\n{sum(ran.values())} examples in {elapsed:.0f}s: {ran}")
    print(f"{len(findings)} violations in {len(groups)} distinct (invariant, property, variant)\n")
    for (invariant, prop_name, label), items in sorted(groups.items()):
        shortest = min(items, key=lambda f: len(f.example))
        print(f"[{invariant}] {prop_name} {label} ×{len(items)}")
        print(f"    {shortest.message[:600]}")
        print(f"    example {shortest.example[:800]}\n")
    if stopped:
        return 128 + stopped[0]
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
