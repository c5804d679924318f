"""`python -m runtimes.kernels build|status`: build pipeline's native kernel library, or say where it stands."""

from __future__ import annotations

import argparse
import sys

from runtimes.errors import RuntimeUserError
from runtimes.kernels import OPS, build, cpu_supported, library_path, requirement


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtimes.kernels", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the library for this machine")
    b.add_argument("--ort-include", help="directory with onnxruntime_c_api.h (default: $ORT_INCLUDE_DIR, "
                                         "/usr/include/onnxruntime, ...)")
    b.add_argument("--cc", help="C compiler (default: $CC, cc, gcc, clang)")
    sub.add_parser("status", help="where the library is, and whether this CPU can run it")
    a = p.parse_args(argv)
    try:
        if a.command == "build":
            print(f"built {', '.join(OPS)}: {build(a.ort_include, a.cc)}")
        else:
            path = library_path()
            print(f"library: {path} ({'built' if path.is_file() else 'not built'})")
            print(f"cpu: {'supported' if cpu_supported() else 'not supported: the kernel needs ' + requirement()}")
    except RuntimeUserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
