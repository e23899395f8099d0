"""Run one fuzzer under atheris, with coverage of the library's Python code.

    .venv/bin/python -m fuzz.run video WORK_DIR fuzz/corpus/video -max_total_time=60 ...
    .venv/bin/python -m fuzz.run specs WORK_DIR fuzz/corpus/specs -max_total_time=60 ...

Only `tokenflow` and the harnesses are instrumented (imported inside atheris.instrument_imports):
instrumenting every loaded module (atheris.instrument_all) also works but makes the process take
minutes to exit after libFuzzer is done.
"""

from __future__ import annotations

import importlib
import sys

HARNESSES = {"video": ("fuzz.fuzz_video", "check_video"), "specs": ("fuzz.fuzz_specs", "check_specs")}


def main(argv: list[str] | None = None) -> None:
    import atheris

    args = list(sys.argv if argv is None else argv)
    if len(args) < 2 or args[1] not in HARNESSES:
        raise SystemExit(f"usage: python -m fuzz.run {{{','.join(HARNESSES)}}} [libFuzzer arguments]")
    module_name, _ = HARNESSES[args[1]]
    if any(name == "tokenflow" or name.startswith("tokenflow.") for name in sys.modules):
        raise SystemExit("tokenflow was imported before instrumentation; run this module directly")
    with atheris.instrument_imports(include=["tokenflow", "fuzz"]):
        module = importlib.import_module(module_name)
    target = module.fuzz_target()
    atheris.Setup([args[0], *args[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
